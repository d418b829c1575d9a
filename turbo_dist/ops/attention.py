"""Attention on [B, S, H, D] with GQA, returning the log-sum-exp (LSE) that context parallelism needs.

Functional kernels (what CP's ring calls block by block):
    o, lse = attention_forward(q, k, v, causal, softmax_scale)          # lse: [B, Hq, Sq] float32
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, causal, softmax_scale)
and the autograd entry `attention(q, k, v, causal, softmax_scale, return_lse)`.

Causal masks align bottom-right (query i sees keys j <= i + Sk - Sq), which is top-left when
Sq == Sk. A query row with no visible key gets o = 0 and lse = -inf.
Backends register with the dispatcher under ops "attention_fwd" and "attention_bwd";
"reference" (fp32 math in PyTorch, any device) is always there.
Packed variable-length sequences: ops/attention_varlen.py.
"""
import functools
import math
import numbers

import torch

from . import dispatcher
from ._autograd import first_order_only


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
    if d == 0:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k / v {tuple(k.shape)} do not match q {tuple(q.shape)} (batch, head_dim)")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA")


def default_scale(q, softmax_scale):
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) and \
            not (isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() == 1):
        raise TypeError(f"softmax_scale must be a number (or None: 1/sqrt(head_dim)), got {softmax_scale!r}")
    return float(softmax_scale)


def causal_mask(sq, sk, device):
    """Bool [sq, sk], True where query i may attend key j (bottom-right aligned)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[2], dim=2) if t.shape[2] != hq else t


def _without_autocast(fn):
    """The reference backends compute in fp32 whatever autocast says: its lower-precision list has einsum, so under
    torch.autocast the forward computed in bf16 and returned a bf16 lse, which the backward then refused."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if dev not in ("cpu", "cuda"):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)
    return run


@_without_autocast
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


@_without_autocast
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


# ------------------------------------------------------------------------------- SDPA backends
# PyTorch's fused kernels through the aten ops that return the LSE. All take fp16/bf16 CUDA tensors
# with head_dim % 8 == 0; each backward uses the (o, lse) it is given, so the global (merged) ones
# of a context-parallel ring give exact gradients.
_SDPA_DTYPES = (torch.float16, torch.bfloat16)
# Backends whose kernel reads a kv head per query group itself (flash, cuDNN: torch's SDPA routes
# GQA to them without repeating kv); the efficient kernel gets kv repeated per query head (and dk/dv
# summed back over the group).
_NATIVE_GQA = {"flash": True, "cudnn": True, "efficient": False}
# Causal masks with Sq < Sk: flash and efficient align bottom-right (efficient by its mask type 2);
# cuDNN's SDPA op aligns top-left, so it does not take them. Causal with Sq > Sk runs everywhere:
# the first Sq - Sk rows see no key and the rest is square (see _skip_empty_rows).
_CAUSAL_SQ_LT_SK = {"flash": True, "cudnn": False, "efficient": True}
_MAX_HEAD_DIM = {"flash": 256, "cudnn": 128, "efficient": 256}


