"""FP8: configs, quantize/dequantize, FP8 GEMM with autograd (the grouped GEMM is in fp8_grouped.py).

    cfg = Float8QuantConfig(format=Format.E4M3, granularity=ScalingGranularity.ROWWISE)
    y = gemm_fp8(x, w, trans_b=True, config=cfg)                  # x [M, K] bf16, w [N, K] bf16
    y = grouped_gemm_fp8(x, w_experts, group_lens, config=cfg)    # w_experts [G, K, N] (fp8_grouped.py)

Scales are fp32 dequantization factors (x ~= x_q * scale), computed from amax (just-in-time scaling).
Every operand is quantized along the GEMM's contraction dim:
  TENSORWISE: one scale per tensor (per expert for grouped weights);
  ROWWISE:    one scale per row of A and per column of B (per expert);
  BLOCKWISE:  1 x block_size blocks for activations/gradients, block_size x block_size for weights
              (the `b` operand of gemm_fp8 / grouped_gemm_fp8).
Formats: E4M3 (everything E4M3), E5M2 (everything E5M2), HYBRID (E4M3 forward, E5M2 gradients).

Ops behind the dispatcher: "quantize_fp8" (torch | triton), "scaled_mm" (torch: torch._scaled_mm,
tensorwise/rowwise and, where the local cuBLAS supports it, blockwise | triton | reference); the grouped
GEMM ("grouped_scaled_mm", `grouped_gemm_fp8`) is in fp8_grouped.py.
Each op's default order (the first backend that accepts the inputs runs) is the `priority` at its
register_backend call, with the measurement that set it next to it; set_backend / TURBO_DIST_<OP>_BACKEND
override it."""
import contextlib
import enum
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatcher
from ._autograd import first_order_only
from .gemm import check_gemm_inputs, triton_available

log = logging.getLogger("turbo_dist")

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_EPS = 1e-12


class Format(enum.Enum):
    E4M3 = "e4m3"
    E5M2 = "e5m2"
    HYBRID = "hybrid"  # E4M3 forward, E5M2 gradients


class ScalingGranularity(enum.Enum):
    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    BLOCKWISE = "blockwise"


@dataclass(frozen=True)
class Float8QuantConfig:
    """How gemm_fp8 / grouped_gemm_fp8 quantize.

    format: Format.E4M3 | E5M2 | HYBRID; granularity: ScalingGranularity.TENSORWISE | ROWWISE | BLOCKWISE;
    block_size: BLOCKWISE block edge (only 128 is supported: 1x128 activations, 128x128 weights);
    fast_accum: let the forward FP8 GEMM skip periodic fp32 promotion (cuBLAS `use_fast_accum`; the
    gradients' GEMMs always promote).
    """

    format: Format = Format.E4M3
    granularity: ScalingGranularity = ScalingGranularity.TENSORWISE
    block_size: int = 128
    fast_accum: bool = False

    def __post_init__(self):
        if not isinstance(self.format, Format):
            raise TypeError(f"Float8QuantConfig.format must be a Format, got {self.format!r}")
        if not isinstance(self.granularity, ScalingGranularity):
            raise TypeError(f"Float8QuantConfig.granularity must be a ScalingGranularity, got {self.granularity!r}")
        if self.granularity == ScalingGranularity.BLOCKWISE and self.block_size != 128:
            raise NotImplementedError(f"BLOCKWISE supports block_size=128 only, got {self.block_size}")

    @property
    def fwd_dtype(self):
        return E5M2 if self.format == Format.E5M2 else E4M3

    @property
    def grad_dtype(self):
        return E4M3 if self.format == Format.E4M3 else E5M2


def _describe(t):
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ------------------------------------------------------------------------------------ quantization
_MODE = {"tensor": 0, "row": 1, "1xb": 2, "bxb": 3}


