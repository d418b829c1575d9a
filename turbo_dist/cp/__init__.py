"""Context-parallel attention: each rank holds a shard of the sequence; attention spans all of it.

    q_loc = turbo_dist.cp.shard(q, g)                      # [B, S, H, D] -> [B, S/cp, H, D], zigzag
    o_loc = turbo_dist.cp.context_parallel_attention(q_loc, k_loc, v_loc, causal=True, cp_group=g,
                                                     cp_comm_type="ring")
    o = turbo_dist.cp.unshard(o_loc, g)                    # back to [B, S, H, D] in natural order

Modes (`cp_comm_type`), all differentiable and numerically interchangeable for the same inputs:
  "ring"      K/V rotate over the group (P2P, comm stream) while the current block is computed;
              partial outputs merged with their LSE in fp32; causal zigzag skips masked blocks.
  "a2a"       Ulysses: all-to-all from sequence- to head-sharded, full-sequence attention,
              all-to-all back. Needs q heads % cp == 0 and kv heads % cp == 0 or cp % kv heads == 0.
  "allgather" K/V all-gathered (head-chunked, overlapped with compute), local attention.

Layout (`load_balance`): the layout the local shards are in, as produced by `shard(..., load_balance)`.
True (default) = zigzag (rank r holds chunks r and 2cp-1-r of 2cp), False = contiguous (chunk r of
cp). It only matters for causal attention; non-causal results do not depend on it.

Packed variable-length sequences (cu_seqlens_q/cu_seqlens_k, flash-attn's varlen layout): every mode
("ring": each step attends to the slice of the K/V block the local sequences reach; "allgather": K/V
gathered, sliced to the keys this rank's sequences need; "a2a": whole packed sequence per head group).
q/k/v are [T/cp, H, D], rank r holding the contiguous shard r of the packed tokens
(`shard(x, g, seq_dim=0, load_balance=False)`; T % cp == 0, pad the packed sequence otherwise), or, with
load_balance=True (any mode), Megatron / TransformerEngine's THD layout (`shard_packed`: every sequence,
its length divisible by 2*cp, cut into 2*cp chunks, rank r holding chunks r and 2cp-1-r). cu_seqlens are
global (over the whole packed T, the same on every rank). Causal ring needs cu_seqlens_q == cu_seqlens_k.
"""
import logging

import torch

from turbo_dist.ops.attention import check_attention_inputs, default_scale
from turbo_dist.ops._host import device_ints, host_values, memo, tensors_key
from turbo_dist.ops.attention_varlen import check_varlen_inputs
from turbo_dist.runtime import get_runtime
from turbo_dist.runtime.consistency import check_same_on_ranks, raise_together, tensor_sig

from .a2a import a2a_attention, a2a_varlen_attention, a2a_varlen_order, packed_zigzag_order
from .allgather import allgather_attention, allgather_varlen_attention, allgather_varlen_plan
from .layout import _group_info, chunk_ids, local_positions, shard, unshard
from .ring import ring_attention, ring_varlen_attention, ring_varlen_plan

log = logging.getLogger("turbo_dist")

COMM_TYPES = {"ring": "ring", "p2p": "ring", "a2a": "a2a", "all2all": "a2a", "ulysses": "a2a",
              "allgather": "allgather", "all_gather": "allgather"}
# flash-attn spellings we do not take (ours: cu_seqlens_q/_k, max_seqlen_q/_k): named in the error
_OTHER_VARLEN_KW = ("cu_seqlens", "cu_seqlens_kv", "max_seqlen")


