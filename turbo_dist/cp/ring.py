"""Ring attention: K/V blocks travel around the group while each rank attends its queries to them.

Step i of cp: rank r holds the K/V shard of rank src = (r - i) mod cp. The next shard is already
being exchanged (P2P on the runtime's comm stream) while the current block is computed. Each block
gives a partial output and its LSE; they are merged in fp32:
    lse = logaddexp(lse, lse_blk);  out = out + sigmoid(lse_blk - lse_old) * (out_blk - out)
Under a causal mask with the zigzag layout (rank r holds chunks r and 2cp-1-r) every step after the
diagonal one costs exactly half a block, and fully masked quarters are never computed:
    src <  r: all local queries see the first half of src's K/V (chunk src), unmasked;
    src >  r: only the second local query half (chunk 2cp-1-r) sees src's K/V, all of it, unmasked.
With the contiguous layout, blocks from later ranks are skipped (correct, unbalanced).
Packed sequences (`ring_varlen_attention`, contiguous shards only): each step attends the local queries
to the slice of the K/V block their own sequences reach, with per-step local cu_seqlens.

Backward rotates K/V the same way and sends the fp32 dK/dV accumulator along with them, one
step behind; after cp steps it arrives back at its owner. GQA: K/V keep their own head count
(the attention kernels handle the grouping), nothing is repeated in memory.
"""
import torch
import torch.nn.functional as F

from turbo_dist.ops import attention_backward, attention_forward
from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints

from . import _comm
from ._varlen import add_keys, local_plan, take_keys, varlen_bwd as _varlen_bwd, varlen_fwd as _varlen_fwd

DIAG, FULL, KV_FRONT, Q_BACK, SKIP = "diag", "full", "kv_front", "q_back", "skip"


def block_plan(step, rank, cp, causal, load_balance):
    """What rank `rank` computes at ring step `step` (see the module docstring)."""
    if not causal:
        return FULL
    if step == 0:
        return DIAG
    src = (rank - step) % cp
    if load_balance:
        return KV_FRONT if src < rank else Q_BACK
    return FULL if src < rank else SKIP


def _merge(out, lse, out_blk, lse_blk):
    """In place: out [B, S, H, D] fp32, lse [B, H, S] fp32 (views allowed) absorb one block's result."""
    w = torch.sigmoid(lse_blk - lse)  # weight of the new block: exp(lse_blk - logaddexp(lse, lse_blk))
    out.lerp_(out_blk.float(), w.transpose(1, 2).unsqueeze(-1))
    lse.sub_(F.logsigmoid(lse - lse_blk))


def ring_forward(q, k, v, causal, scale, rt, load_balance):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] local shards -> out (q.dtype), lse [B, Hq, S] fp32."""
    cp, rank = rt.world_size, rt.rank
    if cp == 1:
        return attention_forward(q, k, v, causal, scale)
    half = q.shape[1] // 2
    kv = torch.stack([k, v])  # one buffer, one transfer per step
    q_back = q[:, half:].contiguous() if causal and load_balance else None
    out = lse = None
    for step in range(cp):
        pending = _comm.ring_shift(kv, rt) if step + 1 < cp else None
        kind = block_plan(step, rank, cp, causal, load_balance)
        if kind in (DIAG, FULL):
            o_b, l_b = attention_forward(q, kv[0], kv[1], kind == DIAG, scale)
            if out is None:
                out, lse = o_b.float(), l_b.float().contiguous()
            else:
                _merge(out, lse, o_b, l_b)
        elif kind == KV_FRONT:
            o_b, l_b = attention_forward(q, kv[0][:, :half].contiguous(), kv[1][:, :half].contiguous(), False, scale)
            _merge(out, lse, o_b, l_b)
        elif kind == Q_BACK:
            o_b, l_b = attention_forward(q_back, kv[0], kv[1], False, scale)
            _merge(out[:, half:], lse[:, :, half:], o_b, l_b)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def ring_backward(do, q, k, v, out, lse, causal, scale, rt, load_balance):
    """Gradients of ring_forward given the merged out/lse (flash-attention style): dq, dk, dv."""
    cp, rank = rt.world_size, rt.rank
    if cp == 1:
        return attention_backward(do, q, k, v, out, lse, causal, scale)
    half = q.shape[1] // 2
    kv = torch.stack([k, v])
    if causal and load_balance:
        q_back, do_back, out_back = (t[:, half:].contiguous() for t in (q, do, out))
        lse_back = lse[:, :, half:].contiguous()
    dq = dkv = None
    pend_dkv = None
    for step in range(cp):
        pend_kv = _comm.ring_shift(kv, rt) if step + 1 < cp else None
        kind = block_plan(step, rank, cp, causal, load_balance)
        grads, region = None, None
        if kind in (DIAG, FULL):
            grads = attention_backward(do, q, kv[0], kv[1], out, lse, kind == DIAG, scale)
            q_region, region = slice(None), slice(None)
        elif kind == KV_FRONT:
            kf, vf = kv[0][:, :half].contiguous(), kv[1][:, :half].contiguous()
            grads = attention_backward(do, q, kf, vf, out, lse, False, scale)
            q_region, region = slice(None), slice(0, half)
        elif kind == Q_BACK:
            grads = attention_backward(do_back, q_back, kv[0], kv[1], out_back, lse_back, False, scale)
            q_region, region = slice(half, None), slice(None)

        if step == 0:
            dq_b, dk_b, dv_b = grads  # step 0 is always the whole local block
            dq = dq_b.float()
            dkv = torch.stack([dk_b, dv_b]).float()
        else:
            dkv = pend_dkv.wait()  # the accumulator of src's K/V, coming from the previous rank
            if grads is not None:
                dq_b, dk_b, dv_b = grads
                dq[:, q_region] += dq_b
                dkv[0][:, region] += dk_b
                dkv[1][:, region] += dv_b
        # After the last step this sends the accumulator home: src = rank + 1 - cp = rank + 1 (mod cp).
        pend_dkv = _comm.ring_shift(dkv, rt)
        if pend_kv is not None:
            kv = pend_kv.wait()
    dkv = pend_dkv.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _Ring(torch.autograd.Function):
    """fwd(q, k, v, *args) -> (out, lse); backward = bwd(do, q, k, v, out, lse, *args): the dense and the packed
    ring attention. Returns (out, lse); lse (fp32, of this rank's queries) is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, *args):
        out, lse = fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.args = bwd, args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @first_order_only("turbo_dist.cp attention (ring)")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, dlse=None):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


