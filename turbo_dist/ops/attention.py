"""Attention on [B, S, H, D] with GQA, returning the log-sum-exp (LSE) that context parallelism needs.

Functional kernels (what CP's ring calls block by block):
    o, lse = attention_forward(q, k, v, causal, softmax_scale)          # lse: [B, Hq, Sq] float32
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, causal, softmax_scale)
and the autograd entry `attention(q, k, v, causal, softmax_scale, return_lse)`.

Causal masks align bottom-right (query i sees keys j <= i + Sk - Sq), which is top-left when
Sq == Sk. A query row with no visible key gets o = 0 and lse = -inf.
Backends register with the dispatcher under ops "attention_fwd" and "attention_bwd";
"reference" (fp32 math in PyTorch, any device) is always there.
"""
import math

import torch

from . import dispatcher


def check_attention_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention supports fp16, bf16 and fp32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    b, sq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} (batch, head_dim)")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA")


def default_scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def causal_mask(sq, sk, device):
    """Bool [sq, sk], True where query i may attend key j (bottom-right aligned)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[2], dim=2) if t.shape[2] != hq else t


def reference_forward(q, k, v, causal=False, softmax_scale=None):
    scale = default_scale(q, softmax_scale)
    hq = q.shape[2]
    qf, kf, vf = q.float(), _expand_kv(k, hq).float(), _expand_kv(v, hq).float()
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = torch.nan_to_num(p, nan=0.0)
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return o.to(q.dtype), lse


def reference_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    scale = default_scale(q, softmax_scale)
    hq, hkv = q.shape[2], k.shape[2]
    qf, kf, vf = q.float(), _expand_kv(k, hq).float(), _expand_kv(v, hq).float()
    dof, of = do.float(), o.float()
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    p = torch.nan_to_num(torch.exp(s - lse.float().unsqueeze(-1)), nan=0.0)
    p = torch.where(torch.isinf(lse).unsqueeze(-1), torch.zeros_like(p), p)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dof)
    dp = torch.einsum("bqhd,bkhd->bhqk", dof, vf)
    delta = (dof * of).sum(-1).transpose(1, 2)  # [B, H, Sq]
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale
    if hkv != hq:
        g = hq // hkv
        b, sk, _, d = dk.shape
        dk = dk.view(b, sk, hkv, g, d).sum(3)
        dv = dv.view(b, sk, hkv, g, d).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


dispatcher.register_backend("attention_fwd", "reference", reference_forward, priority=100)
dispatcher.register_backend("attention_bwd", "reference", reference_backward, priority=100)


def attention_forward(q, k, v, causal=False, softmax_scale=None):
    """o [B, Sq, Hq, D] (q's dtype), lse [B, Hq, Sq] float32."""
    check_attention_inputs(q, k, v)
    return dispatcher.dispatch("attention_fwd", q, k, v, causal, softmax_scale)


def attention_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    """dq, dk, dv (dk/dv summed over each kv head's query group)."""
    check_attention_inputs(q, k, v)
    if do.shape != q.shape:
        raise ValueError(f"grad of output {tuple(do.shape)} does not match q {tuple(q.shape)}")
    return dispatcher.dispatch("attention_bwd", do, q, k, v, o, lse, causal, softmax_scale)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        o, lse = attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=False, softmax_scale=None, return_lse=False):
    """Differentiable attention: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> o (, lse [B, Hq, Sq] fp32)."""
    check_attention_inputs(q, k, v)
    o, lse = _Attention.apply(q, k, v, causal, softmax_scale)
    return (o, lse) if return_lse else o