def context_parallel_attention(q, k, v, causal=False, softmax_scale=None, cp_group=None, cp_comm_type="ring",
                               load_balance=None, num_chunks=2, cu_seqlens_q=None, cu_seqlens_k=None,
                               max_seqlen_q=None, max_seqlen_k=None, return_lse=False, **kw):
    """Attention over a sequence sharded across `cp_group`; returns this rank's output shard.

    q: [B, S/cp, Hq, D], k/v: [B, S/cp, Hkv, D] (Hq % Hkv == 0), fp16/bf16/fp32, this rank's shard
    in the layout given by `load_balance` (see the module docstring). Returns o: [B, S/cp, Hq, D].
    softmax_scale: default 1/sqrt(D). cp_comm_type: "ring" | "a2a" | "allgather".
    load_balance: True (None, the default) = zigzag, False = contiguous; see the module docstring.
    num_chunks: head groups pipelined in "a2a" and "allgather" (clipped to what the heads allow).
    return_lse: also return the log-sum-exp of this rank's queries, fp32, not differentiable: [B, Hq, S/cp]
    (packed: [Hq, T/cp], -inf where a row sees no key), in the shard's token order ("a2a" sends it back with
    one more all-to-all per head group).

    Packed variable-length sequences (every mode; causal "ring" needs cu_seqlens_q == cu_seqlens_k): cu_seqlens_q/cu_seqlens_k [B+1] int32/int64 on q's
    device, GLOBAL (0, non-decreasing, ending at the whole packed length T = cp * local length, the same
    on every rank); max_seqlen_q/_k: None or an int >= the longest sequence. q: [T/cp, Hq, D], k/v:
    [T/cp, Hkv, D], this rank's contiguous shard (load_balance None or False) or its per-sequence zigzag
    shard (load_balance=True, `shard_packed`);
    returns o: [T/cp, Hq, D]. Causal masks align bottom-right within each sequence.
    """
    other = [name for name in kw if name in _OTHER_VARLEN_KW]
    if other:
        raise TypeError(f"context_parallel_attention takes packed sequences as cu_seqlens_q/cu_seqlens_k and "
                        f"max_seqlen_q/max_seqlen_k, got {', '.join(other)}")
    if kw:
        raise TypeError(f"context_parallel_attention got unexpected arguments: {sorted(kw)}")
    check_same_on_ranks(cp_group, "context_parallel_attention", q=tensor_sig(q), k=tensor_sig(k), v=tensor_sig(v),
                        causal=causal, cp_comm_type=cp_comm_type, load_balance=load_balance, num_chunks=num_chunks,
                        softmax_scale=softmax_scale, return_lse=return_lse, packed=cu_seqlens_q is not None,
                        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    mode = COMM_TYPES.get(str(cp_comm_type).lower())
    if mode is None:
        raise ValueError(f"cp_comm_type must be one of 'ring', 'a2a', 'allgather', got {cp_comm_type!r}")
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        o, lse = _packed_attention(q, k, v, causal, softmax_scale, cp_group, mode, load_balance, num_chunks,
                                   cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(return_lse))
        return (o, lse) if return_lse else o
    if max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("max_seqlen_q/max_seqlen_k are for packed sequences: pass cu_seqlens_q and cu_seqlens_k")
    load_balance = True if load_balance is None else load_balance
    check_attention_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"context-parallel attention needs q and k/v shards of the same length, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    rt = get_runtime(cp_group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        rt.check_tensor(t, name)
    load_balance = bool(load_balance) and rt.world_size > 1  # one rank: both layouts are the natural order
    if causal and load_balance and q.shape[1] % 2:
        raise ValueError(
            f"a zigzag (load_balance=True) shard holds two equal chunks: local length must be even, got "
            f"q {tuple(q.shape)}"
        )
    scale = default_scale(q, softmax_scale)
    if mode == "ring":
        o, lse = ring_attention(q, k, v, bool(causal), scale, rt, load_balance)
    elif mode == "a2a":
        o, lse = a2a_attention(q, k, v, bool(causal), scale, rt, load_balance, num_chunks, bool(return_lse))
    else:
        o, lse = allgather_attention(q, k, v, bool(causal), scale, rt, load_balance, num_chunks)
    return (o, lse) if return_lse else o


def _check_packed_shards(q, k, v):
    """q / k / v: this rank's packed shards [T/cp, heads, head_dim], q and k/v of one length."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if getattr(t, "dim", lambda: 0)() != 3:
            raise ValueError(f"with cu_seqlens, {name} must be this rank's packed shard [T/cp, heads, head_dim], "
                             f"got shape {tuple(getattr(t, 'shape', ()))}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"context-parallel attention needs q and k/v shards of the same length, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")


def _packed_attention(q, k, v, causal, softmax_scale, cp_group, mode, load_balance, num_chunks, cu_seqlens_q,
                      cu_seqlens_k, max_seqlen_q, max_seqlen_k, want_lse=False, split=False):
    """-> (o, lse or an empty tensor when not want_lse and the mode does not compute it anyway).
    split (ring only, for ring-flash-attn's varlen functions): rank r holds chunk r of cp of every sequence."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
    rt = get_runtime(cp_group)
    cp = rt.world_size
    zigzag = bool(load_balance) and cp > 1  # one rank: both layouts are the natural order (ring cut odd lengths)
    split = split and cp > 1

    def prepare():
        # The checks read cu_seqlens on the host (a sync) anyway: a refusal found on one rank (its shard of another
        # length, its cu_seqlens) is raised on every rank together after a one-int all-reduce, instead of leaving
        # the others in the first all-gather.
        err = checked = None
        try:
            checked = _check_packed(q, k, v, causal, softmax_scale, rt, mode, zigzag, split, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        except (TypeError, ValueError, NotImplementedError) as exc:
            err = exc
        raise_together(rt, err, "context_parallel_attention (packed)", "the first all-gather")
        host_q, host_k = checked[2], checked[3]
        plan = None
        if q.shape[0] == 0:
            pass
        elif mode == "ring":
            plan = ring_varlen_plan(q, host_q, host_k, bool(causal), rt, zigzag, split)
        elif mode == "allgather":
            plan = allgather_varlen_plan(q, host_q, host_k, bool(causal), rt, zigzag)
        elif zigzag:
            plan = a2a_varlen_order(q, host_q, rt)
        return checked + (plan,)

    # Once per packed batch: every layer passes the same cu_seqlens tensors with the same arguments, and the checks,
    # the cross-rank refusal and the plan (host lists, per-step device tensors) depend on nothing else. A repeat
    # call reads nothing back and communicates nothing before the attention's own exchange.
    key = _packed_key(q, k, v, rt, mode, causal, zigzag, split, softmax_scale, max_seqlen_q, max_seqlen_k)
    prepared = prepare() if key is None else memo(cu_seqlens_q, key, prepare, deps=(cu_seqlens_k,))
    max_seqlen_q, max_seqlen_k, host_q, host_k, scale, plan = prepared
    check_same_on_ranks(rt, "context_parallel_attention (packed cu_seqlens)", cu_seqlens_q=host_q,
                        cu_seqlens_k=host_k, split=split)
    if q.shape[0] == 0:  # nothing packed (the same on every rank: T = cp * local length): empty outputs, joined
        o = q.new_zeros(0, q.shape[1], v.shape[2]) + (q.sum() + k.sum() + v.sum()) * 0  # to q/k/v for autograd
        return o, torch.empty(q.shape[1], 0, dtype=torch.float32, device=q.device)
    if mode == "ring":
        return ring_varlen_attention(q, k, v, host_q, host_k, bool(causal), scale, rt, zigzag=zigzag, split=split,
                                     steps=plan)
    if mode == "allgather":
        return allgather_varlen_attention(q, k, v, host_q, host_k, bool(causal), scale, rt, num_chunks, zigzag=zigzag,
                                          plan=plan)
    return a2a_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
                                scale, rt, num_chunks, zigzag=zigzag, host_cu=host_q, want_lse=want_lse, order=plan)


def _packed_key(q, k, v, rt, mode, causal, zigzag, split, softmax_scale, max_seqlen_q, max_seqlen_k):
    """What _packed_attention's checks and plan depend on besides the cu_seqlens tensors (None: not cacheable)."""
    tensors = tensors_key(q, k, v)
    return None if tensors is None else ("cp_packed", id(rt), rt.rank, rt.world_size, mode, bool(causal), zigzag,
                                         split, softmax_scale, max_seqlen_q, max_seqlen_k, tensors)


def _check_packed(q, k, v, causal, softmax_scale, rt, mode, zigzag, split, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k):
    """_packed_attention's checks of this rank's arguments: (max_seqlen_q, max_seqlen_k, host cu_seqlens_q,
    host cu_seqlens_k, softmax scale), or the error refusing them."""
    cp = rt.world_size
    _check_packed_shards(q, k, v)
    max_seqlen_q, max_seqlen_k, host_q, host_k = check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q=q.shape[0] * cp,
        total_k=k.shape[0] * cp, return_cu=True,
        end_hint=(f": the shards hold {q.shape[0]} tokens x cp={cp}; cu_seqlens are global, and the packed length "
                  f"must be divisible by cp (pad it) with rank r holding shard r"))
    if (zigzag or split) and cp > 1:
        name, n = ("zigzag", 2 * cp) if zigzag else ("split", cp)
        if host_q != host_k:
            raise NotImplementedError(f"the per-sequence {name} layout needs cu_seqlens_q == cu_seqlens_k")
        bad = [b - a for a, b in zip(host_q, host_q[1:]) if (b - a) % n]
        if bad:
            raise ValueError(f"the per-sequence {name} layout cuts every sequence into {n} chunks: lengths "
                             f"{bad[:4]} are not divisible by it (pad each sequence, as Megatron's "
                             f"cu_seqlens_q_padded does)")
    if split and (zigzag or mode != "ring"):
        raise NotImplementedError("the per-sequence split layout is taken by cp_comm_type 'ring' only")
    for name, t in (("q", q), ("k", k), ("v", v)):
        rt.check_tensor(t, name)
    if mode == "ring" and causal and host_q != host_k:
        raise NotImplementedError("ring attention on packed sequences with a causal mask needs cu_seqlens_q == "
                                  "cu_seqlens_k (self-attention packing); use cp_comm_type 'a2a' or "
                                  "'allgather' for causal cross-attention packing")
    return max_seqlen_q, max_seqlen_k, host_q, host_k, default_scale(q, softmax_scale)


def shard_packed(x, cu_seqlens, group=None, seq_dim=0):
    """This rank's tokens of a packed sequence (the same on every rank) in the per-sequence zigzag layout of
    Megatron / TransformerEngine THD context parallelism: chunks r and 2cp-1-r of every sequence (each length
    divisible by 2*cp), sequence after sequence. Differentiable (an index_select of x)."""
    rank, cp = _group_info(group)
    if not isinstance(x, torch.Tensor) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"shard_packed: seq_dim {seq_dim} is not a dim of x "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    cu_t = torch.as_tensor(cu_seqlens)
    if cu_t.dim() != 1 or cu_t.numel() < 2 or cu_t.is_floating_point() or cu_t.dtype == torch.bool:
        raise ValueError(f"shard_packed: cu_seqlens must be 1-D integer boundaries [num_seqs + 1], got "
                         f"{cu_t.dtype} {tuple(cu_t.shape)}")
    cu = list(host_values(cu_t))  # read back once per cu_seqlens tensor (q, k, v, labels ... share it)
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"shard_packed: cu_seqlens must start at 0 and not decrease, got {cu}")
    if cp == 1:
        return x
    bad = [b - a for a, b in zip(cu, cu[1:]) if (b - a) % (2 * cp)]
    if bad:
        raise ValueError(f"shard_packed cuts every sequence into 2*cp = {2 * cp} chunks: lengths {bad[:4]} are not "
                         f"divisible by it (pad each sequence)")
    if cu[-1] != x.shape[seq_dim]:
        raise ValueError(f"shard_packed: cu_seqlens cover {cu[-1]} tokens, x has {x.shape[seq_dim]}")
    n = cu[-1] // cp
    rows = memo(cu_t, ("shard_packed rows", rank, cp, str(x.device)),
                lambda: device_ints(packed_zigzag_order(cu, cp)[rank * n:(rank + 1) * n], torch.int64, x.device))
    return x.index_select(seq_dim, rows)


__all__ = ["context_parallel_attention", "shard", "shard_packed", "unshard", "local_positions", "chunk_ids",
           "COMM_TYPES"]
