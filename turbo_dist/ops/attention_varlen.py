"""Packed variable-length sequences (flash-attn's varlen layout), ops "attention_varlen_fwd"/"_bwd"
(backends "triton" and "reference"):
    o, lse = varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal, softmax_scale)                      # lse: [Hq, Tq] float32
    dq, dk, dv = varlen_attention_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, causal, softmax_scale)
and the autograd entry `varlen_attention(...)`. q: [Tq, Hq, D], k/v: [Tk, Hkv, D]; sequence b is rows
cu_seqlens[b]:cu_seqlens[b+1]; causal masks align bottom-right within each sequence, as in attention.py.
"""
import numbers

import torch

from . import dispatcher
from ._autograd import first_order_only
from ._host import host_values
from .attention import (PRIORITY, _check_grad_inputs, _triton_reason, check_attention_inputs, default_scale,
                        reference_backward, reference_forward)


_CU_DTYPES = (torch.int32, torch.int64)


def _check_cu_seqlens(cu, name, total, device, end_hint="", host=None):
    """cu: [B+1] int32/int64 on `device`, 0 = cu[0] <= cu[1] <= ... <= cu[B] = total. Returns it as a list
    (`host`: its values as the caller already holds them on the host, checked instead of reading cu back)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    if cu.dtype not in _CU_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be [num_seqs + 1] with num_seqs >= 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q on {device}")
    if host is None:
        # the checks below must run before any kernel: one small device->host copy per state of cu (the same
        # tensor passed to every layer is read back once, _host.memo)
        vals = list(host_values(cu))
    else:
        vals = [int(x) for x in host]
        if len(vals) != cu.shape[0]:
            raise ValueError(f"{name}: the host copy of its values has {len(vals)} entries, the tensor {cu.shape[0]}")
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    bad = next((i for i in range(1, len(vals)) if vals[i] < vals[i - 1]), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, got {name}[{bad - 1}] = {vals[bad - 1]} > "
                         f"{name}[{bad}] = {vals[bad]}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {vals[-1]}{end_hint}")
    return vals


def _check_max_seqlen(max_seqlen, name, vals):
    real = max(b - a for a, b in zip(vals[:-1], vals[1:]))
    if max_seqlen is None:
        return real
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{name} must be an int (or None), got {type(max_seqlen).__name__}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < real:
        raise ValueError(f"{name} = {max_seqlen} is below the longest sequence in cu_seqlens ({real})")
    return max_seqlen


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                        total_q=None, total_k=None, end_hint="", return_cu=False, host_cu=None):
    """Validates packed q [Tq, Hq, D], k/v [Tk, Hkv, D] and their cu_seqlens (total_q/total_k: the packed
    lengths cu_seqlens must end at, default Tq/Tk; context parallelism passes the global ones, and an
    `end_hint` for the error when they do not). Returns (max_seqlen_q, max_seqlen_k), the real maxima where
    None was given; with return_cu also the cu_seqlens as host lists (read once, here). host_cu: (values of
    cu_seqlens_q, of cu_seqlens_k) that the caller made the tensors from and still holds on the host (a plan
    made once per batch, used by every layer): checked in place of the tensors' values, which are not read back
    (no device sync); the tensors' dtype, shape and device are still checked."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim] (packed), got shape {tuple(t.shape)}")
    check_attention_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    hq, hk = (None, None) if host_cu is None else host_cu
    vq = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0] if total_q is None else total_q, q.device,
                           end_hint, hq)
    vk = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0] if total_k is None else total_k, q.device,
                           end_hint, hk)
    if len(vq) != len(vk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(vq) - 1} and {len(vk) - 1}")
    maxima = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", vq), _check_max_seqlen(max_seqlen_k, "max_seqlen_k", vk)
    return (*maxima, vq, vk) if return_cu else maxima


def _seq_ranges(cu_q, cu_k):
    vq, vk = host_values(cu_q), host_values(cu_k)
    return [(vq[i], vq[i + 1], vk[i], vk[i + 1]) for i in range(len(vq) - 1)]


def reference_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                             causal=False, softmax_scale=None):
    """reference_forward sequence by sequence: o [Tq, Hq, D], lse [Hq, Tq] fp32."""
    scale = default_scale(q, softmax_scale)
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for a, b, c, d in _seq_ranges(cu_seqlens_q, cu_seqlens_k):
        if b > a and d > c:  # an empty key sequence leaves o = 0, lse = -inf
            o_s, lse_s = reference_forward(q[None, a:b], k[None, c:d], v[None, c:d], causal, scale)
            o[a:b], lse[:, a:b] = o_s[0], lse_s[0]
    return o, lse


