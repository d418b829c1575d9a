"""ring-flash-attn's functions on turbo_dist's context parallelism: code written for `ring_flash_attn` runs by
changing the import (`from turbo_dist.cp.ring_flash_attn import zigzag_ring_flash_attn_func`).

Same names, signatures, layouts and returns as ring-flash-attn (zhuzilin/ring-flash-attention):
- `ring_flash_attn_func` (+ `_kvpacked_`, `_qkvpacked_`): q/k/v [B, S/W, H, D], rank r holding the contiguous
  chunk r of the sequence; `turbo_dist.cp.context_parallel_attention(..., cp_comm_type="ring",
  load_balance=False)`.
- `zigzag_ring_flash_attn_func` (+ packed forms): rank r holding chunks r and 2W-1-r of 2W (`load_balance=True`,
  the layout of `turbo_dist.cp.shard`).
- `zigzag_ring_flash_attn_varlen_func` (+ packed forms): packed q/k/v [T/W, H, D], every sequence cut into 2W
  chunks, rank r holding chunks r and 2W-1-r of each, sequence after sequence (Megatron's THD layout,
  `turbo_dist.cp.shard_packed`); `ring_flash_attn_varlen_func` (+ packed forms): every sequence cut into W
  chunks, rank r holding chunk r of each. `cu_seqlens` / `max_seqlen` are ring-flash-attn's LOCAL ones (each
  local length is the global one / W).
kvpacked: kv [..., 2, H, D]; qkvpacked: qkv [..., 3, H, D] (dense: [B, S/W, 3, H, D], varlen: [T/W, 3, H, D]).
GQA (fewer k/v heads) is allowed; `group=None` is the default process group; `return_attn_probs=True` returns
(out, softmax_lse, None) as ring-flash-attn does: lse fp32 [B, H, S/W] for the dense functions, [H, T/W] (flat,
flash-attn's 2-D varlen lse, as ring-flash-attn returns with such flash-attn versions) for the varlen ones. The zigzag
functions also take causal=False (ring-flash-attn asserts causal). window_size=(-1, 0) with causal=True is the
causal mask. Gradients flow to q, k, v (or the packed tensor).

Refused with NotImplementedError (never ignored): dropout_p != 0, another sliding window, alibi_slopes,
deterministic=True (as turbo_dist.ops.flash_attn_func); the stripe layouts, the llama3 functions and the HF adapter
(`substitute_hf_flash_attn`, `update_ring_flash_attn_params`): importable, refused when called.
"""
import torch

from . import _packed_attention, context_parallel_attention


def _refuse_unsupported(dropout_p, window_size, alibi_slopes, deterministic, causal):
    from turbo_dist.ops import _unsupported_flash_args

    if causal and tuple(window_size) == (-1, 0):  # flash-attn's causal window: the causal mask itself
        window_size = (-1, -1)
    _unsupported_flash_args(dropout_p, window_size, None, alibi_slopes, deterministic, False)


def _dense(q, k, v, load_balance, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
           return_attn_probs, group):
    _refuse_unsupported(dropout_p, window_size, alibi_slopes, deterministic, causal)
    out = context_parallel_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cp_group=group,
                                     cp_comm_type="ring", load_balance=load_balance,
                                     return_lse=bool(return_attn_probs))
    return (out[0], out[1], None) if return_attn_probs else out


def _varlen_ring(q, k, v, cu_seqlens, max_seqlen, zigzag, dropout_p, softmax_scale, causal, window_size,
                 alibi_slopes, deterministic, return_attn_probs, group):
    _refuse_unsupported(dropout_p, window_size, alibi_slopes, deterministic, causal)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError(f"cu_seqlens must be a 1-D tensor [B+1], got "
                        f"{tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be this rank's packed tokens [T/W, heads, head_dim], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    end = int(cu_seqlens[-1])
    if end != q.shape[0]:
        raise ValueError(f"cu_seqlens are this rank's LOCAL ones (ring-flash-attn's): they must end at q.shape[0] = "
                         f"{q.shape[0]}, got {end}" + (" (the global ones? divide them by the group size)"
                                                       if end > q.shape[0] else ""))
    import torch.distributed as dist

    w = dist.get_world_size(group)
    cu_global = cu_seqlens * w  # each rank holds 1/W of every sequence
    max_global = None if max_seqlen is None else int(max_seqlen) * w
    o, lse = _packed_attention(q, k, v, bool(causal), softmax_scale, group, "ring", zigzag, 2, cu_global, cu_global,
                               max_global, max_global, want_lse=bool(return_attn_probs), split=not zigzag)
    return (o, lse, None) if return_attn_probs else o


def _unpack(t, n, name, dim):
    if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != n:
        raise ValueError(f"{name} must have {n} at dim {dim} ({'q, k, v' if n == 3 else 'k, v'} packed), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t.unbind(dim)


# ------------------------------------------------------------------------- contiguous ring (dense)
def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """q [B, S/W, Hq, D], k/v [B, S/W, Hkv, D]: rank r holds the contiguous chunk r of the sequence."""
    return _dense(q, k, v, False, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                  return_attn_probs, group)


def ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    k, v = _unpack(kv, 2, "kv", 2)
    return ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                                return_attn_probs, group)


def ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                   alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    q, k, v = _unpack(qkv, 3, "qkv", 2)
    return ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                                return_attn_probs, group)


