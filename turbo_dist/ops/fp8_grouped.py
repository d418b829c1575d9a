"""Grouped FP8 GEMM (MoE experts): `grouped_scaled_mm` on pre-quantized operands and `grouped_gemm_fp8`
with autograd; quantization, configs and the dense FP8 GEMM are in fp8.py.

Op behind the dispatcher: "grouped_scaled_mm" (wgmma: our Hopper CUDA kernel, blockwise, registered in
fp8_wgmma.py | triton: our persistent kernel, every mode | cublaslt: one
cuBLASLt blockwise GEMM per group from a C++ loop, host group_lens | torch_loop: the same through
torch._scaled_mm per group | torch: torch._scaled_grouped_mm, rowwise e4m3 on SM90 | reference). Default order
and the measured rules that move a backend first are next to the registrations.
"""
import contextlib
import importlib
import logging
import math

import torch

from . import dispatcher
from ._autograd import first_order_only
from .fp8 import (E4M3, E5M2, _MODES_KERNEL, _PROBES, Float8QuantConfig, ScalingGranularity,
                  _block_scales_for_cublas, _capturing, _quant_torch, _reference_scaled_mm, _sb_n,
                  _torch_blockwise_supported, _torch_scaled_mm, check_fp8_operands, log, quantize_fp8,
                  quantize_weight)
from .gemm import triton_available
from .grouped_gemm import check_group_lens_values, check_grouped_inputs, group_offsets

# ------------------------------------------------------------------------------- grouped scaled mm
# grouped_scaled_mm(a_q [M, K], b_q [G, K, N] view, scale_a, scale_b, group_lens, mode, out_dtype):
#   "tensor": [1], [G]; "row": [M, 1], [G, N]; "block": [M, K/128], [G, K/128, N/128].
def _reference_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    out = torch.empty((a_q.shape[0], b_q.shape[2]), dtype=out_dtype, device=a_q.device)
    start = 0
    for g, n in enumerate(group_lens.tolist()):
        sa = scale_a if mode == "tensor" else scale_a[start:start + n]
        out[start:start + n] = _reference_scaled_mm(a_q[start:start + n], b_q[g], sa, scale_b[g], mode, out_dtype)
        start += n
    return out


def _triton_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    from turbo_dist.kernels import fp8_gemm

    offs = group_offsets(group_lens, a_q.device)
    sb_n = _sb_n(b_q, scale_b) if mode == "block" else 128
    return fp8_gemm.grouped_scaled_mm(a_q, b_q, scale_a, scale_b, offs, _MODES_KERNEL[mode], out_dtype=out_dtype,
                                      sb_n=sb_n)


def _triton_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    return triton_available(a_q, b_q, op="grouped_scaled_mm")


def _torch_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    offs = group_offsets(group_lens, a_q.device, torch.int32)
    return torch._scaled_grouped_mm(a_q, b_q, scale_a.reshape(-1), scale_b.reshape(b_q.shape[0], -1), offs=offs,
                                    out_dtype=out_dtype)


def _torch_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    if not hasattr(torch, "_scaled_grouped_mm"):
        return "torch._scaled_grouped_mm is missing in this torch"
    if not (a_q.is_cuda and b_q.is_cuda):
        return "torch._scaled_grouped_mm needs CUDA"
    if torch.cuda.get_device_capability(a_q.device) != (9, 0):
        return "torch._scaled_grouped_mm (FP8 rowwise) runs on SM90 only"
    if mode != "row":
        return f"torch._scaled_grouped_mm does rowwise scaling only, not {mode}"
    if a_q.dtype != E4M3 or b_q.dtype != E4M3:
        return "torch._scaled_grouped_mm needs e4m3 operands"
    if out_dtype != torch.bfloat16:
        return "torch._scaled_grouped_mm needs a bf16 output"
    K, N = a_q.shape[1], b_q.shape[2]
    if K % 16 or N % 16:
        return f"torch._scaled_grouped_mm needs K and N multiples of 16, got {K}, {N}"
    if a_q.stride(1) != 1 or b_q.stride(1) != 1:
        return "torch._scaled_grouped_mm needs a row-major and each b[g] column-major"
    return True


