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
- `llama3_flash_attn_varlen_func` (+ packed forms) with `llama3_flash_attn_prepare_cu_seqlens`: rank r holding the
  contiguous shard r of the packed tokens; K/V all-gathered `heads_k_stride` kv heads at a time, the local queries
  attending the `local_k_slice` rows (Llama 3's CP; not overlapped: an all-gather, then the attention).
kvpacked: kv [..., 2, H, D]; qkvpacked: qkv [..., 3, H, D] (dense: [B, S/W, 3, H, D], varlen: [T/W, 3, H, D]).
GQA (fewer k/v heads) is allowed; `group=None` is the default process group; `return_attn_probs=True` returns
(out, softmax_lse, None) as ring-flash-attn does: lse fp32 [B, H, S/W] for the dense functions, [H, T/W] (flat,
flash-attn's 2-D varlen lse, as ring-flash-attn returns with such flash-attn versions) for the varlen ones. The zigzag
functions also take causal=False (ring-flash-attn asserts causal). window_size=(-1, 0) with causal=True is the
causal mask. Gradients flow to q, k, v (or the packed tensor).

Refused with NotImplementedError (never ignored): dropout_p != 0, another sliding window, alibi_slopes,
deterministic=True (as turbo_dist.ops.flash_attn_func); the stripe layouts: importable, refused when called.
ring-flash-attn's Hugging Face adapter (`substitute_hf_flash_attn`, `update_ring_flash_attn_params`,
`use_ring_attn`) is turbo_dist.cp.hf_adapter, re-exported here (transformers is imported when they are called).
"""
import bisect
import operator

import torch

from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints, host_values, memo, tensors_key
from turbo_dist.runtime import get_runtime

from . import _check_packed_shards, _comm, _packed_attention, _varlen, context_parallel_attention


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
    _check_packed_shards(q, k, v)
    vals = host_values(cu_seqlens)  # read back once per cu_seqlens tensor, not per layer
    end = vals[-1]
    if end != q.shape[0]:
        raise ValueError(f"cu_seqlens are this rank's LOCAL ones (ring-flash-attn's): they must end at q.shape[0] = "
                         f"{q.shape[0]}, got {end}" + (" (the global ones? divide them by the group size)"
                                                       if end > q.shape[0] else ""))
    import torch.distributed as dist

    w = dist.get_world_size(group)
    # each rank holds 1/W of every sequence; one tensor per cu_seqlens tensor (the packed path keeps its plan by it)
    cu_global = memo(cu_seqlens, ("ring_flash_attn global cu", w),
                     lambda: device_ints([c * w for c in vals], cu_seqlens.dtype, cu_seqlens.device, remember=True))
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


# ----------------------------------------------------------------------- llama3 (all-gathered K/V)
def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """For rank `rank` of `world_size` holding the contiguous shard `rank` of the packed tokens (global
    `cu_seqlens` [B+1], total divisible by world_size): (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    local_k_slice), as ring-flash-attn's. The local queries are cut by the sequence boundaries inside the shard;
    the keys are the rows `local_k_slice` of the all-gathered K/V, from the start of the shard's first sequence to
    the shard's end (causal) or to its last sequence's end, so each local piece is bottom-right aligned."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [B+1] of the global sequence boundaries")
    cu_q, cu_k, max_q, max_k, k_slice = _llama3_plan(list(host_values(cu_seqlens)), causal, rank, world_size)

    def as_cu(vals):  # remembers its values: the layers' checks read nothing back
        return device_ints(vals, cu_seqlens.dtype, cu_seqlens.device, remember=True)

    return as_cu(cu_q), as_cu(cu_k), max_q, max_k, k_slice


def _llama3_plan(cu, causal, rank, world_size):
    """llama3_flash_attn_prepare_cu_seqlens on the host: the global boundaries as a list -> (cu_q list, cu_k list,
    max_seqlen_q, max_seqlen_k, local_k_slice) (the HF adapter keeps the lists: its layers check them there)."""
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] == 0:
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, ending at the packed length; got {cu}")
    total = cu[-1]
    if total % world_size:
        raise ValueError(f"the packed length {total} is not divisible by the group size {world_size} (pad it)")
    per = total // world_size
    lo, hi = rank * per, (rank + 1) * per
    left = bisect.bisect_left(cu, lo)  # the boundary at lo, else the last one before it
    if cu[left] != lo:
        left -= 1
    right = bisect.bisect_left(cu, hi)  # the first boundary at or after the shard's end
    seg = cu[left:right + 1]
    k_lo, k_hi = seg[0], (hi if causal else seg[-1])
    cu_q = [0] + [c - lo for c in seg[1:-1]] + [per]
    cu_k = [c - k_lo for c in seg[:-1]] + [k_hi - k_lo]
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return cu_q, cu_k, max_q, max_k, slice(k_lo, k_hi)