_SDP_SWITCH = {"cudnn": ("cudnn_sdp_enabled", "enable_cudnn_sdp"), "flash": ("flash_sdp_enabled", "enable_flash_sdp"),
               "efficient": ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp")}


def _sdp_enabled(name):
    """PyTorch's own switch for SDPA backend `name` (torch.backends.cuda.enable_*_sdp; on where torch has none)."""
    return bool(getattr(torch.backends.cuda, _SDP_SWITCH[name][0], lambda: True)())


def _torch_sdpa_gates():
    """PyTorch's SDPA switches and deterministic mode: part of the attention ops' choice key, so a choice cached
    before a switch changed is not reused."""
    return (*(_sdp_enabled(name) for name in _SDP_SWITCH), torch.are_deterministic_algorithms_enabled())


def _sdpa_reason(name, q, k, v, causal):
    """True, or why backend `name` cannot run these inputs."""
    if not q.is_cuda:
        return f"{name} needs CUDA tensors, got {q.device}"
    if not _sdp_enabled(name):
        return f"{name} SDPA is switched off (torch.backends.cuda.{_SDP_SWITCH[name][1]}(False))"
    if name == "cudnn" and torch.are_deterministic_algorithms_enabled():
        return "cudnn attention is not deterministic (torch.use_deterministic_algorithms(True)), as PyTorch rules"
    if torch.version.hip is not None and name == "cudnn":
        return "cudnn attention is CUDA-only"
    if q.dtype not in _SDPA_DTYPES:
        return f"{name} takes fp16/bf16, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > _MAX_HEAD_DIM[name]:
        return f"{name} takes head_dim % 8 == 0 and <= {_MAX_HEAD_DIM[name]}, got {d}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"{name} needs sm80+"
    if causal and q.shape[1] < k.shape[1] and not _CAUSAL_SQ_LT_SK[name]:
        return f"{name} aligns causal masks top-left: no causal Sq < Sk (got {q.shape[1]} vs {k.shape[1]})"
    if min(q.shape[1], k.shape[1]) == 0 or q.shape[0] == 0:
        return f"{name} does not take empty sequences"
    if name == "cudnn":
        if k.shape[1] == 1:
            return "cudnn does not take a key sequence of length 1"
        if max(q.shape[0], q.shape[2]) > 65535:
            return f"cudnn takes batch and heads <= 65535, got {q.shape[0]} and {q.shape[2]}"
    if name == "flash" and not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    return True


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kv_for(name, t, hq):
    return t if _NATIVE_GQA[name] else _expand_kv(t, hq)


def _sum_groups(dt, hkv):
    b, s, hq, d = dt.shape
    return dt if hq == hkv else dt.view(b, s, hkv, hq // hkv, d).sum(3)


def _empty_rows(q, k, causal):
    """Causal with Sq > Sk: the first Sq - Sk query rows see no key."""
    return max(0, q.shape[1] - k.shape[1]) if causal else 0


def _fix_empty_fwd(o, lse, n):
    # Our contract for rows without keys (o = 0, lse = -inf), whatever the fused kernel's convention.
    if n:
        o[:, :n] = 0
        lse[:, :, :n] = float("-inf")
    return o, lse


def _lse_for_bwd(lse, n):
    # Fused backwards compute p = exp(s - lse): +inf makes rows without keys contribute nothing.
    lse = lse.float()
    if n:
        lse = lse.clone()
        lse[:, :, :n] = float("inf")
    return lse.contiguous()


def _skip_empty_rows(fwd, bwd):
    """Causal with Sq > Sk: rows [0, Sq - Sk) see no key (o = 0, lse = -inf, dq = 0) and rows from
    Sq - Sk on form a square causal problem, where top-left and bottom-right masks agree. Runs the
    kernels on those rows only: cuDNN's top-left mask becomes exact, and the efficient kernel's
    bottom-right mask (wrong for Sq > Sk on the torch builds we measured) is not needed."""
    def forward(q, k, v, causal=False, softmax_scale=None):
        n = _empty_rows(q, k, causal)
        if not n:
            return fwd(q, k, v, causal, softmax_scale)
        b, sq, hq, _ = q.shape
        o_t, lse_t = fwd(q[:, n:], k, v, causal, default_scale(q, softmax_scale))
        o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        o[:, n:] = o_t
        lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        lse[:, :, n:] = lse_t
        return o, lse

    def backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
        n = _empty_rows(q, k, causal)
        if not n:
            return bwd(do, q, k, v, o, lse, causal, softmax_scale)
        dq_t, dk, dv = bwd(do[:, n:], q[:, n:], k, v, o[:, n:], lse[:, :, n:], causal,
                           default_scale(q, softmax_scale))
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dq[:, n:] = dq_t
        return dq, dk, dv

    return forward, backward


def flash_forward(q, k, v, causal=False, softmax_scale=None):
    sq, sk = q.shape[1], k.shape[1]
    hq = q.shape[2]
    out = torch.ops.aten._flash_attention_forward(
        _last_contig(q), _last_contig(_kv_for("flash", k, hq)), _last_contig(_kv_for("flash", v, hq)),
        None, None, sq, sk, 0.0, bool(causal), False, scale=default_scale(q, softmax_scale))
    return _fix_empty_fwd(out[0], out[1], _empty_rows(q, k, causal))


def flash_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    sq, sk = q.shape[1], k.shape[1]
    hq, hkv = q.shape[2], k.shape[2]
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device).view(torch.uint64)
    unused = torch.zeros((), dtype=torch.int64, device=q.device).view(torch.uint64)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do.contiguous(), _last_contig(q), _last_contig(_kv_for("flash", k, hq)),
        _last_contig(_kv_for("flash", v, hq)), o.to(q.dtype).contiguous(), _lse_for_bwd(lse, _empty_rows(q, k, causal)),
        None, None, sq, sk, 0.0,
        bool(causal), rng_state, unused, scale=default_scale(q, softmax_scale))
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