def ring_attention(q, k, v, causal, scale, rt, load_balance):
    """-> (out [B, S/cp, Hq, D], lse [B, Hq, S/cp] fp32, not differentiable)."""
    return _Ring.apply(q, k, v, ring_forward, ring_backward, causal, scale, rt, load_balance)


# ------------------------------------------------------------------------------ packed sequences
def ring_block_layout(cu_q, cu_k, q_lo, q_hi, k_lo, k_hi):
    """Packed sequences, ring step with query rows [q_lo, q_hi) and the K/V block of rows [k_lo, k_hi):
    (cu_q_local, cu_k_local, k_start, k_end), host int lists, from the global host lists cu_q / cu_k.

    Local sequences run from the first to the last with query rows in [q_lo, q_hi) (the query pieces
    tile the rows). Sequence i's keys in the block are cu_k[i] .. cu_k[i+1] clipped to [k_lo, k_hi): the
    pieces touch, so they are one slice [k_start, k_end) of the block (empty pieces: no keys this step).
    """
    local = [i for i in range(len(cu_q) - 1) if min(cu_q[i + 1], q_hi) > max(cu_q[i], q_lo)]
    first, last = local[0], local[-1]

    def clip(x):
        return min(max(x, k_lo), k_hi)

    k_start = clip(cu_k[first])
    cq, ck = [0], [0]
    for i in range(first, last + 1):
        cq.append(min(cu_q[i + 1], q_hi) - q_lo)
        ck.append(clip(cu_k[i + 1]) - k_start)
    return cq, ck, k_start, k_start + ck[-1]