def _gather_heads(k, v, h, stride, rt):
    """All-gathered K/V of kv heads h .. h+stride: [W * T, 2, stride, D], rank-major (the packed order)."""
    kv = torch.stack([k[:, h:h + stride], v[:, h:h + stride]], dim=1)
    return _comm.all_gather(kv, rt).wait().flatten(0, 1)


class _Llama3(torch.autograd.Function):
    """Local queries against the rows `k_slice` of the all-gathered K/V, `stride` kv heads at a time (the gathered
    buffer holds that many); backward gathers K/V again and reduce-scatters dK/dV (fp32). Keeps the local K/V."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, stride, k_slice, scale, causal, rt):
        # the inputs were checked once (_check_llama3): the per-head-group calls go straight to the dispatcher
        # (the public varlen functions would read cu_seqlens back to the host, a device sync, every time)
        g = q.shape[1] // k.shape[1]
        outs, lses = [], []
        for h in range(0, k.shape[1], stride):
            kv = _gather_heads(k, v, h, stride, rt)[k_slice]
            o_h, l_h = _varlen.varlen_fwd(q[:, h * g:(h + stride) * g], kv[:, 0].contiguous(), kv[:, 1].contiguous(),
                                          cu_q, cu_k, max_q, max_k, causal, scale)
            outs.append(o_h)
            lses.append(l_h)
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=0)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, stride, k_slice, scale, causal, rt)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @first_order_only("turbo_dist.cp.ring_flash_attn llama3")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, stride, k_slice, scale, causal, rt = ctx.args
        g = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for h in range(0, k.shape[1], stride):
            qs = slice(h * g, (h + stride) * g)
            kv = _gather_heads(k, v, h, stride, rt)
            dq_h, dk_h, dv_h = _varlen.varlen_bwd(
                do[:, qs].contiguous(), q[:, qs].contiguous(), kv[k_slice, 0].contiguous(),
                kv[k_slice, 1].contiguous(), o[:, qs].contiguous(), lse[qs].contiguous(), cu_q, cu_k, max_q, max_k,
                causal, scale)
            dq[:, qs] = dq_h
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            dkv[k_slice, 0] = dk_h.float()
            dkv[k_slice, 1] = dv_h.float()
            red = _comm.reduce_scatter(dkv.view(rt.world_size, -1, *kv.shape[1:]), rt).wait()
            dk[:, h:h + stride] = red[:, 0]
            dv[:, h:h + stride] = red[:, 1]
        return (dq, dk, dv) + (None,) * 9


def _check_llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                  causal, rt, host_cu=None):
    """This rank's arguments against the plan llama3_flash_attn_prepare_cu_seqlens makes for it: (max_q, max_k,
    stride, k_slice). Raises ValueError / TypeError (the caller makes every rank raise together). host_cu: the
    cu_seqlens' values held on the host by a caller that made them (check_varlen_inputs: nothing read back)."""
    from turbo_dist.ops.attention_varlen import check_varlen_inputs

    _check_packed_shards(q, k, v)  # (k and v of one shape: check_varlen_inputs below)
    for name, t in (("q", q), ("k", k), ("v", v)):
        rt.check_tensor(t, name)
    hkv = k.shape[1]
    try:
        stride = operator.index(heads_k_stride)
    except TypeError:
        stride = None
    if isinstance(heads_k_stride, bool) or stride is None or stride < 1 or hkv % stride:
        raise ValueError(f"heads_k_stride must be a positive divisor of the {hkv} k/v heads, got {heads_k_stride!r}")
    t_loc = q.shape[0]
    lo, hi, total = rt.rank * t_loc, (rt.rank + 1) * t_loc, rt.world_size * t_loc
    if not isinstance(local_k_slice, slice) or local_k_slice.step not in (None, 1) or \
            not all(isinstance(x, int) for x in (local_k_slice.start, local_k_slice.stop)):
        raise ValueError(f"local_k_slice must be slice(start, stop) (llama3_flash_attn_prepare_cu_seqlens), got "
                         f"{local_k_slice!r}")
    k_lo, k_hi = local_k_slice.start, local_k_slice.stop
    # the keys start at the shard's first sequence and end at the shard's end (causal) or its last sequence's end
    if not (0 <= k_lo <= lo and (k_hi == hi if causal else hi <= k_hi <= total)):
        raise ValueError(f"local_k_slice {local_k_slice} is not rank {rt.rank}'s plan (its shard is rows {lo}..{hi} of "
                         f"{total}; keys from its first sequence's start to {'its end' if causal else 'its last sequence end'}"
                         "): make it with llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)")
    max_q, max_k, cq, ck = check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_k=k_hi - k_lo, return_cu=True,
        host_cu=host_cu, end_hint=" (cu_seqlens_q / _k and local_k_slice as llama3_flash_attn_prepare_cu_seqlens makes them: local "
                 "queries, keys = the local_k_slice rows of the gathered K/V)")
    if any(k_lo + b != lo + a for a, b in zip(cq[1:-1], ck[1:-1])):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k do not cut the same sequences (inner boundaries "
                         f"{[lo + a for a in cq[1:-1]]} vs {[k_lo + b for b in ck[1:-1]]} in the packed rows): make "
                         "them with llama3_flash_attn_prepare_cu_seqlens")
    return max_q, max_k, stride, slice(k_lo, k_hi)


