"""Dense GEMM: `gemm(a, b, trans_a, trans_b, out_dtype)` behind the dispatcher (op "gemm")."""
import torch

from . import dispatcher

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_gemm_inputs(a, b, trans_a, trans_b):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gemm: {name} must be fp16, bf16 or fp32, got {t.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: a is {a.dtype} but b is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"gemm: a is on {a.device} but b is on {b.device}")
    k_a = a.shape[0] if trans_a else a.shape[1]
    k_b = b.shape[1] if trans_b else b.shape[0]
    if k_a != k_b:
        raise ValueError(
            f"gemm: inner dimensions differ: a {tuple(a.shape)} (trans_a={trans_a}) vs b {tuple(b.shape)} (trans_b={trans_b})"
        )


def _torch_gemm(a, b, trans_a=False, trans_b=False, out_dtype=None):
    a = a.t() if trans_a else a
    b = b.t() if trans_b else b
    out_dtype = out_dtype or a.dtype
    if out_dtype == a.dtype:
        return torch.mm(a, b)
    if a.is_cuda and out_dtype == torch.float32 and hasattr(torch, "mm") and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:
            pass
    return torch.mm(a.float(), b.float()).to(out_dtype)


dispatcher.register_backend("gemm", "torch", _torch_gemm, priority=10)


def gemm(a, b, trans_a=False, trans_b=False, out_dtype=None):
    """C = op(a) @ op(b): a [M, K] (or [K, M] with trans_a), b [K, N] (or [N, K] with trans_b) -> [M, N]."""
    check_gemm_inputs(a, b, trans_a, trans_b)
    return dispatcher.dispatch("gemm", a, b, trans_a, trans_b, out_dtype)
