"""Grouped GEMM for MoE experts: `grouped_gemm(a, b, group_lens, trans_b=False)`, with autograd.

Ops behind the dispatcher:
- "grouped_gemm"       (a [M, K], b [G, K, N] or [G, N, K], group_lens, trans_b) -> [M, N]
- "grouped_gemm_wgrad" (a [M, K], dc [M, N], group_lens, trans_b) -> dB in b's shape ([G, K, N] / [G, N, K])
Backends: "torch" (torch._grouped_mm: CUDA, bf16, SM90+, 16-byte aligned K/N), "triton" (persistent
kernel, kernels/grouped_gemm.py, and the weight gradient in kernels/grouped_wgrad.py; no host sync) and
"loop" (one torch.mm per group; any device/dtype, syncs to read group_lens); on Hopper "wgmma" (our CUDA kernels,
grouped_wgmma.py: the forward/dgrad one chosen by the rule below, the weight-gradient one opt-in).
"""
import torch

from . import dispatcher
from .gemm import _FLOAT_DTYPES, triton_available

_INT_DTYPES = (torch.int32, torch.int64)


def check_grouped_inputs(a, b, group_lens, trans_b, name="grouped_gemm", dtypes=_FLOAT_DTYPES):
    for n, t in (("a", a), ("b", b), ("group_lens", group_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {n} must be a tensor, got {type(t).__name__}")
    if a.dim() != 2:
        raise ValueError(f"{name}: a must be 2-D [M, K], got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"{name}: b must be 3-D [G, {'N, K' if trans_b else 'K, N'}], got shape {tuple(b.shape)}")
    if a.dtype not in dtypes or b.dtype != a.dtype:
        raise TypeError(f"{name}: a and b must share one of {list(dtypes)}; got a {a.dtype}, b {b.dtype}")
    if group_lens.dim() != 1 or group_lens.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: group_lens must be 1-D int32/int64 [G], got {group_lens.dtype} {tuple(group_lens.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}")
    if group_lens.device != a.device and group_lens.device.type != "cpu":
        where = f"{a.device}" if a.device.type == "cpu" else f"{a.device} or cpu"
        raise ValueError(f"{name}: group_lens is on {group_lens.device}; expected {where}")
    G = b.shape[0]
    if group_lens.shape[0] != G:
        raise ValueError(f"{name}: group_lens has {group_lens.shape[0]} entries but b has G={G} groups")
    k_b = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != k_b:
        raise ValueError(f"{name}: a {tuple(a.shape)} has K={a.shape[1]} but b {tuple(b.shape)} (trans_b={trans_b}) has K={k_b}")
    check_group_lens_values(group_lens, a.shape[0], name)


def check_group_lens_values(group_lens, m, name, rows_of="a"):
    """group_lens >= 0 and summing to the `m` rows of `rows_of`, checked when group_lens is on the CPU (free
    there; on the GPU it would cost a host sync, so the kernels trust it)."""
    if group_lens.device.type == "cpu":
        if bool((group_lens < 0).any()):
            raise ValueError(f"{name}: group_lens must be >= 0, got {group_lens.tolist()}")
        total = int(group_lens.sum())
        if total != m:
            raise ValueError(f"{name}: group_lens sums to {total} but {rows_of} has M={m} rows")


def _to_device(group_lens, device):
    """Host lens to `device` from pinned memory: a copy from pageable memory would wait for the stream (a host
    sync per call)."""
    if group_lens.device.type == "cpu" and torch.device(device).type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # the graph would replay a reused staging buffer
            raise ValueError("group_lens on the host cannot be captured in a CUDA graph (their values would be "
                             "baked in); pass them as a tensor on the GPU")
        group_lens = group_lens.pin_memory()
    return group_lens.to(device, non_blocking=True)


def group_offsets(group_lens, device, dtype=torch.int64):
    """Cumulative row ends [G] on `device` (what the kernels and torch._grouped_mm take)."""
    return torch.cumsum(_to_device(group_lens, device), 0, dtype=dtype)


def _op_b(b, trans_b):
    return b.transpose(1, 2) if trans_b else b


# ---------------------------------------------------------------------------------------------- loop
def _loop_grouped(a, b, group_lens, trans_b=False):
    bb = _op_b(b, trans_b)
    out = torch.empty((a.shape[0], bb.shape[2]), dtype=a.dtype, device=a.device)
    start = 0
    for g, n in enumerate(group_lens.tolist()):
        if n:
            torch.mm(a[start:start + n], bb[g], out=out[start:start + n])
        start += n
    return out


def _loop_wgrad(a, dc, group_lens, trans_b=False):
    G = group_lens.shape[0]
    K, N = a.shape[1], dc.shape[1]
    db = torch.empty((G, N, K) if trans_b else (G, K, N), dtype=a.dtype, device=a.device)
    start = 0
    for g, n in enumerate(group_lens.tolist()):
        x, y = a[start:start + n], dc[start:start + n]
        if trans_b:
            torch.mm(y.t(), x, out=db[g])
        else:
            torch.mm(x.t(), y, out=db[g])
        start += n
    return db


# --------------------------------------------------------------------------------------------- torch
def _aligned16(t):
    if t.data_ptr() % 16:
        return False
    align = 16 // t.element_size()
    dims = t.shape[-2:]
    strides = t.stride()[-2:]
    # row-major or column-major in the last two dims, the leading stride a multiple of 16 bytes
    if strides[1] == 1 and (strides[0] % align == 0 or dims[0] <= 1) and strides[0] >= max(dims[1], 1):
        return True
    if strides[0] == 1 and (strides[1] % align == 0 or dims[1] <= 1) and strides[1] >= max(dims[0], 1):
        return True
    return False


def _torch_grouped_ok(*tensors):
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm is missing in this torch"
    for t in tensors:
        if not t.is_cuda:
            return "torch._grouped_mm fast path needs CUDA"
        if t.dtype != torch.bfloat16:
            return f"torch._grouped_mm fast path needs bf16, got {t.dtype}"
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return "torch._grouped_mm fast path needs SM90+"
    for t in tensors:
        if not _aligned16(t):
            return f"torch._grouped_mm needs 16-byte aligned row/column-major operands, got shape {tuple(t.shape)} strides {t.stride()}"
    return True


def _torch_grouped(a, b, group_lens, trans_b=False):
    offs = group_offsets(group_lens, a.device, torch.int32)
    return torch._grouped_mm(a, _op_b(b, trans_b), offs=offs, out_dtype=a.dtype)


def _torch_grouped_can(a, b, group_lens, trans_b=False):
    return _torch_grouped_ok(a, _op_b(b, trans_b))


def _torch_wgrad(a, dc, group_lens, trans_b=False):
    offs = group_offsets(group_lens, a.device, torch.int32)
    if trans_b:
        return torch._grouped_mm(dc.t(), a, offs=offs, out_dtype=a.dtype)
    return torch._grouped_mm(a.t(), dc, offs=offs, out_dtype=a.dtype)


def _torch_wgrad_can(a, dc, group_lens, trans_b=False):
    return _torch_grouped_ok(a.t(), dc)


# -------------------------------------------------------------------------------------------- triton
def _triton_grouped(a, b, group_lens, trans_b=False):
    from turbo_dist.kernels import grouped_gemm as kgg

    lens = group_lens if group_lens.device == a.device else _to_device(group_lens, a.device)
    out = torch.empty((a.shape[0], b.shape[1] if trans_b else b.shape[2]), dtype=a.dtype, device=a.device)
    return kgg.grouped_gemm(a, _op_b(b, trans_b), lens, out=out, lens=True)  # the kernel sums the sizes


def _triton_grouped_can(a, b, group_lens, trans_b=False):
    return triton_available(a, b, op="grouped_gemm")


def _triton_wgrad(a, dc, group_lens, trans_b=False):
    from turbo_dist.kernels import grouped_wgrad as kgw

    G = group_lens.shape[0]
    K, N = a.shape[1], dc.shape[1]
    offs = group_offsets(group_lens, a.device)
    if trans_b:
        db = torch.empty((G, N, K), dtype=a.dtype, device=a.device)
        kgw.grouped_wgrad(dc, a, offs, G, out=db)
    else:
        db = torch.empty((G, K, N), dtype=a.dtype, device=a.device)
        kgw.grouped_wgrad(a, dc, offs, G, out=db)
    return db


def _triton_wgrad_can(a, dc, group_lens, trans_b=False):
    return triton_available(a, dc, op="grouped_gemm_wgrad")


dispatcher.register_backend("grouped_gemm", "torch", _torch_grouped, _torch_grouped_can, priority=10)
dispatcher.register_backend("grouped_gemm", "triton", _triton_grouped, _triton_grouped_can, priority=20)
dispatcher.register_backend("grouped_gemm", "loop", _loop_grouped, priority=30)
dispatcher.register_backend("grouped_gemm_wgrad", "torch", _torch_wgrad, _torch_wgrad_can, priority=10)
dispatcher.register_backend("grouped_gemm_wgrad", "triton", _triton_wgrad, _triton_wgrad_can, priority=20)
dispatcher.register_backend("grouped_gemm_wgrad", "loop", _loop_wgrad, priority=30)

# Measured rules (H200, DeepSeek-V3 experts, skewed counts; benchmarks/results/ops_grouped_shuffled_h200.json,
# every backend of a case timed interleaved in a shuffled order). With few tokens per expert our persistent Triton
# kernels beat torch._grouped_mm: at 128 tokens/expert the forward 0.58 vs 0.85 ms (fc1) and 0.33 vs 0.45 (fc2),
# the backward (dgrad: the forward kernel with b transposed, plus the TMA weight-gradient kernel) 1.52 vs 1.75
# and 0.73 vs 0.90; at 256, forward 0.95 vs 1.07 and 0.50 vs 0.56, backward 2.26 vs 2.25 and 1.03 vs 1.14. At
# ~1024 tokens per expert every backend is within a few percent (torch, ours and the per-expert loop at 0.55-0.65
# of peak; ours over torch's: forward 0.93-1.05x, backward 0.97-1.04x, mean 1.00), so torch's kernel, maintained
# upstream, stays the default there. (Runs timed in a rotated order before had favoured ours on the dgrad at
# 1024, see probe_interleave_bias_h200.json for that bias.) The bound is on the average rows per group: 256 for
# a non-transposed b (measured at 256 and 1024 only), 512 (between the measured 256 and 1024) for a transposed b
# (the dgrad of a [G, K, N] weight, a forward on [G, N, K] weights) and the weight gradient.
# One exception at ~1024 tokens per expert, from three shuffled-order runs (ops_grouped_rule512 / _shuffled /
# _choice_h200.json): a forward whose reduction is at least as deep as its output is wide (fc1: K 7168, N 4096)
# over 16 or 32 experts ran faster on ours in all six measurements (mean 1.036x / 1.037x torch's, 0.5-6% per run),
# while at 8 experts torch's was ahead (mean 1.02x) and fc2 (K 2048 < N 7168) stays torch's (ours 0.953x at 32
# experts): up to 1024 rows per group such a forward runs ours (FC1_GROUP_ROWS, FC1_MIN_GROUPS). In two more runs
# with the rule (ops_grouped_fc1rule1 / 2_h200.json) ours was the faster in 3 of the 4 measurements; over all five
# runs 1.033x / 1.027x torch's.
# The rules also need enough work: our Triton launch costs ~65 us of host time (kernel wrapper with offsets
# ready; 93 us before the launch was trimmed) against torch._grouped_mm's ~18 us per call
# (benchmarks/results/probe_host_overhead_h200.json), so below ~64 GFLOP per call (~150 us of GPU time) the
# host would set the pace and torch stays the default.
# On Hopper our CUDA kernel also leads torch's where the output is wider than the reduction (K < N) at ~1024 rows
# per group: the fc2 forward (K 2048, N 7168) 1.01-1.10x in all nine measurements of three runs (G = 8 / 16 / 32;
# ops_grouped_wgmma_h200.json, _wgmma2, _wgmma3), where the Triton kernel does not; fc1's dgrad (b transposed,
# K 4096, N 7168) in all fifteen of four runs and two probes (its backward with torch's weight gradient 1.005-1.05x,
# the dgrad alone 1.03-1.04x; probe_grouped_wgmma_half*_h200.json). Up to WGMMA_WIDE_GROUP_ROWS.
WGMMA_WIDE_GROUP_ROWS = 1024
SMALL_GROUP_ROWS = 256
BWD_GROUP_ROWS = 512
FC1_GROUP_ROWS, FC1_MIN_GROUPS = 1024, 16
TRITON_MIN_FLOP = 64e9


def _grouped_preference(a, b, group_lens, trans_b=False):
    G, k = b.shape[0], a.shape[1]
    n = b.shape[1] if trans_b else b.shape[2]
    if trans_b:
        rows = BWD_GROUP_ROWS
    elif G >= FC1_MIN_GROUPS and k >= n:
        rows = FC1_GROUP_ROWS
    else:
        rows = SMALL_GROUP_ROWS
    if not (a.is_cuda and G > 0 and 2.0 * a.shape[0] * k * n >= TRITON_MIN_FLOP):
        return None
    if a.shape[0] <= rows * G:
        return _ours(a, b, group_lens, trans_b)
    if k < n and a.shape[0] <= WGMMA_WIDE_GROUP_ROWS * G:
        from . import grouped_wgmma

        if grouped_wgmma.preferred(a, b, group_lens, trans_b):
            return "wgmma"
    return None


def _ours(a, b, group_lens, trans_b):
    """Our kernel for inputs the rule gives to ours: the Hopper CUDA kernel (backend "wgmma", grouped_wgmma.py:
    dynamic half tiles, measured ahead of or within 2% of the Triton kernel on these shapes) where it accepts the
    inputs, else the Triton kernel."""
    from . import grouped_wgmma

    return "wgmma" if grouped_wgmma.preferred(a, b, group_lens, trans_b) else "triton"


def _wgrad_preference(a, dc, group_lens, trans_b=False):
    """Our Hopper kernel up to grouped_wgmma.WGRAD_GROUP_ROWS rows per group where it runs, else our Triton kernel up
    to BWD_GROUP_ROWS; torch's above (and below TRITON_MIN_FLOP: launch-bound)."""
    G = group_lens.shape[0]
    if a.is_cuda and G > 0 and 2.0 * a.shape[0] * a.shape[1] * dc.shape[1] >= TRITON_MIN_FLOP:
        from turbo_dist.kernels import grouped_wgrad as kgw

        from . import grouped_wgmma

        if a.shape[0] <= grouped_wgmma.WGRAD_GROUP_ROWS * G and \
                grouped_wgmma.wgrad_preferred(a, dc, group_lens, trans_b):
            return "wgmma"
        if a.shape[0] <= BWD_GROUP_ROWS * G and kgw.wgrad_tma_ok(a, dc):
            return "triton"
    return None


dispatcher.set_preference("grouped_gemm", _grouped_preference)
dispatcher.set_preference("grouped_gemm_wgrad", _wgrad_preference)


def _lens_signature(a, b, group_lens, trans_b=False):
    # Token counts change every step; tune per (shapes of a's K, b, dtype, layout), not per M.
    return (a.shape[1], tuple(b.shape), a.dtype, a.device.type, bool(trans_b), b.is_contiguous())


dispatcher.set_signature("grouped_gemm", _lens_signature)


def _wgrad_signature(a, dc, group_lens, trans_b=False):
    # the same for the weight gradient: M (the tokens) changes every step, the expert shapes do not
    return (a.shape[1], dc.shape[1], group_lens.shape[0], a.dtype, a.device.type, bool(trans_b))


dispatcher.set_signature("grouped_gemm_wgrad", _wgrad_signature)


class _GroupedGemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group_lens, trans_b):
        ctx.save_for_backward(a, b, group_lens)
        ctx.trans_b = trans_b
        return dispatcher.dispatch("grouped_gemm", a, b, group_lens, trans_b)

    @staticmethod
    def backward(ctx, dc):
        a, b, group_lens = ctx.saved_tensors
        dc = dc.to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[0]:  # dA_g = dC_g op(B_g)^T
            da = _grouped_grad(dc, b, group_lens, not ctx.trans_b)
        if ctx.needs_input_grad[1]:  # dB_g = A_g^T dC_g (or its transpose when trans_b)
            db = _GroupedWgradFn.apply(a, dc, group_lens, ctx.trans_b) if torch.is_grad_enabled() else \
                dispatcher.dispatch("grouped_gemm_wgrad", a, dc, group_lens, ctx.trans_b)
        return da, db, None, None


def _grouped_grad(x, w, group_lens, trans_b):
    """A grouped GEMM inside a backward: with create_graph=True (grad mode on there) through grouped_gemm, whose
    result carries its own graph (the gradients of grouped GEMMs are grouped GEMMs and weight gradients, so every
    order of derivative is exact); otherwise straight to the dispatcher."""
    if torch.is_grad_enabled():
        return grouped_gemm(x, w, group_lens, trans_b)
    return dispatcher.dispatch("grouped_gemm", x, w, group_lens, trans_b)


class _GroupedWgradFn(torch.autograd.Function):
    """dB [G, K, N] (trans_b: [G, N, K]) = per group A_g^T dC_g (its transpose), differentiable in A and dC: the
    weight gradient inside a backward with create_graph=True. Its own gradients are grouped GEMMs."""

    @staticmethod
    def forward(ctx, a, dc, group_lens, trans_b):
        ctx.save_for_backward(a, dc, group_lens)
        ctx.trans_b = trans_b
        return dispatcher.dispatch("grouped_gemm_wgrad", a, dc, group_lens, trans_b)

    @staticmethod
    def backward(ctx, ddb):
        a, dc, group_lens = ctx.saved_tensors
        ddb = ddb.to(a.dtype)
        da = ddc = None
        # dB_g = A_g^T dC_g: dA_g = dC_g dB_g'^T, d dC_g = A_g dB_g' (dB' the incoming gradient); with trans_b
        # dB_g = dC_g^T A_g: dA_g = dC_g dB_g', d dC_g = A_g dB_g'^T
        if ctx.needs_input_grad[0]:
            da = _grouped_grad(dc, ddb, group_lens, not ctx.trans_b)
        if ctx.needs_input_grad[1]:
            ddc = _grouped_grad(a, ddb, group_lens, ctx.trans_b)
        return da, ddc, None, None


def grouped_gemm(a, b, group_lens, trans_b=False):
    """Per-group GEMM (MoE experts), differentiable in a and b.

    a: [M, K] fp16/bf16/fp32, rows sorted by group; b: [G, K, N] (or [G, N, K] with trans_b), same dtype and
    device; group_lens: [G] int32/int64 (on a's device or CPU), >= 0, summing to M (checked only when
    group_lens is on the CPU; on the GPU the check would cost a host sync). Zero-length groups are fine.
    Returns [M, N] with out[rows of g] = a[rows of g] @ op(b[g]). Backward gives dA [M, K] and dB per group.
    """
    check_grouped_inputs(a, b, group_lens, trans_b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _GroupedGemmFn.apply(a, b, group_lens, bool(trans_b))
    return dispatcher.dispatch("grouped_gemm", a, b, group_lens, bool(trans_b))