# "torch_loop": BLOCKWISE grouped GEMM as one cuBLASLt blockwise GEMM (torch._scaled_mm, 1x128 x 128x128) per
# group. torch has no grouped blockwise op, and cuBLASLt takes only some row counts (probed below), so this
# backend needs group_lens on the host (no sync: MoE layers have them there, e.g. DeepEP's
# num_recv_tokens_per_expert_list) and every group a multiple of the probed row alignment (what
# expert_alignment / Megatron's FP8 padding give). Each group's 1x128 scales are copied M-major per call.
_LOOP_ALIGN_CANDIDATES = (1, 4, 8, 16, 128)
# Measured rule (H200, torch 2.11 / CUDA 13, DeepSeek-V3 fc1 K=7168 N=4096, host lens aligned to 128, skewed,
# ~1024 rows per expert; benchmarks/results/ops_fp8_grouped_loop_h200.json): on the GPU the cuBLASLt loop is
# faster than our Triton kernel (G=8 0.446 vs 0.606 ms, G=32 1.89 vs 2.22 ms, GPU time with the launch queue
# pre-filled), but each group costs ~55-65 us of host time (torch._scaled_mm's descriptor / heuristic work
# plus the scale copy), so with small groups the host, not the GPU, sets the pace. torch_loop goes first
# only when a launched group carries >= LOOP_MIN_GROUP_FLOP on average (1024 rows at K=7168, N=4096: about
# 60 us of FP8 tensor-core time, the host cost it must cover); otherwise the persistent Triton kernel (one
# launch) stays first.
LOOP_MIN_GROUP_FLOP = 2 * 1024 * 7168 * 4096


def _cublas_block_row_align(device):
    """Smallest row alignment a (of _LOOP_ALIGN_CANDIDATES) for which torch._scaled_mm blockwise gives right
    results on an [a * k, K] slice here (None when blockwise is not supported at all). Probed once per device."""
    key = ("block_align", str(device))
    if key not in _PROBES and _capturing(device):
        return None
    if key not in _PROBES:
        align = None
        ok, why = _torch_blockwise_supported(device)
        if not ok and ("block", str(device)) not in _PROBES:  # that probe could not run now (memory): retry later
            return None
        if ok:
            g = torch.Generator(device=device).manual_seed(1)
            b = torch.randn(512, 256, device=device, generator=g)
            bq, sb = _quant_torch(b.t(), E4M3, "bxb")
            for a_ in _LOOP_ALIGN_CANDIDATES:
                m = 128 + a_ if a_ < 128 else 256  # a multiple of a_ and of nothing larger in the list
                a = torch.randn(m, 512, device=device, generator=g)
                aq, sa = _quant_torch(a, E4M3, "1xb")
                try:
                    out = _torch_scaled_mm(aq, bq.t(), sa, sb.t(), "block", torch.bfloat16)
                    ref = _reference_scaled_mm(aq, bq.t(), sa, sb.t(), "block", torch.float32)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                except torch.OutOfMemoryError:  # says nothing about support: not cached, probed again
                    return None
                except Exception as exc:  # cuBLASLt: CUBLAS_STATUS_NOT_SUPPORTED for this row count
                    why = f"{m} rows: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                if err < 1e-2:
                    align = a_
                    break
                why = f"{m} rows: relative error {err:.3g}"
        _PROBES[key] = (align, why)
        log.info("turbo_dist: cuBLASLt blockwise row alignment on %s: %s (%s)", device, align, why or "ok")
    return _PROBES[key][0]


def _torch_loop_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    M, N = a_q.shape[0], b_q.shape[2]
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    # One GEMM after another on the caller's stream (4 side streams were measured slower: cuBLASLt's kernels
    # fill the GPU and concurrent ones only contend). Each group's 1x128 scales are copied M-major (stride
    # (1, Mg), what cuBLASLt takes): one small copy per group, the cheapest on the host.
    start = 0
    for g, n in enumerate(group_lens.tolist()):  # host tensor: no sync
        if n:
            sa_g, sb_g = _block_scales_for_cublas(scale_a[start:start + n], scale_b[g])
            torch._scaled_mm(a_q[start:start + n], b_q[g], sa_g, sb_g, out_dtype=out_dtype,
                             out=out[start:start + n])
        start += n
    return out