def _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
            dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs, group,
            refused=None, host_cu=None, per_call=False):
    """refused: an error the caller (turbo_dist.cp.hf_adapter) found on this rank: raised here after the group's
    flag all-reduce, with every other rank, instead of before it (where the others would wait in the all-gather).
    host_cu: (cu_seqlens_q, cu_seqlens_k) values on the host, from a caller that made the tensors from them
    (the adapter's plan): the check reads nothing back. per_call: the caller's own checks (`refused`) can differ
    between calls with the same plan, so the refusal flag is all-reduced on every call (a device sync); otherwise
    the checks and the flag's all-reduce run once per plan (cu_seqlens tensors and arguments, _host.memo) and a
    repeat call syncs nothing. None per kv-head group, forward or backward."""
    _refuse_unsupported(dropout_p, window_size, alibi_slopes, deterministic, causal)
    from turbo_dist.ops.attention import default_scale
    from turbo_dist.runtime.consistency import raise_together

    rt = get_runtime(group)

    def prepare():
        err, checked = refused, None
        try:
            if err is None:
                checked = _check_llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        heads_k_stride, local_k_slice, causal, rt, host_cu)
        except (TypeError, ValueError) as exc:
            err = exc
        # Arguments are per rank: a rank raising alone would leave the others in the all-gather. Every rank raises.
        raise_together(rt, err, "llama3_flash_attn_varlen_func", "the all-gather")
        return checked

    key = None if per_call or refused is not None else _llama3_key(q, k, v, rt, max_seqlen_q, max_seqlen_k,
                                                                  heads_k_stride, local_k_slice, causal, host_cu)
    max_q, max_k, stride, k_slice = (prepare() if key is None else
                                     memo(cu_seqlens_q, key, prepare, deps=(cu_seqlens_k,)))
    o, lse = _Llama3.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, stride, k_slice,
                           default_scale(q, softmax_scale), bool(causal), rt)
    return (o, lse, None) if return_attn_probs else o


def _llama3_key(q, k, v, rt, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice, causal, host_cu):
    """What _check_llama3 depends on besides the cu_seqlens tensors (None: not cacheable)."""
    tensors = tensors_key(q, k, v)
    if tensors is None or not isinstance(local_k_slice, slice):
        return None
    host = None if host_cu is None else tuple(tuple(c) for c in host_cu)
    return ("llama3", id(rt), rt.rank, rt.world_size, max_seqlen_q, max_seqlen_k, heads_k_stride,
            (local_k_slice.start, local_k_slice.stop, local_k_slice.step), bool(causal), host, tensors)


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None):
    """q/k/v [T/W, H, D]: rank r's contiguous shard r of the packed tokens; cu_seqlens_q/_k, max_seqlen_q/_k and
    local_k_slice from `llama3_flash_attn_prepare_cu_seqlens`. K/V are all-gathered `heads_k_stride` kv heads at
    a time (what the gathered buffer holds); return_attn_probs: (out, lse [Hq, T/W] fp32, None)."""
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                           causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                           return_attn_probs=False, group=None):
    k, v = _unpack(kv, 2, "kv", 1)
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None):
    q, k, v = _unpack(qkv, 3, "qkv", 1)
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


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


# ---------------------------------------------------------------- Hugging Face adapter (turbo_dist.cp.hf_adapter)
def substitute_hf_flash_attn(process_group, heads_k_stride):
    """turbo_dist.cp.hf_adapter.substitute_hf_flash_attn: transformers' "flash_attention_2" (and "turbo_dist_ring")
    run llama3 ring attention over `process_group`, `heads_k_stride` kv heads gathered at a time."""
    from .hf_adapter import substitute_hf_flash_attn as substitute

    return substitute(process_group, heads_k_stride)


def update_ring_flash_attn_params(cu_seqlens, process_group):
    """turbo_dist.cp.hf_adapter.update_ring_flash_attn_params: this rank's plan for the packed row whose global
    document boundaries are `cu_seqlens` [num_docs + 1]."""
    from .hf_adapter import update_ring_flash_attn_params as update

    return update(cu_seqlens, process_group)


def use_ring_attn(flag):
    """turbo_dist.cp.hf_adapter.use_ring_attn: ring attention on (True) or transformers' own (False)."""
    from .hf_adapter import use_ring_attn as use

    return use(flag)


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
    "use_ring_attn",
]