def cudnn_forward(q, k, v, causal=False, softmax_scale=None):
    b, sq, hq, _ = q.shape
    kt = _last_contig(_kv_for("cudnn", k, hq)).transpose(1, 2)
    vt = _last_contig(_kv_for("cudnn", v, hq)).transpose(1, 2)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _last_contig(q).transpose(1, 2), kt, vt, None, True, 0.0, bool(causal), False, scale=default_scale(q, softmax_scale))
    o = out[0].transpose(1, 2)
    return (o if o.is_contiguous() else o.contiguous()), out[1].reshape(b, hq, sq)


def cudnn_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do.contiguous().transpose(1, 2), _last_contig(q).transpose(1, 2),
        _last_contig(_kv_for("cudnn", k, hq)).transpose(1, 2), _last_contig(_kv_for("cudnn", v, hq)).transpose(1, 2),
        o.to(q.dtype).contiguous().transpose(1, 2),
        lse.float().contiguous().view(b, hq, sq, 1), seed, offset, None, None, None, sq, sk, 0.0, bool(causal),
        scale=default_scale(q, softmax_scale))
    dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


def _efficient_mask_type(q, k, causal):
    # xformers' custom mask types: 0 none, 1 causal from top-left, 2 causal from bottom-right
    return 0 if not causal else (1 if q.shape[1] == k.shape[1] else 2)


def efficient_forward(q, k, v, causal=False, softmax_scale=None):
    sq, hq = q.shape[1], q.shape[2]
    out = torch.ops.aten._efficient_attention_forward(
        _last_contig(q), _last_contig(_kv_for("efficient", k, hq)), _last_contig(_kv_for("efficient", v, hq)),
        None, None, None, None, None, 0.0, _efficient_mask_type(q, k, causal), True,
        scale=default_scale(q, softmax_scale))
    # its lse rows are padded to a multiple of 32
    return _fix_empty_fwd(out[0], out[1][:, :, :sq].contiguous(), _empty_rows(q, k, causal))


def efficient_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    sq, hq = q.shape[1], q.shape[2]
    sk, hkv = k.shape[1], k.shape[2]
    lse = _lse_for_bwd(lse, _empty_rows(q, k, causal))
    pad = (-sq) % 32
    if pad:
        lse = torch.nn.functional.pad(lse, (0, pad))
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._efficient_attention_backward(
        do.contiguous(), _last_contig(q), _last_contig(_kv_for("efficient", k, hq)),
        _last_contig(_kv_for("efficient", v, hq)), None, o.to(q.dtype).contiguous(), None, None, sq, sk, lse.contiguous(),
        0.0, seed, offset, _efficient_mask_type(q, k, causal), False, scale=default_scale(q, softmax_scale))
    dq, dk, dv = grads[:3]
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


# --------------------------------------------------------------------------------- our Triton kernel
def _triton_reason(op, q, k, v):
    try:
        from turbo_dist.kernels import flash_attn
    except ImportError as exc:  # no triton on this install
        return f"triton unavailable: {exc}"
    if q.shape[-1] > flash_attn.MAX_HEAD_DIM:
        return f"triton flash attention takes head_dim <= {flash_attn.MAX_HEAD_DIM}, got {q.shape[-1]}"
    if q.is_cuda:
        return True
    if q.device.type != "cpu" or not flash_attn.interpreting():
        return f"triton flash attention runs on CUDA, or on CPU under TRITON_INTERPRET=1 (got {q.device})"
    if q.dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bf16; use fp16/fp32 on CPU"
    # On CPU the interpreter is a test vehicle, far slower than the reference: only when named.
    return True if dispatcher.asked_for(op, "triton") else "triton on CPU (interpreter) runs only when chosen explicitly"


def triton_forward(q, k, v, causal=False, softmax_scale=None):
    from turbo_dist.kernels.flash_attn import flash_attn_forward

    return flash_attn_forward(q, k, v, causal, default_scale(q, softmax_scale))


def triton_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    from turbo_dist.kernels.flash_attn import flash_attn_backward

    return flash_attn_backward(do, q, k, v, o, lse, causal, default_scale(q, softmax_scale))