def _per_group_cublas_can(name, a_q, b_q, scale_b, group_lens, mode, out_dtype):
    """What torch_loop and cublaslt (one cuBLASLt blockwise GEMM per group) both need: True or the reason."""
    if mode != "block":
        return f"{name} runs BLOCKWISE only, not {mode}"
    if group_lens.device.type != "cpu":
        return f"{name} needs group_lens on the host (reading them from the GPU would sync)"
    if not a_q.is_cuda:
        return f"{name} needs CUDA"
    if a_q.dtype != E4M3 or b_q.dtype != E4M3 or out_dtype != torch.bfloat16:
        return f"{name} needs e4m3 operands and a bf16 output"
    K, N = a_q.shape[1], b_q.shape[2]
    if K % 512 or N % 128 or _sb_n(b_q[0], scale_b[0]) != 128:
        return f"{name} needs 128x128 weight blocks, K a multiple of 512 and N of 128"
    if a_q.stride(1) != 1 or b_q.stride(1) != 1:
        return f"{name} needs a row-major and each b[g] column-major"
    align = _cublas_block_row_align(a_q.device)
    if align is None:
        why = _PROBES.get(("block_align", str(a_q.device)), (None, "the probe could not run now (CUDA graph capture "
                                                                  "or out of memory)"))[1]
        return f"cuBLASLt blockwise (torch._scaled_mm) is not usable here ({why})"
    if _lens_alignment(group_lens) % align:
        return (f"{name} needs every group's row count to be a multiple of {align} (cuBLASLt), got "
                f"{group_lens.tolist()}")
    return True


def _torch_loop_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    return _per_group_cublas_can("torch_loop", a_q, b_q, scale_b, group_lens, mode, out_dtype)


# "cublaslt": torch_loop's GEMMs with the loop in C++ (turbo_dist._cublaslt, csrc/cublaslt/; setup.py builds it
# where cuBLASLt's headers and library are found): the descriptors and the heuristic's algorithm are cached per
# problem and the scales of all groups are laid out in two launches, so a group costs a few us of host time
# instead of ~55-90. Measured rule (H200, DeepSeek-V3 fc1 K=7168 N=4096, skewed host counts aligned to 128,
# GPU time with the launch queue pre-filled, benchmarks/results/probe_fp8_grouped_host_h200.json): at ~1024
# rows per group the cuBLASLt GEMMs beat our Triton kernel (G=8 0.435 vs 0.599 ms, G=32 1.77 vs 2.20 ms); at
# ~256 rows Triton is as fast or faster (0.590 vs 0.612 ms, 0.167 vs 0.190 ms) and at ~128 faster. So
# cublaslt goes first when a launched group averages >= 512 rows' work at 7168 x 4096 (NATIVE_MIN_GROUP_FLOP,
# between the measured points); below that the persistent Triton kernel stays first.
NATIVE_MIN_GROUP_FLOP = 2 * 512 * 7168 * 4096
# Where backend "wgmma" (our Hopper CUDA kernel, ops/fp8_wgmma.py) takes the call, cublaslt goes first only from
# 1024 rows' work per group and torch_loop never. H200, the same aligned host counts for both (labels
# fp8_cublaslt_aligned_host / fp8_wgmma_aligned_host of benchmarks/results/probe_fp8_wgmma_clusters_h200.json
# and probe_fp8_wgmma_h200.json): at ~1024 rows cuBLASLt is ~10% ahead on G=8 fc1, tied on G=32 fc1, ahead 8%
# then behind 6% on G=8 fc2; at ~512 rows (G=16 fc1) wgmma is 11-15% ahead; torch_loop trails both.
WGMMA_NATIVE_MIN_GROUP_FLOP = 2 * 1024 * 7168 * 4096
NATIVE_WORKSPACE_BYTES = 32 << 20  # cuBLASLt's split-K workspace, what torch gives it on Hopper
_NATIVE = {}