# --------------------------------------------------------------------------- zigzag ring (dense)
def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """q [B, S/W, Hq, D], k/v [B, S/W, Hkv, D]: rank r holds chunks r and 2W-1-r of 2W (turbo_dist.cp.shard)."""
    return _dense(q, k, v, True, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                  return_attn_probs, group)


def zigzag_ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None):
    k, v = _unpack(kv, 2, "kv", 2)
    return zigzag_ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                       deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                          window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None):
    q, k, v = _unpack(qkv, 3, "qkv", 2)
    return zigzag_ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                       deterministic, return_attn_probs, group)


# -------------------------------------------------------------------------- zigzag ring (varlen)
def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None):
    """q [T/W, Hq, D], k/v [T/W, Hkv, D]: every sequence in 2W chunks, rank r holding chunks r and 2W-1-r of
    each (turbo_dist.cp.shard_packed); cu_seqlens [B+1] / max_seqlen: this rank's (global / W)."""
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, True, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                deterministic=False, return_attn_probs=False, group=None):
    k, v = _unpack(kv, 2, "kv", 1)
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, True, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                 causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                 deterministic=False, return_attn_probs=False, group=None):
    q, k, v = _unpack(qkv, 3, "qkv", 1)
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, True, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


# ------------------------------------------------------------------- contiguous ring (varlen)
def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None):
    """q [T/W, Hq, D], k/v [T/W, Hkv, D]: every sequence in W chunks, rank r holding chunk r of each, sequence
    after sequence; cu_seqlens [B+1] / max_seqlen: this rank's (global / W). Causal work is unbalanced (rank r
    attends r + 1 chunks); the zigzag function balances it."""
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, False, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None):
    k, v = _unpack(kv, 2, "kv", 1)
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, False, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                          causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None):
    q, k, v = _unpack(qkv, 3, "qkv", 1)
    return _varlen_ring(q, k, v, cu_seqlens, max_seqlen, False, dropout_p, softmax_scale, causal, window_size,
                        alibi_slopes, deterministic, return_attn_probs, group)


# ------------------------------------------------------------------------------- not supported
def _not_supported(name, why):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"turbo_dist.cp.ring_flash_attn.{name}: {why}")

    refuse.__name__ = name
    refuse.__doc__ = f"Not supported: {why}"
    return refuse


_STRIPE = ("the stripe layout (token i on rank i % W) is not one turbo_dist's CP takes; use the zigzag functions "
           "(turbo_dist.cp.shard) for load-balanced causal attention")
stripe_flash_attn_func = _not_supported("stripe_flash_attn_func", _STRIPE)
stripe_flash_attn_kvpacked_func = _not_supported("stripe_flash_attn_kvpacked_func", _STRIPE)
stripe_flash_attn_qkvpacked_func = _not_supported("stripe_flash_attn_qkvpacked_func", _STRIPE)
stripe_flash_attn_varlen_func = _not_supported("stripe_flash_attn_varlen_func", _STRIPE)
stripe_flash_attn_varlen_kvpacked_func = _not_supported("stripe_flash_attn_varlen_kvpacked_func", _STRIPE)
stripe_flash_attn_varlen_qkvpacked_func = _not_supported("stripe_flash_attn_varlen_qkvpacked_func", _STRIPE)
_LLAMA3 = ("the llama3 local-k-slice protocol is not implemented; use zigzag_ring_flash_attn_varlen_func or "
           "turbo_dist.cp.context_parallel_attention(cp_comm_type='allgather') on a contiguous shard of the packed "
           "tokens with the global cu_seqlens")
llama3_flash_attn_varlen_func = _not_supported("llama3_flash_attn_varlen_func", _LLAMA3)
llama3_flash_attn_varlen_kvpacked_func = _not_supported("llama3_flash_attn_varlen_kvpacked_func", _LLAMA3)
llama3_flash_attn_varlen_qkvpacked_func = _not_supported("llama3_flash_attn_varlen_qkvpacked_func", _LLAMA3)
llama3_flash_attn_prepare_cu_seqlens = _not_supported("llama3_flash_attn_prepare_cu_seqlens", _LLAMA3)
_HF = ("the Hugging Face adapter (patching transformers' flash attention) is not provided; call the functions "
       "above from the model's attention")
substitute_hf_flash_attn = _not_supported("substitute_hf_flash_attn", _HF)
update_ring_flash_attn_params = _not_supported("update_ring_flash_attn_params", _HF)

__all__ = [
    "ring_flash_attn_func", "ring_flash_attn_kvpacked_func", "ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_func", "zigzag_ring_flash_attn_kvpacked_func", "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func", "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
    "ring_flash_attn_varlen_func", "ring_flash_attn_varlen_kvpacked_func", "ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func", "stripe_flash_attn_kvpacked_func", "stripe_flash_attn_qkvpacked_func",
    "stripe_flash_attn_varlen_func", "stripe_flash_attn_varlen_kvpacked_func",
    "stripe_flash_attn_varlen_qkvpacked_func", "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func", "llama3_flash_attn_varlen_qkvpacked_func",
    "llama3_flash_attn_prepare_cu_seqlens", "substitute_hf_flash_attn", "update_ring_flash_attn_params",
]
