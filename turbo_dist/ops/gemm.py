"""Dense GEMM: `gemm(a, b, trans_a, trans_b, out_dtype)` behind the dispatcher (op "gemm"), with autograd.

Backends: "torch" (torch.mm / cuBLAS; any device) and "triton" (kernels/gemm.py; CUDA, or CPU under
TRITON_INTERPRET=1 in fp16/fp32). The default order puts the faster one first on the H100 (see
benchmarks/results/bench_ops_h100.json); TURBO_DIST_GEMM_BACKEND or dispatcher.set_backend overrides.
"""
import functools
import logging

import torch

from . import dispatcher

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WARNED_OUT_DTYPE = False
log = logging.getLogger("turbo_dist")


def check_gemm_inputs(a, b, trans_a, trans_b, out_dtype=None):
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
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gemm: out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
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
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as exc:  # torch without mm(out_dtype=): same math, upcast first
            global _WARNED_OUT_DTYPE
            if not _WARNED_OUT_DTYPE:
                _WARNED_OUT_DTYPE = True
                log.info("gemm(torch): torch.mm(out_dtype=float32) unavailable (%s); upcasting the inputs", exc)
    return torch.mm(a.float(), b.float()).to(out_dtype)


def triton_available(*tensors, op=None):
    """True or the reason our Triton kernels cannot run `op` on these tensors.

    CUDA: always. CPU: only under TRITON_INTERPRET=1, in fp16/fp32, and only when the caller asked for
    the "triton" backend of `op` (set_backend or TURBO_DIST_<OP>_BACKEND): the interpreter is a
    correctness tool, orders of magnitude slower than the torch/loop/reference backends the CPU
    default uses otherwise.
    """
    from turbo_dist.kernels.gemm import interpreting

    devs = {t.device.type for t in tensors}
    if devs == {"cuda"}:
        return True
    if devs == {"cpu"} and interpreting():
        if any(t.dtype == torch.bfloat16 for t in tensors):
            return "the Triton interpreter mishandles bf16 on CPU"
        if op is not None and not dispatcher.asked_for(op, "triton"):
            return "on CPU the Triton interpreter runs only when the 'triton' backend is asked for"
        return True
    return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got devices {sorted(devs)}"


def _triton_gemm(a, b, trans_a=False, trans_b=False, out_dtype=None):
    from turbo_dist.kernels import gemm as kgemm

    return kgemm.gemm(a.t() if trans_a else a, b.t() if trans_b else b, out_dtype=out_dtype)


def _triton_can_handle(a, b, trans_a=False, trans_b=False, out_dtype=None):
    return triton_available(a, b, op="gemm")


dispatcher.register_backend("gemm", "torch", _torch_gemm, priority=10)
dispatcher.register_backend("gemm", "triton", _triton_gemm, _triton_can_handle, priority=20)


class _GemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, trans_a, trans_b, out_dtype):
        ctx.save_for_backward(a, b)
        ctx.trans = (trans_a, trans_b)
        return dispatcher.dispatch("gemm", a, b, trans_a, trans_b, out_dtype)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        trans_a, trans_b = ctx.trans
        dc = dc.to(a.dtype)
        da = db = None
        # create_graph=True (grad mode on here): the same products through gemm(), whose results carry their own
        # graph; a GEMM's gradients are GEMMs, so every order of derivative is exact on every backend. Otherwise
        # straight to the dispatcher.
        mm = gemm if torch.is_grad_enabled() else functools.partial(dispatcher.dispatch, "gemm")
        # C = op(a) op(b): d op(a) = dC op(b)^T, d op(b) = op(a)^T dC; a transposed operand gets the transpose.
        if ctx.needs_input_grad[0]:
            if trans_a:
                da = mm(b, dc, trans_b, True, None)
            else:
                da = mm(dc, b, False, not trans_b, None)
        if ctx.needs_input_grad[1]:
            if trans_b:
                db = mm(dc, a, True, trans_a, None)
            else:
                db = mm(a, dc, not trans_a, False, None)
        return da, db, None, None, None


def gemm(a, b, trans_a=False, trans_b=False, out_dtype=None):
    """C = op(a) @ op(b), differentiable in a and b.

    a: [M, K] (or [K, M] with trans_a), b: [K, N] (or [N, K] with trans_b), fp16/bf16/fp32, same dtype and
    device, any strides. out_dtype: output dtype (default a.dtype); accumulation is fp32. Returns [M, N].
    """
    check_gemm_inputs(a, b, trans_a, trans_b, out_dtype)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _GemmFn.apply(a, b, bool(trans_a), bool(trans_b), out_dtype)
    return dispatcher.dispatch("gemm", a, b, trans_a, trans_b, out_dtype)