def load_optional_module(cache, name, builds_where):
    """turbo_dist.<name> (an optional native module), imported once into `cache` ({"mod", "why"}), or None when it
    was not built here; cache["why"] then says why and where `pip install -e .` builds it."""
    if "mod" not in cache:
        try:
            mod = importlib.import_module(f"turbo_dist.{name}")
            cache["why"] = ""
        except ImportError as exc:
            mod = None
            cache["why"] = f"turbo_dist.{name} is not built ({exc}); `pip install -e .` builds it where {builds_where}"
        cache["mod"] = mod
    return cache["mod"]


def warn_missing_once(cache, device, backend):
    """A Hopper GPU whose native module was not built: say so once (pip hides the build's messages without -v),
    since the dispatcher then quietly takes another backend."""
    if cache.get("mod") is None and not cache.get("warned") and getattr(device, "type", None) == "cuda" and \
            torch.cuda.is_available() and torch.cuda.get_device_capability(device) == (9, 0):
        cache["warned"] = True
        logging.getLogger("turbo_dist").warning("backend %r is unavailable on this Hopper GPU: %s (python -m pip "
                                                "install -v ... shows the build's messages)", backend, cache["why"])


def native_module():
    """turbo_dist._cublaslt, or None when it was not built here (the reason: _NATIVE["why"])."""
    return load_optional_module(_NATIVE, "_cublaslt", "cublasLt.h and libcublasLt are found")


def _weight_block_scales(scale_b):
    """scale_b [G, kb, nb] (a view of quantize_fp8's [G, nb, kb]) -> (buffer, floats per group): each group's
    [nb, kb] with the K blocks contiguous, what cuBLASLt's 128x128 scales take (kb is a multiple of 4 here, as
    K is of 512, so rows need no padding and every group starts 16-byte aligned)."""
    st = scale_b.transpose(1, 2)
    if not st.is_contiguous() or st.data_ptr() % 16:
        st = st.contiguous()
    return st, st.stride(0)


def _cublaslt_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    from turbo_dist.kernels.fp8_quant import grouped_m_major

    M, K = a_q.shape
    G, _, N = b_q.shape
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    lens = group_lens.tolist()  # host tensor: no sync
    if not any(lens):
        return out
    with torch.cuda.device(a_q.device) if a_q.is_cuda else contextlib.nullcontext():  # the scale kernel's device
        sa = grouped_m_major(scale_a.float(), group_offsets(group_lens, a_q.device))
        sb, sb_stride = _weight_block_scales(scale_b.float())
        ws = torch.empty(NATIVE_WORKSPACE_BYTES, dtype=torch.uint8, device=a_q.device)
        native_module().grouped_blockwise(
            device=a_q.device.index if a_q.is_cuda else -1,
            stream=torch.cuda.current_stream(a_q.device).cuda_stream if a_q.is_cuda else 0, a=a_q.data_ptr(),
            b=b_q.data_ptr(), out=out.data_ptr(), scale_a=sa.data_ptr(), scale_b=sb.data_ptr(),
            workspace=ws.data_ptr(), ws_bytes=ws.numel(), rows=lens, M=M, G=G, N=N, K=K, lda=a_q.stride(0),
            ldw=b_q.stride(2), ldo=out.stride(0), b_group_stride=b_q.stride(0), sb_group_stride=sb_stride)
    return out


def _cublaslt_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    if native_module() is None:
        return _NATIVE["why"]
    ok = _per_group_cublas_can("cublaslt", a_q, b_q, scale_b, group_lens, mode, out_dtype)
    if ok is not True:
        return ok
    # Every group's A / B / D pointer 256-byte aligned: the plans are chosen with cuBLASLt's default minimum
    # alignment preference (256 bytes), so a kernel that needs it may be picked; a group's pointers are the bases
    # plus whole rows (FP8: one byte per element; the output bf16 [M, N]) or whole groups
    if a_q.data_ptr() % 256 or b_q.data_ptr() % 256 or a_q.stride(0) % 256 or b_q.stride(0) % 256 or \
            b_q.stride(2) % 16 or (2 * b_q.shape[2]) % 256:
        return ("cublaslt needs 256-byte aligned operands, row strides and group strides (and output rows, "
                "2 * N bytes): its plans assume cuBLASLt's default 256-byte alignment")
    return True


