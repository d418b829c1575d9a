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
"""
import logging

from turbo_dist.ops.attention import check_attention_inputs, default_scale
from turbo_dist.runtime import get_runtime

from .a2a import a2a_attention
from .allgather import allgather_attention
from .layout import chunk_ids, local_positions, shard, unshard
from .ring import ring_attention

log = logging.getLogger("turbo_dist")

COMM_TYPES = {"ring": "ring", "p2p": "ring", "a2a": "a2a", "ulysses": "a2a", "allgather": "allgather",
              "all_gather": "allgather"}
_VARLEN_KW = ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_kv", "max_seqlen", "max_seqlen_q",
              "max_seqlen_k")


def context_parallel_attention(q, k, v, causal=False, softmax_scale=None, cp_group=None, cp_comm_type="ring",
                               load_balance=True, num_chunks=2, **kw):
    """Attention over a sequence sharded across `cp_group`; returns this rank's output shard.

    q: [B, S/cp, Hq, D], k/v: [B, S/cp, Hkv, D] (Hq % Hkv == 0), fp16/bf16/fp32, this rank's shard
    in the layout given by `load_balance` (see the module docstring). Returns o: [B, S/cp, Hq, D].
    softmax_scale: default 1/sqrt(D). cp_comm_type: "ring" | "a2a" | "allgather".
    num_chunks: head groups pipelined in "a2a" and "allgather" (clipped to what the heads allow).
    Packed variable-length sequences (cu_seqlens) are not supported (NotImplementedError).
    """
    varlen = [name for name in kw if name in _VARLEN_KW]
    if varlen:
        raise NotImplementedError(
            f"context-parallel attention does not support variable-length packed sequences ({', '.join(varlen)})"
        )
    if kw:
        raise TypeError(f"context_parallel_attention got unexpected arguments: {sorted(kw)}")
    mode = COMM_TYPES.get(str(cp_comm_type).lower())
    if mode is None:
        raise ValueError(f"cp_comm_type must be one of 'ring', 'a2a', 'allgather', got {cp_comm_type!r}")
    check_attention_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"context-parallel attention needs q and k/v shards of the same length, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    rt = get_runtime(cp_group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        rt.check_tensor(t, name)
    load_balance = bool(load_balance)
    if causal and load_balance and q.shape[1] % 2:
        raise ValueError(
            f"a zigzag (load_balance=True) shard holds two equal chunks: local length must be even, got "
            f"q {tuple(q.shape)}"
        )
    scale = default_scale(q, softmax_scale)
    if mode == "ring":
        return ring_attention(q, k, v, bool(causal), scale, rt, load_balance)
    if mode == "a2a":
        return a2a_attention(q, k, v, bool(causal), scale, rt, load_balance, num_chunks)
    return allgather_attention(q, k, v, bool(causal), scale, rt, load_balance, num_chunks)


__all__ = ["context_parallel_attention", "shard", "unshard", "local_positions", "chunk_ids", "COMM_TYPES"]
