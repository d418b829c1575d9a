"""Shared pieces of turbo_dist.tp: input checks, layout helpers, GEMM calls, algorithm choice."""
import logging

import torch

from turbo_dist.ops import dispatcher
from turbo_dist.ops import ScalingGranularity
from turbo_dist.ops import gemm as _ops_gemm
from turbo_dist.ops import scaled_mm as _ops_scaled_mm
from turbo_dist.runtime import config

log = logging.getLogger("turbo_dist")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
ALGOS = ("auto", "ring", "direct", "collective")


# ----------------------------------------------------------------------------------------- checks
def check_tensor(t, name, ndim_min=None, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def normalize_dim(dim, ndim, name):
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D input")
    return dim % ndim


def check_same_device(rt, tensors):
    for name, t in tensors:
        rt.check_tensor(t, name)


def check_reduce_op(reduce_op):
    if reduce_op not in ("sum", "avg"):
        raise ValueError(f"reduce_op must be 'sum' or 'avg', got {reduce_op!r}")


def check_algo(algo):
    algo = algo or config.env_str("TURBO_DIST_TP_ALGO", "auto")
    if algo not in ALGOS:
        raise ValueError(f"algo (or TURBO_DIST_TP_ALGO) must be one of {ALGOS}, got {algo!r}")
    return algo


# ---------------------------------------------------------------------------------------- layouts
def to_rows(x, dim):
    """Move `dim` to the front and flatten to a contiguous 2-D [rows, last] matrix."""
    moved = x.movedim(dim, 0)
    return moved.reshape(-1, x.shape[-1]).contiguous(), list(moved.shape[:-1])


def from_rows(t, leading, dim):
    """Inverse of `to_rows` for a result whose rows are laid out as `leading` (first entry = dim)."""
    return t.view(*leading, t.shape[-1]).movedim(0, dim)


def gathered_from_rows(t, world_size, shard_leading, dim):
    """A gathered [W * rows, n] matrix (rank-major) back to the input layout, `dim` grown W times.

    shard_leading: the shard's leading dims after moving `dim` first (as returned by `to_rows`).
    """
    return t.view(world_size, *shard_leading, t.shape[-1]).flatten(0, 1).movedim(0, dim)


# ------------------------------------------------------------------------------------------ GEMMs
def _as_gemm_operand(b):
    """(b2, trans_b): pass column-major B (e.g. weight.t()) as its row-major transpose, no copy."""
    if b.dim() == 2 and b.shape[0] > 1 and b.shape[1] > 1 and b.stride(0) == 1 and b.stride(1) == b.shape[0]:
        return b.t(), True
    return b, False


def gemm(a, b, out_dtype=None):
    """a [M, K] @ b [K, N] through turbo_dist.ops.gemm."""
    b2, trans_b = _as_gemm_operand(b)
    return _ops_gemm(a, b2, trans_b=trans_b, out_dtype=out_dtype)


def gemm_into(a, b, out):
    """out[...] = a @ b. With the torch GEMM backend it writes in place (same cuBLAS call, no extra
    copy); with any other backend the dispatcher's result is copied into `out`."""
    b2, trans_b = _as_gemm_operand(b)
    if out.dtype == a.dtype and a.dtype == b.dtype:
        backend = dispatcher.choose("gemm", a, b2, False, trans_b, None)
        if backend.name == "torch":
            dispatcher._OPS["gemm"].last = "torch"
            torch.mm(a, b, out=out)
            return out
    out.copy_(_ops_gemm(a, b2, trans_b=trans_b, out_dtype=out.dtype))
    return out


# -------------------------------------------------------------------------------------- FP8 GEMMs
def check_fp8(t, name):
    if t.dtype not in FP8_DTYPES:
        raise TypeError(f"{name} must be FP8 ({', '.join(map(str, FP8_DTYPES))}), got {t.dtype}")


def check_scale(t, name):
    """A dequantization scale: an fp32 tensor (torch._scaled_mm's rule, applied on every device)."""
    check_tensor(t, name)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (a dequantization scale), got {t.dtype}")


def check_fp8_pair(a, b, name):
    """The FP8 operand pairs the GPU GEMMs take: e5m2 x e5m2 has no tensor-core GEMM (cuBLAS refuses it)."""
    if a.dtype == b.dtype == torch.float8_e5m2:
        raise NotImplementedError(f"{name}: float8_e5m2 x float8_e5m2 is not supported (no such GEMM on the GPU); "
                                  "quantize one operand to float8_e4m3fn")


def check_b_scale(b_scale, n, name):
    """b_scale: tensor-wise (one element) or per output column ([1, N] or [N])."""
    check_scale(b_scale, name)
    if b_scale.numel() == 1:
        return b_scale.reshape(1, 1).float()
    if b_scale.numel() == n and (b_scale.dim() == 1 or (b_scale.dim() == 2 and b_scale.shape[0] == 1)):
        return b_scale.reshape(1, n).float()
    raise ValueError(f"{name} must have 1 element (tensor-wise) or shape [1, {n}] (per column), "
                     f"got {tuple(b_scale.shape)}")


def scaled_mm_reference(a, b, a_scale, b_scale, out_dtype):
    """(a * a_scale) @ (b * b_scale) in fp32, cast to out_dtype: the CPU path and the test reference.

    a [M, K] fp8, b [K, N] fp8, a_scale [M, 1] or [1, 1] fp32, b_scale [1, N] or [1, 1] fp32.
    """
    return ((a.float() * a_scale.float()) @ (b.float() * b_scale.float())).to(out_dtype)


def scaled_mm(a, b, a_scale, b_scale, out_dtype, use_fast_accum=False):
    """FP8 GEMM with dequantization scales.

    CUDA: turbo_dist.ops.scaled_mm (its dispatcher picks torch._scaled_mm / cuBLASLt or the Triton
    kernel; B is passed column-major, as cuBLASLt wants, transposing a row-major B once). A mix of a
    tensor-wise and a per-row/per-column scale is expanded to row-wise. CPU:
    `scaled_mm_reference` (dequantize, then an fp32 matmul; the Triton FP8 kernel would only run in
    the slow interpreter there).
    """
    if a.device.type != "cuda":
        return scaled_mm_reference(a, b, a_scale, b_scale, out_dtype)
    if not (b.stride(0) == 1 and b.stride(1) == b.shape[0]):
        b = b.t().contiguous().t()
    a_scale = a_scale.float()
    b_scale = b_scale.float()
    if a_scale.numel() == 1 and b_scale.numel() == 1:
        gran = ScalingGranularity.TENSORWISE
        a_scale, b_scale = a_scale.reshape(1), b_scale.reshape(1)
    else:
        gran = ScalingGranularity.ROWWISE
        a_scale = a_scale.reshape(-1, 1).expand(a.shape[0], 1).contiguous()
        b_scale = b_scale.reshape(1, -1).expand(1, b.shape[1]).contiguous()
    return _ops_scaled_mm(a.contiguous(), b, a_scale, b_scale, out_dtype=out_dtype, granularity=gran,
                          fast_accum=use_fast_accum)


# ------------------------------------------------------------------------------ algorithm choice
def direct_max_bytes():
    """Shards below TURBO_DIST_TP_DIRECT_BYTES (default 2 MiB) use the one-shot `direct` order."""
    return config.env_int("TURBO_DIST_TP_DIRECT_BYTES", 2 << 20)


def choose_algo(rt, algo, chunk_bytes, chunk_rows):
    """Which implementation runs: 'collective', 'ring' (per-peer chunks, each GEMM as its rows land)
    or 'direct' (all peer copies at once, then one GEMM: small, latency-bound sizes)."""
    algo = check_algo(algo)
    peer_ok = rt.has_peer_access and rt.device.type == "cuda" and rt.comm_stream is not None
    if algo in ("ring", "direct") and not peer_ok:
        raise ValueError(
            f"algo={algo!r} needs peer access to symmetric memory (CUDA with TURBO_DIST_SHMEM=torch); this "
            f"group has shmem backend {rt.shmem_backend!r} on {rt.device}: use algo='collective' or 'auto'")
    # The pipelines' flag epochs are host counters: a CUDA graph would replay one call's epochs, whose flags are
    # already raised (no wait, peers' data not there yet). NCCL collectives capture fine.
    capturing = peer_ok and torch.cuda.is_current_stream_capturing()
    if capturing and algo in ("ring", "direct"):
        raise NotImplementedError(
            f"async TP: algo={algo!r} (symmetric-memory pipeline) cannot be captured in a CUDA graph; capture "
            "with algo='collective' (or 'auto', which takes it while capturing)")
    if algo == "auto":
        if capturing and not _LOGGED_CAPTURE:
            _LOGGED_CAPTURE.append(True)
            log.info("turbo_dist.tp: captured in a CUDA graph: 'auto' runs the collective path (NCCL) while "
                     "capturing; the symmetric-memory pipelines cannot be replayed")
        if not peer_ok or capturing:
            algo = "collective"
        elif chunk_bytes < direct_max_bytes() or chunk_rows < 128:
            algo = "direct"
        else:
            algo = "ring"
    _LAST[0] = algo
    return algo


_LAST = [None]
_LOGGED_CAPTURE = []


def last_algo():
    """The implementation the last async-TP call of this process ran ('ring', 'direct' or 'collective';
    None before any call): what 'auto' picked, for logs and benches."""
    return _LAST[0]
