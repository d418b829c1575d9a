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

Backward rotates K/V the same way and sends the fp32 dK/dV accumulator along with them, one
step behind; after cp steps it arrives back at its owner. GQA: K/V keep their own head count
(the attention kernels handle the grouping), nothing is repeated in memory.
"""
import torch
import torch.nn.functional as F

from turbo_dist.ops import attention_backward, attention_forward

from . import _comm

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


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, rt, load_balance):
        out, lse = ring_forward(q, k, v, causal, scale, rt, load_balance)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, rt, load_balance)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, rt, load_balance = ctx.args
        dq, dk, dv = ring_backward(do.contiguous(), q, k, v, out, lse, causal, scale, rt, load_balance)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, causal, scale, rt, load_balance):
    return RingAttention.apply(q, k, v, causal, scale, rt, load_balance)