def _merge_safe(out, lse, out_blk, lse_blk):
    """_merge for blocks where a row may have seen no key yet / in this block (lse -inf on either side)."""
    new = torch.logaddexp(lse, lse_blk)
    w = torch.where(torch.isinf(new), torch.zeros_like(new), torch.exp(lse_blk - new))
    out.lerp_(out_blk.float(), w.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


def _chunks_of(rank, cp, zigzag):
    """The chunk ids rank holds of every sequence: (r, 2cp-1-r) of 2cp (zigzag) or (r,) of cp (split)."""
    return (rank, 2 * cp - 1 - rank) if zigzag else (rank,)


def ring_zigzag_layout(cu, cp, rank, src, causal, zigzag=True):
    """Packed sequences in a per-sequence layout, sequence after sequence: zigzag (cp.shard_packed, Megatron's
    THD: chunks r and 2cp-1-r of 2cp of every sequence) or, zigzag=False, split (chunk r of cp of every sequence,
    ring-flash-attn's varlen layout); ring step with src's block: (cu_q_local, cu_k_local, key rows of the block)
    host lists. Query piece "chunk a" of a sequence attends the block's chunks b of the same sequence with b < a
    fully and b == a (the diagonal step) causally: its keys are those chunks in ascending b, so the bottom-right
    aligned causal mask of the step covers both."""
    mine, theirs = _chunks_of(rank, cp, zigzag), _chunks_of(src, cp, zigzag)
    cq, ck, rows, off = [0], [0], [], 0
    for s0, s1 in zip(cu, cu[1:]):
        c = (s1 - s0) // (len(mine) * cp)
        if c == 0:
            continue
        block = [(b, off + j * c) for j, b in enumerate(theirs)]  # src's chunks of this sequence, at these rows
        for a in mine:
            for b, row in sorted(block):
                if not causal or b <= a:
                    rows.extend(range(row, row + c))
            cq.append(cq[-1] + c)
            ck.append(len(rows))
        off += len(theirs) * c
    return cq, ck, rows


def ring_varlen_plan(q, cu_q, cu_k, causal, rt, zigzag=False, split=False):
    """Per ring step: None (nothing to compute) or (cu_q, cu_k, max_q, max_k, keys) on q's device, keys the
    rows of the step's K/V block it attends: a (start, end) slice, or (zigzag / split) an index tensor."""
    cp, rank, t_loc = rt.world_size, rt.rank, q.shape[0]
    q_lo = rank * t_loc
    steps = []
    for step in range(cp):
        src = (rank - step) % cp
        if zigzag or split:
            cq, ck, rows = ring_zigzag_layout(cu_q, cp, rank, src, causal, zigzag=zigzag)
            steps.append(local_plan(cq, ck, device_ints(rows, torch.int64, q.device), q.device) if rows else None)
            continue
        if causal and src > rank:  # contiguous layout: later blocks are all in the future
            steps.append(None)
            continue
        k_lo = src * t_loc
        cq, ck, k0, k1 = ring_block_layout(cu_q, cu_k, q_lo, q_lo + t_loc, k_lo, k_lo + t_loc)
        if k1 == k0:
            steps.append(None)
            continue
        steps.append(local_plan(cq, ck, (k0 - k_lo, k1 - k_lo), q.device))
    return steps


def ring_varlen_forward(q, k, v, steps, causal, scale, rt):
    """q [T/cp, Hq, D], k/v [T/cp, Hkv, D] contiguous shards of the packed sequence -> out, lse [Hq, T/cp]."""
    cp = rt.world_size
    kv = torch.stack([k, v])
    out = torch.zeros((1,) + tuple(q.shape), dtype=torch.float32, device=q.device)
    lse = torch.full((1, q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for step in range(cp):
        pending = _comm.ring_shift(kv, rt) if step + 1 < cp else None
        plan = steps[step]
        if plan is not None:
            cu_q, cu_k, max_q, max_k, keys = plan
            o_b, l_b = _varlen_fwd(q, take_keys(kv[0], keys), take_keys(kv[1], keys), cu_q, cu_k, max_q, max_k,
                                   causal and step == 0, scale)
            _merge_safe(out, lse, o_b[None], l_b[None])
        if pending is not None:
            kv = pending.wait()
    return out[0].to(q.dtype), lse[0]


def ring_varlen_backward(do, q, k, v, out, lse, steps, causal, scale, rt):
    cp = rt.world_size
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    pend_dkv = None
    for step in range(cp):
        pend_kv = _comm.ring_shift(kv, rt) if step + 1 < cp else None
        if step > 0:
            dkv = pend_dkv.wait()  # the accumulator of this step's K/V block, from the previous rank
        plan = steps[step]
        if plan is not None:
            cu_q, cu_k, max_q, max_k, keys = plan
            dq_b, dk_b, dv_b = _varlen_bwd(do, q, take_keys(kv[0], keys), take_keys(kv[1], keys), out, lse, cu_q, cu_k,
                                           max_q, max_k, causal and step == 0, scale)
            dq += dq_b
            add_keys(dkv[0], keys, dk_b)
            add_keys(dkv[1], keys, dv_b)
        pend_dkv = _comm.ring_shift(dkv, rt)  # after the last step this sends the accumulator home
        if pend_kv is not None:
            kv = pend_kv.wait()
    dkv = pend_dkv.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def ring_varlen_attention(q, k, v, cu_q, cu_k, causal, scale, rt, zigzag=False, split=False, steps=None):
    """q: [T/cp, Hq, D], k/v: [T/cp, Hkv, D], rank r's shard of the packed sequence: contiguous, or with
    zigzag=True the per-sequence zigzag of cp.shard_packed (balanced causal work), or with split=True chunk r of
    cp of every sequence (ring-flash-attn's varlen layout); cu_seqlens global (validated by the caller; the
    per-sequence layouts need cu_seqlens_q == cu_seqlens_k and lengths divisible by 2*cp / cp).
    K/V blocks rotate as in ring_attention; each step attends the queries to the rows of the block their
    sequences reach (ring_block_layout / ring_zigzag_layout). steps: ring_varlen_plan's result for these
    arguments, made by the caller once per batch (None: made here). Returns o: [T/cp, Hq, D]."""
    if steps is None:
        steps = ring_varlen_plan(q, cu_q, cu_k, causal, rt, zigzag, split)
    return _Ring.apply(q, k, v, ring_varlen_forward, ring_varlen_backward, steps, causal, scale, rt)  # (o, lse [Hq, T/cp])