def _quant_torch(x, fp8_dtype, mode, block_size=128, scale=None):
    fmax = torch.finfo(fp8_dtype).max
    batched = x.dim() == 3
    x3 = (x if batched else x.unsqueeze(0)).float()
    E, R, C = x3.shape
    B = block_size
    if mode == "tensor":
        if scale is None:
            amax = x3.abs().amax(dim=(1, 2)) if x3.numel() else torch.zeros(E, device=x.device)
            scale = torch.clamp(amax, min=_EPS) / fmax
        s = scale.reshape(E).float()
        q = (x3 / s[:, None, None]).clamp(-fmax, fmax).to(fp8_dtype).contiguous()
        return (q, s) if batched else (q[0], s)
    if mode == "row":
        amax = x3.abs().amax(dim=2, keepdim=True) if C else torch.zeros(E, R, 1, device=x.device)
        s = torch.clamp(amax, min=_EPS) / fmax
        q = (x3 / s).clamp(-fmax, fmax).to(fp8_dtype)
    elif mode == "1xb":
        nc = -(-C // B)
        xp = F.pad(x3, (0, nc * B - C)).view(E, R, nc, B)
        s = torch.clamp(xp.abs().amax(dim=3), min=_EPS) / fmax
        q = (xp / s[..., None]).clamp(-fmax, fmax).view(E, R, nc * B)[:, :, :C].to(fp8_dtype)
    elif mode == "bxb":
        nr, nc = -(-R // B), -(-C // B)
        xp = F.pad(x3, (0, nc * B - C, 0, nr * B - R)).view(E, nr, B, nc, B)
        s = torch.clamp(xp.abs().amax(dim=(2, 4)), min=_EPS) / fmax
        q = (xp / s[:, :, None, :, None]).clamp(-fmax, fmax).view(E, nr * B, nc * B)[:, :R, :C].to(fp8_dtype)
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    q = q.contiguous()
    return (q, s) if batched else (q[0], s[0])


def _quant_triton(x, fp8_dtype, mode, block_size=128, scale=None):
    from turbo_dist.kernels import fp8_quant

    return fp8_quant.quantize(x, fp8_dtype, _MODE[mode], block_size, scale)


def _quant_triton_can(x, fp8_dtype, mode, block_size=128, scale=None):
    return triton_available(x, op="quantize_fp8")


dispatcher.register_backend("quantize_fp8", "triton", _quant_triton, _quant_triton_can, priority=10)
dispatcher.register_backend("quantize_fp8", "torch", _quant_torch, priority=20)


def _mode_of(granularity, weight):
    if granularity == ScalingGranularity.TENSORWISE:
        return "tensor"
    if granularity == ScalingGranularity.ROWWISE:
        return "row"
    return "bxb" if weight else "1xb"


def quantize_fp8(x, dtype=E4M3, granularity=ScalingGranularity.TENSORWISE, block_size=128, weight=False):
    """Quantize x [R, C] (or a batch [E, R, C], e.g. expert weights) along its last dim C.

    dtype: torch.float8_e4m3fn or torch.float8_e5m2. Returns (x_q row-major fp8, scale fp32) with x ~= x_q * scale:
    TENSORWISE scale [1] ([E] for a batch); ROWWISE [R, 1]; BLOCKWISE [R, cdiv(C, 128)] (1 x 128 blocks) or,
    with weight=True, [cdiv(R, 128), cdiv(C, 128)] (128 x 128 blocks); a batch adds a leading [E].
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"quantize_fp8: x must be a 2-D or 3-D tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantize_fp8: x must be fp16/bf16/fp32, got {x.dtype}")
    if dtype not in (E4M3, E5M2):
        raise TypeError(f"quantize_fp8: dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    if not isinstance(granularity, ScalingGranularity):
        raise TypeError(f"quantize_fp8: granularity must be a ScalingGranularity, got {granularity!r}")
    _check_block_size(block_size, granularity, "quantize_fp8")
    return dispatcher.dispatch("quantize_fp8", x, dtype, _mode_of(granularity, weight), block_size)


def _check_block_size(block_size, granularity, name):
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
    if granularity == ScalingGranularity.BLOCKWISE and block_size != 128:
        raise NotImplementedError(f"{name}: BLOCKWISE supports block_size=128 only, got {block_size!r}")


_WEIGHT_CACHE = None  # {key: (weakref to the base tensor, its _version, (w_q, scale))} inside cache_fp8_weights


@contextlib.contextmanager
def cache_fp8_weights():
    """Quantize each weight once while the block runs: `gemm_fp8` / `grouped_gemm_fp8` reuse the FP8 copy (and
    scales) of their weight operand `b`, per layout (forward and dA quantize it along different dims), in
    every later call of the block, e.g. all micro-batches of one training step, forward and backward:

        with turbo_dist.ops.cache_fp8_weights():
            for micro_batch in batches:
                model(micro_batch).sum().backward()
        optimizer.step()

    Just-in-time weight quantization otherwise costs about what the FP8 GEMM saves over bf16 (README,
    Benchmarks). An entry is reused only for the same tensor object (held by a weak reference), storage
    address, shape, strides, format and granularity, and only while its version counter is unchanged, so an
    in-place update through autograd-visible ops is seen; writes that bypass the counter (`w.data.copy_(...)`,
    as some optimizers do) are not: update weights outside the block. Holds one FP8 copy of each weight per
    layout (about a bf16 copy's bytes for forward + backward) until the block exits. Nests (the outermost
    block owns the cache); one cache per process."""
    global _WEIGHT_CACHE
    outer = _WEIGHT_CACHE is None
    if outer:
        _WEIGHT_CACHE = {}
    try:
        yield
    finally:
        if outer:
            _WEIGHT_CACHE = None


def quantize_weight(w, dtype, granularity, weight=True):
    """quantize_fp8(w, dtype, granularity, weight=weight), reused inside cache_fp8_weights()."""
    cache = _WEIGHT_CACHE
    if cache is None:
        return quantize_fp8(w, dtype, granularity, weight=weight)
    base = w._base if w._base is not None else w
    key = (id(base), w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, dtype, granularity, weight)
    hit = cache.get(key)
    if hit is not None and hit[0]() is base and hit[1] == base._version:
        return hit[2]
    q = quantize_fp8(w, dtype, granularity, weight=weight)
    cache[key] = (weakref.ref(base), base._version, q)
    return q


def dequantize_fp8(x_q, scale, granularity=ScalingGranularity.TENSORWISE, block_size=128, weight=False,
                   out_dtype=torch.float32):
    """Inverse of quantize_fp8 (same scale layout): returns x_q * scale in out_dtype."""
    if not isinstance(x_q, torch.Tensor) or x_q.dim() not in (2, 3) or x_q.dtype not in (E4M3, E5M2):
        raise TypeError(f"dequantize_fp8: x_q must be a 2-D or 3-D fp8 tensor, got {_describe(x_q)}")
    if not isinstance(granularity, ScalingGranularity):
        raise TypeError(f"dequantize_fp8: granularity must be a ScalingGranularity, got {granularity!r}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"dequantize_fp8: scale must be an fp32 tensor, got {_describe(scale)}")
    _check_block_size(block_size, granularity, "dequantize_fp8")
    batched = x_q.dim() == 3
    q = (x_q if batched else x_q.unsqueeze(0)).float()
    E, R, C = q.shape
    rb, cb = -(-R // block_size), -(-C // block_size)
    per = {"tensor": 1, "row": R, "1xb": R * cb, "bxb": rb * cb}[_mode_of(granularity, weight)]
    if scale.numel() != E * per:
        raise ValueError(f"dequantize_fp8: {granularity.name} (weight={weight}) of x_q {tuple(x_q.shape)} needs the "
                         f"scale quantize_fp8 returned ({E * per} elements), got {tuple(scale.shape)}")
    s = scale if batched or granularity == ScalingGranularity.TENSORWISE else scale.unsqueeze(0)
    B = block_size
    mode = _mode_of(granularity, weight)
    if mode == "tensor":
        out = q * s.reshape(E, 1, 1)
    elif mode == "row":
        out = q * s.reshape(E, R, 1)
    elif mode == "1xb":
        out = q * s.repeat_interleave(B, dim=2)[:, :, :C]
    else:
        out = q * s.repeat_interleave(B, dim=1)[:, :R].repeat_interleave(B, dim=2)[:, :, :C]
    out = out.to(out_dtype)
    return out if batched else out[0]


# -------------------------------------------------------------------------------- scaled matmuls
# scaled_mm(a_q [M, K], b_q [K, N] view, scale_a, scale_b, mode, out_dtype, fast_accum) with scales from
# quantizing a along K and b^T along K (so scale_b is the transpose of what quantize_fp8 returned):
#   "tensor": [1], [1]; "row": [M, 1], [1, N]; "block": [M, K/128], [K/128, N/128] (128x128 b) or [K/128, N].
_MODES_KERNEL = {"tensor": 1, "row": 2, "block": 3}


def _sb_n(b_q, scale_b):
    return 1 if (scale_b.shape[-1] == b_q.shape[-1] and b_q.shape[-1] > 1) else 128


def _reference_scaled_mm(a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum=False):
    M, K = a_q.shape
    N = b_q.shape[1]
    a = a_q.float()
    b = b_q.float()
    if mode == "block":
        a = a * scale_a.repeat_interleave(128, dim=1)[:, :K]
        sbn = _sb_n(b_q, scale_b)
        b = b * scale_b.repeat_interleave(128, dim=0)[:K].repeat_interleave(sbn, dim=1)[:, :N]
        return (a @ b).to(out_dtype)
    return ((a @ b) * scale_a.reshape(-1, 1) * scale_b.reshape(1, -1)).to(out_dtype)


def _triton_scaled_mm(a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum=False):
    from turbo_dist.kernels import fp8_gemm

    return fp8_gemm.scaled_mm(a_q, b_q, scale_a, scale_b, _MODES_KERNEL[mode], out_dtype=out_dtype,
                              sb_n=_sb_n(b_q, scale_b))


def _triton_scaled_can(a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum=False):
    return triton_available(a_q, b_q, op="scaled_mm")


_PROBES = {}


def _capturing(device):
    """A probe launches kernels and reads results back: not while a CUDA graph is being captured (nothing is
    cached then; the next call outside capture probes)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _torch_blockwise_supported(device):
    """(ok, reason): whether torch._scaled_mm does 1x128 x 128x128 blockwise scaling here (cuBLASLt >= 12.9 on
    SM90). Probed once per device on a small problem and checked against the reference, never assumed."""
    key = ("block", str(device))
    if key not in _PROBES and _capturing(device):
        return False, "not probed during CUDA graph capture"
    if key not in _PROBES:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(256, 512, device=device, generator=g)
            b = torch.randn(512, 256, device=device, generator=g)
            aq, sa = _quant_torch(a, E4M3, "1xb")
            bq, sb = _quant_torch(b.t(), E4M3, "bxb")
            out = _torch_scaled_mm(aq, bq.t(), sa, sb.t(), "block", torch.bfloat16)
            ref = _reference_scaled_mm(aq, bq.t(), sa, sb.t(), "block", torch.float32)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            _PROBES[key] = (err < 1e-2, f"wrong results (relative error {err:.3g})" if err >= 1e-2 else "")
        except torch.OutOfMemoryError:  # says nothing about support: not cached, probed again next time
            return False, "probe ran out of GPU memory"
        except Exception as exc:  # older cuBLAS / torch: not supported
            _PROBES[key] = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        if not _PROBES[key][0]:
            log.info("turbo_dist: torch._scaled_mm blockwise not used on %s: %s", device, _PROBES[key][1])
    return _PROBES[key]


def _block_scales_for_cublas(scale_a, scale_b):
    """Blockwise scales in the layouts cuBLASLt takes through torch._scaled_mm: scale_a [M, kb] M-contiguous
    (outer-dim-major); scale_b [kb, nb] with kb contiguous and its leading dimension padded to a multiple of 4
    (16-byte aligned rows of scale_b^T, as newer torch checks; equal to kb when kb % 4 == 0)."""
    m, kb_a = scale_a.shape
    m_major = scale_a.stride(0) == 1 and (kb_a == 1 or scale_a.stride(1) == m)  # exactly (1, M): a row slice of
    sa = scale_a if m_major else scale_a.t().contiguous().t()                   # an M-major [M', kb] is not
    kb, nb = scale_b.shape
    ld = -(-kb // 4) * 4
    if scale_b.stride(0) == 1 and (nb == 1 or scale_b.stride(1) == ld):
        return sa, scale_b
    if ld == kb:
        return sa, scale_b.t().contiguous().t()
    buf = torch.zeros(nb, ld, dtype=scale_b.dtype, device=scale_b.device)
    buf[:, :kb] = scale_b.t()
    return sa, buf[:, :kb].t()


def _torch_scaled_mm(a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum=False):
    if mode == "tensor":
        sa, sb = scale_a.reshape(()), scale_b.reshape(())
    elif mode == "row":
        sa, sb = scale_a.reshape(-1, 1), scale_b.reshape(1, -1)
    else:
        sa, sb = _block_scales_for_cublas(scale_a, scale_b)
    return torch._scaled_mm(a_q, b_q, sa, sb, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _torch_scaled_can(a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum=False):
    if not (a_q.is_cuda and b_q.is_cuda):
        return "torch._scaled_mm needs CUDA"
    if torch.cuda.get_device_capability(a_q.device) < (8, 9):
        return "torch._scaled_mm needs SM89+"
    if a_q.dtype == E5M2 and b_q.dtype == E5M2:
        return "torch._scaled_mm does not multiply e5m2 by e5m2"
    M, K = a_q.shape
    N = b_q.shape[1]
    if K % 16 or N % 16 or M % 16:
        return f"torch._scaled_mm needs M, K, N multiples of 16, got {M}, {K}, {N}"
    if a_q.stride(1) != 1 or b_q.stride(0) != 1:
        return "torch._scaled_mm needs a row-major and b column-major"
    if mode == "row" and out_dtype != torch.bfloat16:
        return "torch._scaled_mm rowwise needs a bf16 output"
    if mode == "block":
        if _sb_n(b_q, scale_b) != 128 or K % 512 or N % 128:
            return "torch._scaled_mm blockwise here only for 1x128 x 128x128 with K a multiple of 512, N of 128"
        ok, why = _torch_blockwise_supported(a_q.device)
        if not ok:
            return f"torch._scaled_mm blockwise is not supported by this torch/cuBLAS ({why})"
    return True


dispatcher.register_backend("scaled_mm", "torch", _torch_scaled_mm, _torch_scaled_can, priority=10)
dispatcher.register_backend("scaled_mm", "triton", _triton_scaled_mm, _triton_scaled_can, priority=20)
dispatcher.register_backend("scaled_mm", "reference", _reference_scaled_mm, priority=90)


def check_fp8_operands(what, out_dtype, **tensors):
    """Tensors where tensors are due and an output dtype torch._scaled_mm can write (bf16, fp16, fp32)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{what}: out_dtype must be bf16, fp16 or fp32, got {out_dtype}")


def scaled_mm(a_q, b_q, scale_a, scale_b, out_dtype=torch.bfloat16, granularity=None, fast_accum=False):
    """FP8 GEMM on already-quantized operands: (a_q * scale_a) @ (b_q * scale_b) -> [M, N] out_dtype.

    a_q: [M, K] fp8; b_q: [K, N] fp8 (best as the transpose of a row-major [N, K], as torch._scaled_mm);
    scales fp32, granularity inferred from their shapes unless given: TENSORWISE [1] and [1]; ROWWISE [M, 1]
    and [1, N]; BLOCKWISE [M, cdiv(K,128)] and [cdiv(K,128), cdiv(N,128)] (128x128 b) or [cdiv(K,128), N].
    """
    check_fp8_operands("scaled_mm", a_q=a_q, b_q=b_q, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[0]:
        raise ValueError(f"scaled_mm: need a_q [M, K] and b_q [K, N], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if a_q.dtype not in (E4M3, E5M2) or b_q.dtype not in (E4M3, E5M2):
        raise TypeError(f"scaled_mm: operands must be fp8 (e4m3fn/e5m2), got {a_q.dtype} and {b_q.dtype}")
    if a_q.device != b_q.device or scale_a.device != a_q.device or scale_b.device != a_q.device:
        raise ValueError("scaled_mm: operands and scales must be on one device")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        raise TypeError(f"scaled_mm: scales must be fp32, got {scale_a.dtype} and {scale_b.dtype}")
    M, K = a_q.shape
    N = b_q.shape[1]
    if granularity is not None and not isinstance(granularity, ScalingGranularity):
        raise TypeError(f"scaled_mm: granularity must be a ScalingGranularity or None, got {granularity!r}")
    if granularity is None:
        if scale_a.numel() == 1 and scale_b.numel() == 1:
            granularity = ScalingGranularity.TENSORWISE
        elif scale_a.numel() == M and scale_b.numel() == N:
            granularity = ScalingGranularity.ROWWISE
        else:
            granularity = ScalingGranularity.BLOCKWISE
    mode = {"TENSORWISE": "tensor", "ROWWISE": "row", "BLOCKWISE": "block"}[granularity.name]
    kb = -(-K // 128)
    expect = {"tensor": ((1,), (1,)), "row": ((M,), (N,)), "block": ((M, kb), None)}[mode]
    if mode != "block":
        if scale_a.numel() != expect[0][0] or scale_b.numel() != expect[1][0]:
            raise ValueError(f"scaled_mm {mode}: scales must have {expect[0][0]} and {expect[1][0]} elements, "
                             f"got {tuple(scale_a.shape)} and {tuple(scale_b.shape)}")
    elif tuple(scale_a.shape) != (M, kb) or tuple(scale_b.shape) not in ((kb, -(-N // 128)), (kb, N)):
        raise ValueError(f"scaled_mm blockwise: scale_a must be [{M}, {kb}] and scale_b [{kb}, {-(-N // 128)}] "
                         f"or [{kb}, {N}], got {tuple(scale_a.shape)} and {tuple(scale_b.shape)}")
    return dispatcher.dispatch("scaled_mm", a_q, b_q, scale_a, scale_b, mode, out_dtype, fast_accum)


# ----------------------------------------------------------------------------------------- autograd
def _fp8_mm(x, y, x_dtype, y_dtype, gran, y_weight, out_dtype, fast_accum=False):
    """x [M, K] @ y [K, N] in FP8: x quantized along K (1x128 if blockwise), y^T along K (128x128 if y_weight)."""
    xq, sx = quantize_fp8(x, x_dtype, gran)
    if y_weight:  # reused inside cache_fp8_weights()
        yq, sy = quantize_weight(y.t(), y_dtype, gran)  # [N, K] row-major
    else:
        yq, sy = quantize_fp8(y.t(), y_dtype, gran)
    return scaled_mm(xq, yq.t(), sx, sy.t(), out_dtype=out_dtype, granularity=gran, fast_accum=fast_accum)


class _GemmFp8Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, trans_a, trans_b, out_dtype, config):
        A = a.t() if trans_a else a
        B = b.t() if trans_b else b
        ctx.save_for_backward(a, b)
        ctx.args = (trans_a, trans_b, config)
        return _fp8_mm(A, B, config.fwd_dtype, config.fwd_dtype, config.granularity, True, out_dtype, config.fast_accum)

    @staticmethod
    @first_order_only("turbo_dist.ops.gemm_fp8")
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        trans_a, trans_b, cfg = ctx.args
        A = a.t() if trans_a else a
        B = b.t() if trans_b else b
        gran = cfg.granularity
        da = db = None
        if ctx.needs_input_grad[0]:  # dA = dC B^T; the weight B keeps 128x128 blocks
            dA = _fp8_mm(dc, B.t(), cfg.grad_dtype, cfg.fwd_dtype, gran, True, a.dtype)
            da = dA.t() if trans_a else dA
        if ctx.needs_input_grad[1]:  # dB = A^T dC; contraction over tokens, 1x128 blocks on both
            dB = _fp8_mm(A.t(), dc, cfg.fwd_dtype, cfg.grad_dtype, gran, False, b.dtype)
            db = dB.t() if trans_b else dB
        return da, db, None, None, None, None


def gemm_fp8(a, b, trans_a=False, trans_b=False, out_dtype=None, config=None):
    """C = op(a) @ op(b) computed in FP8 (quantized just in time per `config`), differentiable.

    a: [M, K] (or [K, M] with trans_a) activations; b: [K, N] (or [N, K] with trans_b) weights; fp16/bf16/fp32,
    same dtype and device. out_dtype defaults to a.dtype. config: Float8QuantConfig (default E4M3 tensorwise).
    Gradients are quantized with config.grad_dtype (E5M2 for HYBRID/E5M2, else E4M3).
    """
    config = config or Float8QuantConfig()
    if not isinstance(config, Float8QuantConfig):
        raise TypeError(f"gemm_fp8: config must be a Float8QuantConfig, got {type(config).__name__}")
    check_gemm_inputs(a, b, trans_a, trans_b, out_dtype)
    out_dtype = out_dtype or a.dtype
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _GemmFp8Fn.apply(a, b, bool(trans_a), bool(trans_b), out_dtype, config)
    A = a.t() if trans_a else a
    B = b.t() if trans_b else b
    return _fp8_mm(A, B, config.fwd_dtype, config.fwd_dtype, config.granularity, True, out_dtype, config.fast_accum)