def reference_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, softmax_scale=None):
    """reference_backward sequence by sequence: dq [Tq, Hq, D], dk/dv [Tk, Hkv, D]."""
    scale = default_scale(q, softmax_scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c, d in _seq_ranges(cu_seqlens_q, cu_seqlens_k):
        if b > a and d > c:
            g = reference_backward(do[None, a:b], q[None, a:b], k[None, c:d], v[None, c:d], o[None, a:b],
                                   lse[None, :, a:b], causal, scale)
            dq[a:b], dk[c:d], dv[c:d] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def triton_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                          causal=False, softmax_scale=None):
    from turbo_dist.kernels.flash_attn import flash_attn_varlen_forward

    return flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, default_scale(q, softmax_scale))


def triton_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           causal=False, softmax_scale=None):
    from turbo_dist.kernels.flash_attn import flash_attn_varlen_backward

    return flash_attn_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                      default_scale(q, softmax_scale))


# No aten varlen backend: PyTorch's fused varlen kernels are not tested on our GPUs yet.
PRIORITY["attention_varlen_fwd"] = {"triton": 40, "reference": 100}
PRIORITY["attention_varlen_bwd"] = {"triton": 40, "reference": 100}


def _register_varlen():
    fwd_p, bwd_p = PRIORITY["attention_varlen_fwd"], PRIORITY["attention_varlen_bwd"]
    dispatcher.register_backend("attention_varlen_fwd", "reference", reference_varlen_forward,
                                priority=fwd_p["reference"])
    dispatcher.register_backend("attention_varlen_bwd", "reference", reference_varlen_backward,
                                priority=bwd_p["reference"])
    dispatcher.register_backend("attention_varlen_fwd", "triton", triton_varlen_forward, priority=fwd_p["triton"],
                                can_handle=lambda q, k, v, *a, **kw: _triton_reason("attention_varlen_fwd", q, k, v))
    dispatcher.register_backend("attention_varlen_bwd", "triton", triton_varlen_backward, priority=bwd_p["triton"],
                                can_handle=lambda do, q, k, v, *a, **kw:
                                    _triton_reason("attention_varlen_bwd", q, k, v))


_register_varlen()


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                             causal=False, softmax_scale=None):
    """o [Tq, Hq, D] (q's dtype), lse [Hq, Tq] float32 (-inf for rows that see no key).

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] packed (Hq % Hkv == 0), fp16/bf16/fp32; cu_seqlens_q/_k: [B+1]
    int32/int64 on q's device, 0, non-decreasing, ending at Tq/Tk (empty sequences allowed);
    max_seqlen_q/_k: None or an int >= the longest sequence.
    """
    max_seqlen_q, max_seqlen_k = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k)
    return dispatcher.dispatch("attention_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal, softmax_scale)


def varlen_attention_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, softmax_scale=None):
    """dq [Tq, Hq, D], dk/dv [Tk, Hkv, D] from the given o [Tq, Hq, D] and lse [Hq, Tq] fp32."""
    max_seqlen_q, max_seqlen_k = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k)
    do = _check_grad_inputs(do, q, o, lse, (q.shape[1], q.shape[0]), "[Hq, Tq]")
    return dispatcher.dispatch("attention_varlen_bwd", do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, causal, softmax_scale)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
        o, lse = dispatcher.dispatch("attention_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, softmax_scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @first_order_only("turbo_dist.ops.varlen_attention")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.args
        do = do.contiguous()
        if do.dtype != q.dtype:
            do = do.to(q.dtype)
        dq, dk, dv = dispatcher.dispatch("attention_varlen_bwd", do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k,
                                         causal, scale)
        return dq, dk, dv, None, None, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     softmax_scale=None, return_lse=False):
    """Differentiable packed attention: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> o [Tq, Hq, D] (, lse [Hq, Tq] fp32).
    Inputs as in varlen_attention_forward (validated here, once, before any kernel)."""
    max_seqlen_q, max_seqlen_k = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k)
    o, lse = _VarlenAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                    softmax_scale)
    return (o, lse) if return_lse else o