# Default order per op (lower first), from benchmarks/bench_ops_attention.py on an H100 (torch 2.11,
# cuDNN 9.19), bf16, D=128, causal, B=4, S=4096..16384, MHA and GQA 32/8
# (benchmarks/results/ops_attention_h100.json): cuDNN is the fastest forward and backward everywhere
# (fwd+bwd 4.14 ms at S=4096 vs flash 6.66, triton 6.16, efficient 14.1); flash takes what cuDNN
# refuses (causal Sq < Sk, head_dim > 128). Forward and backward are chosen separately: each
# backward takes (o, lse) as given, so any forward pairs with any backward.
PRIORITY = {
    "attention_fwd": {"cudnn": 10, "flash": 20, "efficient": 30, "triton": 40, "reference": 100},
    "attention_bwd": {"cudnn": 10, "flash": 20, "efficient": 30, "triton": 40, "reference": 100},
}
_SDPA = {"flash": (flash_forward, flash_backward), "cudnn": _skip_empty_rows(cudnn_forward, cudnn_backward),
         "efficient": _skip_empty_rows(efficient_forward, efficient_backward)}


def _register():
    fwd_p, bwd_p = PRIORITY["attention_fwd"], PRIORITY["attention_bwd"]
    dispatcher.register_backend("attention_fwd", "reference", reference_forward, priority=fwd_p["reference"])
    dispatcher.register_backend("attention_bwd", "reference", reference_backward, priority=bwd_p["reference"])
    for name, (fwd, bwd) in _SDPA.items():
        dispatcher.register_backend(
            "attention_fwd", name, fwd, priority=fwd_p[name],
            can_handle=lambda q, k, v, causal=False, softmax_scale=None, _n=name: _sdpa_reason(_n, q, k, v, causal))
        dispatcher.register_backend(
            "attention_bwd", name, bwd, priority=bwd_p[name],
            can_handle=lambda do, q, k, v, o, lse, causal=False, softmax_scale=None, _n=name:
                _sdpa_reason(_n, q, k, v, causal))
    dispatcher.register_backend("attention_fwd", "triton", triton_forward, priority=fwd_p["triton"],
                                can_handle=lambda q, k, v, *a, **kw: _triton_reason("attention_fwd", q, k, v))
    dispatcher.register_backend("attention_bwd", "triton", triton_backward, priority=bwd_p["triton"],
                                can_handle=lambda do, q, k, v, *a, **kw: _triton_reason("attention_bwd", q, k, v))
    for op in ("attention_fwd", "attention_bwd"):
        dispatcher.set_choice_key(op, lambda *a, **kw: _torch_sdpa_gates())


_register()


def attention_forward(q, k, v, causal=False, softmax_scale=None):
    """o [B, Sq, Hq, D] (q's dtype), lse [B, Hq, Sq] float32.

    q: [B, Sq, Hq, D], k/v: [B, Sk, Hkv, D] (Hq % Hkv == 0), fp16/bf16/fp32, one device.
    """
    check_attention_inputs(q, k, v)
    return dispatcher.dispatch("attention_fwd", q, k, v, causal, softmax_scale)


def attention_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None):
    """dq, dk, dv (dk/dv summed over each kv head's query group).

    do/o: [B, Sq, Hq, D]; lse: [B, Hq, Sq] fp32. The gradients use this o and lse as given (under
    context parallelism: the merged output and global lse), never a recomputed forward.
    """
    check_attention_inputs(q, k, v)
    b, sq, hq, _ = q.shape
    do = _check_grad_inputs(do, q, o, lse, (b, hq, sq), "[B, Hq, Sq]")
    return dispatcher.dispatch("attention_bwd", do, q, k, v, o, lse, causal, softmax_scale)


def _check_grad_inputs(do, q, o, lse, lse_shape, lse_layout):
    """The backward's extra inputs against q: do and o shaped like q, lse floating [lse_shape], all on q's
    device. Returns do in q's dtype."""
    for name, t in (("grad of output", do), ("o", o)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape:
            raise ValueError(f"{name} {tuple(getattr(t, 'shape', ()))} does not match q {tuple(q.shape)}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(lse_shape):
        raise ValueError(f"lse must be {lse_layout} = {tuple(lse_shape)}, got {tuple(getattr(lse, 'shape', ()))}")
    if lse.dtype != torch.float32:  # a bf16 / fp16 lse costs the gradients 2-3 digits
        raise TypeError(f"lse must be float32 (what the forward returns), got {lse.dtype}")
    if not o.is_floating_point():
        raise TypeError(f"o must be the forward's floating-point output, got {o.dtype}")
    for name, t in (("do", do), ("o", o), ("lse", lse)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return do.to(q.dtype) if do.dtype != q.dtype else do


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        o, lse = attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @first_order_only("turbo_dist.ops.attention")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=False, softmax_scale=None, return_lse=False):
    """Differentiable attention: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> o (, lse [B, Hq, Sq] fp32)."""
    check_attention_inputs(q, k, v)
    o, lse = _Attention.apply(q, k, v, causal, softmax_scale)
    return (o, lse) if return_lse else o