def _lens_alignment(group_lens):
    """The largest of _LOOP_ALIGN_CANDIDATES dividing every (host) group length."""
    g = math.gcd(*group_lens.tolist())  # 0 when every group is empty: everything divides
    return next(a for a in reversed(_LOOP_ALIGN_CANDIDATES) if g % a == 0)


def _grouped_scaled_choice_key(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    # the per-group cuBLASLt predicates read host group_lens values: key on their alignment and on which work
    # threshold they pass (lens change every step)
    if group_lens.device.type != "cpu" or mode != "block":
        return None
    return (_lens_alignment(group_lens), _loop_pays(a_q, b_q, group_lens),
            _loop_pays(a_q, b_q, group_lens, NATIVE_MIN_GROUP_FLOP),
            _loop_pays(a_q, b_q, group_lens, WGMMA_NATIVE_MIN_GROUP_FLOP))


def _loop_pays(a_q, b_q, group_lens, min_flop=None):
    """Whether the launched groups carry enough GPU work on average to hide a per-group loop's host cost
    (min_flop per launched group; default LOOP_MIN_GROUP_FLOP, torch_loop's)."""
    min_flop = LOOP_MIN_GROUP_FLOP if min_flop is None else min_flop
    launched = int((group_lens > 0).sum())
    return launched > 0 and 2.0 * a_q.shape[0] * a_q.shape[1] * b_q.shape[2] / launched >= min_flop


def _wgmma_takes(*args):
    from . import fp8_wgmma  # it imports this module

    try:
        return fp8_wgmma._wgmma_grouped_scaled_can(*args) is True
    except Exception:  # cannot judge: the rules without it apply
        return False


def _grouped_scaled_preference(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    if mode != "block" or group_lens.device.type != "cpu":
        return None
    wgmma = _wgmma_takes(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype)
    native_min = WGMMA_NATIVE_MIN_GROUP_FLOP if wgmma else NATIVE_MIN_GROUP_FLOP
    if native_module() is not None and _loop_pays(a_q, b_q, group_lens, native_min):
        try:
            ok = _cublaslt_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype)
        except Exception as exc:  # cannot judge: torch_loop's rule below still applies
            ok = repr(exc)
        if ok is True:
            return "cublaslt"  # (when it declines, e.g. misaligned rows, torch_loop's rule below still applies)
    if wgmma:
        return None  # the default order: wgmma first
    if _loop_pays(a_q, b_q, group_lens):
        return "torch_loop"
    return None


# Default order: triton before torch. The only case both take is rowwise e4m3 on SM90, and there our
# persistent kernel is faster on the DeepSeek-V3 fc1 shape (H200, torch 2.11 / triton 3.6, pre-quantized:
# G=8 0.433 vs 0.469 ms, G=32 1.656 vs 2.062 ms; benchmarks/results/ops_h200.json, section fp8_grouped).
# On CPU the triton backend declines unless asked for, so the reference runs there.
dispatcher.register_backend("grouped_scaled_mm", "triton", _triton_grouped_scaled, _triton_grouped_scaled_can,
                            priority=10)
dispatcher.register_backend("grouped_scaled_mm", "torch", _torch_grouped_scaled, _torch_grouped_scaled_can,
                            priority=20)
dispatcher.register_backend("grouped_scaled_mm", "cublaslt", _cublaslt_grouped_scaled,
                            _cublaslt_grouped_scaled_can, priority=14)
dispatcher.register_backend("grouped_scaled_mm", "torch_loop", _torch_loop_grouped_scaled,
                            _torch_loop_grouped_scaled_can, priority=15)
dispatcher.register_backend("grouped_scaled_mm", "reference", _reference_grouped_scaled, priority=90)
dispatcher.set_choice_key("grouped_scaled_mm", _grouped_scaled_choice_key)


def _grouped_scaled_signature(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    # autotune per expert shapes, not per token count (M changes every step)
    return (a_q.shape[1], tuple(b_q.shape), a_q.dtype, b_q.dtype, mode, out_dtype, a_q.device.type)


dispatcher.set_signature("grouped_scaled_mm", _grouped_scaled_signature)
dispatcher.set_preference("grouped_scaled_mm", _grouped_scaled_preference)


def _grouped_fp8(x, w_t, group_lens, x_dtype, w_dtype, gran, out_dtype):
    """x [M, K] @ per-group w [G, K, N], where w_t = w.transpose(1, 2) [G, N, K] (any strides)."""
    if w_t.shape[0] == 0:  # no experts (so no rows): nothing to quantize or multiply
        return x.new_zeros(x.shape[0], w_t.shape[1], dtype=out_dtype)
    xq, sx = quantize_fp8(x, x_dtype, gran)
    wq, sw = quantize_weight(w_t, w_dtype, gran)  # [G, N, K] row-major; reused inside cache_fp8_weights()
    return _grouped_scaled_checked(xq, wq, sx, sw, group_lens, gran, out_dtype)


def _grouped_scaled_checked(a_q, w_q, scale_a, scale_w, group_lens, gran, out_dtype):
    # quantize_fp8's weight scales -> the kernels' [G, K, N]-view layout
    if gran == ScalingGranularity.ROWWISE:
        scale_w = scale_w.reshape(scale_w.shape[0], -1)
    elif gran == ScalingGranularity.BLOCKWISE:
        scale_w = scale_w.transpose(1, 2)
    mode = {"TENSORWISE": "tensor", "ROWWISE": "row", "BLOCKWISE": "block"}[gran.name]
    return dispatcher.dispatch("grouped_scaled_mm", a_q, w_q.transpose(1, 2), scale_a, scale_w, group_lens, mode,
                               out_dtype)


def grouped_scaled_mm(a_q, w_q, scale_a, scale_w, group_lens, out_dtype=torch.bfloat16, granularity=None):
    """Grouped FP8 GEMM on already-quantized operands: out[rows of g] = (a_q * scale_a)[rows of g] @ (w_q[g] *
    scale_w[g])^T, so quantized expert weights can be reused across calls (e.g. micro-batches of one step).

    Takes exactly what quantize_fp8 returns: (a_q, scale_a) = quantize_fp8(a [M, K], dtype, gran) and
    (w_q, scale_w) = quantize_fp8(w [G, N, K], dtype, gran, weight=True), w stored as nn.Linear stores it.
    Scales: TENSORWISE [1] and [G]; ROWWISE [M, 1] and [G, N, 1]; BLOCKWISE [M, cdiv(K,128)] and
    [G, cdiv(N,128), cdiv(K,128)]. granularity is inferred from the scale shapes unless given.
    group_lens [G] int32/int64 sums to M (rows of a sorted by group), on a_q's device or the CPU (host lens
    are checked for free and let BLOCKWISE run on cuBLASLt, backend "torch_loop"). Returns [M, N] out_dtype.
    """
    check_fp8_operands("grouped_scaled_mm", a_q=a_q, w_q=w_q, scale_a=scale_a, scale_w=scale_w, out_dtype=out_dtype)
    if a_q.dim() != 2 or w_q.dim() != 3 or a_q.shape[1] != w_q.shape[2]:
        raise ValueError(f"grouped_scaled_mm: need a_q [M, K] and w_q [G, N, K], got {tuple(a_q.shape)} and "
                         f"{tuple(w_q.shape)}")
    if a_q.dtype not in (E4M3, E5M2) or w_q.dtype not in (E4M3, E5M2):
        raise TypeError(f"grouped_scaled_mm: operands must be fp8 (e4m3fn/e5m2), got {a_q.dtype} and {w_q.dtype}")
    if scale_a.dtype != torch.float32 or scale_w.dtype != torch.float32:
        raise TypeError(f"grouped_scaled_mm: scales must be fp32, got {scale_a.dtype} and {scale_w.dtype}")
    if not isinstance(group_lens, torch.Tensor) or group_lens.dim() != 1 or group_lens.dtype not in (torch.int32,
                                                                                                       torch.int64):
        raise TypeError("grouped_scaled_mm: group_lens must be a 1-D int32/int64 tensor")
    devs = {t.device for t in (a_q, w_q, scale_a, scale_w)}
    if len(devs) != 1:
        raise ValueError(f"grouped_scaled_mm: operands and scales must be on one device, got {devs}")
    if group_lens.device != a_q.device and group_lens.device.type != "cpu":
        where = f"{a_q.device}" if a_q.device.type == "cpu" else f"{a_q.device} or cpu"
        raise ValueError(f"grouped_scaled_mm: group_lens is on {group_lens.device}; expected {where}")
    M, K = a_q.shape
    G, N = w_q.shape[0], w_q.shape[1]
    if group_lens.shape[0] != G:
        raise ValueError(f"grouped_scaled_mm: group_lens has {group_lens.shape[0]} groups, w_q has {G}")
    check_group_lens_values(group_lens, M, "grouped_scaled_mm", rows_of="a_q")
    kb, nb = -(-K // 128), -(-N // 128)
    shapes = {ScalingGranularity.TENSORWISE: ((1,), (G,)), ScalingGranularity.ROWWISE: ((M, 1), (G, N, 1)),
              ScalingGranularity.BLOCKWISE: ((M, kb), (G, nb, kb))}
    got = (tuple(scale_a.shape), tuple(scale_w.shape))
    if granularity is None:
        granularity = next((g for g, want in shapes.items() if got == want), None)
        if granularity is None:
            raise ValueError(f"grouped_scaled_mm: scale shapes {got} match no granularity; expected one of "
                             f"{ {g.name: want for g, want in shapes.items()} }")
    elif got != shapes[granularity]:
        raise ValueError(f"grouped_scaled_mm {granularity.name}: scales must be {shapes[granularity]}, got {got}")
    return _grouped_scaled_checked(a_q, w_q, scale_a, scale_w, group_lens, granularity, out_dtype)


class _GroupedGemmFp8Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group_lens, trans_b, config):
        ctx.save_for_backward(a, b, group_lens)
        ctx.args = (trans_b, config)
        w_t = b if trans_b else b.transpose(1, 2)
        return _grouped_fp8(a, w_t, group_lens, config.fwd_dtype, config.fwd_dtype, config.granularity, a.dtype)

    @staticmethod
    @first_order_only("turbo_dist.ops.grouped_gemm_fp8")
    def backward(ctx, dc):
        a, b, group_lens = ctx.saved_tensors
        trans_b, cfg = ctx.args
        dc = dc.to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[0]:  # dA_g = dC_g op(B_g)^T: contraction over N
            w_t = b.transpose(1, 2) if trans_b else b  # [G, K, N] = op(B)^T's transpose, quantized along N
            da = _grouped_fp8(dc, w_t, group_lens, cfg.grad_dtype, cfg.fwd_dtype, cfg.granularity, a.dtype)
        if ctx.needs_input_grad[1]:  # weight gradient stays in high precision (see README)
            db = dispatcher.dispatch("grouped_gemm_wgrad", a, dc, group_lens, trans_b)
        return da, db, None, None, None


def grouped_gemm_fp8(a, b, group_lens, trans_b=False, config=None):
    """Grouped GEMM (MoE experts) in FP8, differentiable; same shapes as grouped_gemm.

    a: [M, K] bf16/fp16/fp32 rows sorted by group; b: [G, K, N] (or [G, N, K] with trans_b); group_lens [G]
    int32/int64 summing to M. Forward and dA run in FP8 (per config); dB runs in a's dtype.
    TENSORWISE scales b per expert; BLOCKWISE uses 1x128 blocks for a/dC and 128x128 for each expert's b.
    """
    config = config or Float8QuantConfig()
    if not isinstance(config, Float8QuantConfig):
        raise TypeError(f"grouped_gemm_fp8: config must be a Float8QuantConfig, got {type(config).__name__}")
    check_grouped_inputs(a, b, group_lens, trans_b, name="grouped_gemm_fp8")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _GroupedGemmFp8Fn.apply(a, b, group_lens, bool(trans_b), config)
    w_t = b if trans_b else b.transpose(1, 2)
    return _grouped_fp8(a, w_t, group_lens, config.fwd_dtype, config.fwd_dtype, config.granularity, a.dtype)
