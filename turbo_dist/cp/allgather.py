"""All-gather attention: gather the whole K/V sequence, attend the local queries to it.

K/V heads are cut into `num_chunks` groups; the all-gather of group g+1 runs on the comm stream
while group g is computed (heads are independent, so no LSE merge is needed). Under a causal mask
each local query chunk c attends the K/V prefix [0, (c+1)*chunk) with a bottom-right aligned mask;
with the zigzag layout that is the same work on every rank.

Backward gathers K/V again (nothing of the full sequence is kept between forward and backward),
accumulates the full-sequence dK/dV in fp32 and reduce-scatters it (group g's reduce-scatter
overlapping group g+1's compute).
"""
import torch

from turbo_dist.ops import attention_backward, attention_forward
from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints

from . import _comm
from ._varlen import add_keys, local_plan, take_keys, varlen_bwd as _varlen_bwd, varlen_fwd as _varlen_fwd
from .a2a import inverse_order, packed_zigzag_order
from .layout import chunk_ids, gathered_to_natural, natural_to_scattered


def _pick_chunks(num_chunks, hkv):
    n = max(1, min(int(num_chunks), hkv))
    while hkv % n:
        n -= 1
    return n


def _gather_kv(k, v, ks, rt):
    return _comm.all_gather(torch.stack([k[:, :, ks], v[:, :, ks]]), rt)  # -> [cp, 2, B, S_loc, kc, D]


def _q_blocks(s_loc, rank, cp, causal, load_balance):
    """(local query slice, number of visible keys in natural order, causal) per local chunk."""
    if not causal:
        return [(slice(None), None, False)]
    ids = chunk_ids(rank, cp, load_balance)
    size = s_loc // len(ids)
    return [(slice(i * size, (i + 1) * size), (c + 1) * size, True) for i, c in enumerate(ids)]


def _heads(t, hs, nc):
    return t[:, :, hs].contiguous() if nc > 1 else t


def allgather_forward(q, k, v, causal, scale, rt, load_balance, num_chunks):
    cp, rank = rt.world_size, rt.rank
    b, s_loc, hq, d = q.shape
    hkv = k.shape[2]
    nc = _pick_chunks(num_chunks, hkv)
    kc, qc = hkv // nc, hq // nc
    reorder = causal and load_balance and cp > 1
    blocks = _q_blocks(s_loc, rank, cp, causal, load_balance)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, s_loc), dtype=torch.float32, device=q.device)
    pend = _gather_kv(k, v, slice(0, kc), rt)
    for j in range(nc):
        gathered = pend.wait()
        if j + 1 < nc:
            pend = _gather_kv(k, v, slice((j + 1) * kc, (j + 2) * kc), rt)
        kv = gathered_to_natural(gathered, cp, reorder, seq_dim=2)  # [2, B, S, kc, D]
        hs = slice(j * qc, (j + 1) * qc)
        q_j = _heads(q, hs, nc)
        for qs, nk, blk_causal in blocks:
            kp, vp = (kv[0], kv[1]) if nk is None else (kv[0][:, :nk], kv[1][:, :nk])
            o_b, l_b = attention_forward(q_j[:, qs].contiguous(), kp.contiguous(), vp.contiguous(), blk_causal, scale)
            out[:, qs, hs] = o_b
            lse[:, hs, qs] = l_b
    return out, lse, nc


def allgather_backward(do, q, k, v, out, lse, causal, scale, rt, load_balance, nc):
    cp, rank = rt.world_size, rt.rank
    b, s_loc, hq, d = q.shape
    hkv = k.shape[2]
    kc, qc = hkv // nc, hq // nc
    reorder = causal and load_balance and cp > 1
    blocks = _q_blocks(s_loc, rank, cp, causal, load_balance)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    pend = _gather_kv(k, v, slice(0, kc), rt)
    pend_rs = []
    for j in range(nc):
        gathered = pend.wait()
        if j + 1 < nc:
            pend = _gather_kv(k, v, slice((j + 1) * kc, (j + 2) * kc), rt)
        kv = gathered_to_natural(gathered, cp, reorder, seq_dim=2)
        hs = slice(j * qc, (j + 1) * qc)
        q_j, do_j, o_j = _heads(q, hs, nc), _heads(do, hs, nc), _heads(out, hs, nc)
        lse_j = lse[:, hs]
        dkv = torch.zeros((2, b, cp * s_loc, kc, d), dtype=torch.float32, device=q.device)
        for qs, nk, blk_causal in blocks:
            kp, vp = (kv[0], kv[1]) if nk is None else (kv[0][:, :nk], kv[1][:, :nk])
            dq_b, dk_b, dv_b = attention_backward(
                do_j[:, qs].contiguous(), q_j[:, qs].contiguous(), kp.contiguous(), vp.contiguous(),
                o_j[:, qs].contiguous(), lse_j[:, :, qs].contiguous(), blk_causal, scale)
            dq[:, qs, hs] = dq_b
            n = dk_b.shape[1]
            dkv[0][:, :n] += dk_b
            dkv[1][:, :n] += dv_b
        pend_rs.append(_comm.reduce_scatter(natural_to_scattered(dkv, cp, reorder, seq_dim=2), rt))
    for j in range(nc):
        r = pend_rs[j].wait()  # [2, B, S_loc, kc, D] fp32, summed over ranks
        ks = slice(j * kc, (j + 1) * kc)
        dk[:, :, ks] = r[0]
        dv[:, :, ks] = r[1]
    return dq, dk, dv


class _Gathered(torch.autograd.Function):
    """fwd(q, k, v, *args) -> (out, lse, nc); backward = bwd(do, q, k, v, out, lse, *args[:-1], nc): the
    dense and the packed all-gather attention (args end with num_chunks, replaced by the nc used). Returns
    (out, lse); lse (fp32, of this rank's queries) is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, *args):
        out, lse, nc = fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.args = bwd, args[:-1] + (nc,)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @first_order_only("turbo_dist.cp attention (allgather)")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, dlse=None):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


def allgather_attention(q, k, v, causal, scale, rt, load_balance, num_chunks=2):
    return _Gathered.apply(q, k, v, allgather_forward, allgather_backward, causal, scale, rt, load_balance, num_chunks)


# ------------------------------------------------------------------------------ packed sequences
def varlen_local_layout(cu_q, cu_k, lo, hi, causal):
    """What rank rows [lo, hi) of a packed q need from the gathered packed k: (cu_q_local, cu_k_local,
    k_start, k_end) with host int lists, from the global host lists cu_q / cu_k.

    The local sequences are those from the first to the last that has q rows in [lo, hi) (any between,
    even with no q rows, are kept so that their keys stay in place). Sequence i keeps its keys
    [cu_k[i], cu_k[i+1]); under a causal mask (bottom-right aligned per sequence) the last local one ends
    where its last local query's diagonal does, cu_k[i+1] - (cu_q[i+1] - hi), which keeps the alignment of
    its local queries. Consecutive sequences' key ranges touch, so the keys are one slice of the gathered k.
    """
    n = len(cu_q) - 1
    local = [i for i in range(n) if min(cu_q[i + 1], hi) > max(cu_q[i], lo)]
    first, last = local[0], local[-1]
    k_start = cu_k[first]
    cq, ck = [0], [0]
    for i in range(first, last + 1):
        q_end = min(cu_q[i + 1], hi)
        k_end = cu_k[i + 1] - (cu_q[i + 1] - q_end) if causal else cu_k[i + 1]
        cq.append(q_end - lo)
        ck.append(max(k_end, cu_k[i]) - k_start)
    return cq, ck, k_start, k_start + ck[-1]


def thd_local_layout(cu, cp, rank, causal):
    """Megatron's THD zigzag shards (rank r: chunks r and 2cp-1-r of every sequence, `cp.shard_packed`): what
    rank `rank`'s queries need from the gathered keys. Returns (cu_q_local, cu_k_local, natural key ranges)
    as host lists: causal, each local chunk is its own query piece over its sequence's keys up to the chunk's
    end ([s, s + (r+1)c) and [s, s + (2cp-r)c): bottom-right aligned, the chunk's own causal mask); not
    causal, both chunks of a sequence form one piece over the whole sequence. Empty sequences drop out."""
    cq, ck, ranges = [0], [0], []
    for s0, s1 in zip(cu, cu[1:]):
        c = (s1 - s0) // (2 * cp)
        if c == 0:
            continue
        pieces = [(c, (rank + 1) * c), (c, (2 * cp - rank) * c)] if causal else [(2 * c, s1 - s0)]
        for nq, nk in pieces:
            cq.append(cq[-1] + nq)
            ck.append(ck[-1] + nk)
            ranges.append((s0, s0 + nk))
    return cq, ck, ranges


def allgather_varlen_plan(q, cu_q, cu_k, causal, rt, zigzag=False):
    """The local varlen call (cp._varlen.local_plan); its keys are rows of the rank-major gathered k: the
    slice (k0, k1) (contiguous shards: rank-major is natural order) or an index tensor (THD zigzag shards)."""
    cp = rt.world_size
    if zigzag and cp > 1:
        cq, ck, ranges = thd_local_layout(cu_q, cp, rt.rank, causal)
        nat = torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.int64)
        keys = device_ints(inverse_order(packed_zigzag_order(cu_q, cp))[nat], torch.int64, q.device)
    else:
        lo = rt.rank * q.shape[0]
        cq, ck, k0, k1 = varlen_local_layout(cu_q, cu_k, lo, lo + q.shape[0], causal)
        keys = (k0, k1)
    return local_plan(cq, ck, keys, q.device)


def _keys_of(pend, plan):
    """A pending gather of every rank's [1, T/cp, kc, D] k and v -> the local call's k and v [Tk, kc, D]."""
    flat = pend.wait().select(2, 0).transpose(0, 1).flatten(1, 2)  # [cp, 2, T/cp, ..] -> [2, T, ..] rank-major
    return take_keys(flat[0], plan[4]), take_keys(flat[1], plan[4])


def _scatter_dkv(dk_j, dv_j, plan, cp, t_loc):
    """The local call's dK/dV -> [cp, 2, 1, T/cp, kc, D] fp32 in the gathered (rank-major) order, to be
    reduce-scattered (keys used by several pieces are summed)."""
    kc, d = dk_j.shape[1:]
    dkv = torch.zeros((2, cp * t_loc, kc, d), dtype=torch.float32, device=dk_j.device)
    add_keys(dkv[0], plan[4], dk_j)
    add_keys(dkv[1], plan[4], dv_j)
    return dkv.view(2, cp, t_loc, kc, d).transpose(0, 1).unsqueeze(2).contiguous()


def allgather_varlen_forward(q, k, v, plan, causal, scale, rt, num_chunks):
    cu_q, cu_k, max_q, max_k = plan[:4]
    t_loc, hq, _ = q.shape
    hkv = k.shape[1]
    nc = _pick_chunks(num_chunks, hkv)
    kc, qc = hkv // nc, hq // nc
    kb, vb = k.unsqueeze(0), v.unsqueeze(0)
    out = torch.empty_like(q)
    lse = torch.empty((hq, t_loc), dtype=torch.float32, device=q.device)
    pend = _gather_kv(kb, vb, slice(0, kc), rt)
    for j in range(nc):
        kv = _keys_of(pend, plan)
        if j + 1 < nc:
            pend = _gather_kv(kb, vb, slice((j + 1) * kc, (j + 2) * kc), rt)
        hs = slice(j * qc, (j + 1) * qc)
        o_j, l_j = _varlen_fwd(q[:, hs].contiguous(), kv[0], kv[1], cu_q, cu_k, max_q, max_k, causal, scale)
        out[:, hs] = o_j
        lse[hs] = l_j
    return out, lse, nc


def allgather_varlen_backward(do, q, k, v, out, lse, plan, causal, scale, rt, nc):
    cu_q, cu_k, max_q, max_k = plan[:4]
    cp = rt.world_size
    t_loc, hq, d = q.shape
    hkv = k.shape[1]
    kc, qc = hkv // nc, hq // nc
    kb, vb = k.unsqueeze(0), v.unsqueeze(0)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pend = _gather_kv(kb, vb, slice(0, kc), rt)
    pend_rs = []
    for j in range(nc):
        kv = _keys_of(pend, plan)
        if j + 1 < nc:
            pend = _gather_kv(kb, vb, slice((j + 1) * kc, (j + 2) * kc), rt)
        hs = slice(j * qc, (j + 1) * qc)
        dq_j, dk_j, dv_j = _varlen_bwd(
            do[:, hs].contiguous(), q[:, hs].contiguous(), kv[0], kv[1],
            out[:, hs].contiguous(), lse[hs].contiguous(), cu_q, cu_k, max_q, max_k, causal, scale)
        dq[:, hs] = dq_j
        pend_rs.append(_comm.reduce_scatter(_scatter_dkv(dk_j, dv_j, plan, cp, t_loc), rt))
    for j in range(nc):
        r = pend_rs[j].wait()  # [2, 1, T/cp, kc, D] fp32, summed over ranks
        ks = slice(j * kc, (j + 1) * kc)
        dk[:, ks] = r[0, 0]
        dv[:, ks] = r[1, 0]
    return dq, dk, dv


def allgather_varlen_attention(q, k, v, cu_q, cu_k, causal, scale, rt, num_chunks=2, zigzag=False, plan=None):
    """q: [T/cp, Hq, D], k/v: [T/cp, Hkv, D], rank r's shard of the packed sequence: contiguous, or (zigzag)
    Megatron's THD layout (chunks r and 2cp-1-r of every sequence; then cu_q == cu_k); cu_q / cu_k: the global
    cu_seqlens as host lists (validated by the caller). K/V are gathered (head groups pipelined) and cut to
    the keys this rank's queries need; dK/dV are reduce-scattered back. plan: allgather_varlen_plan's result for
    these arguments, made by the caller once per batch (None: made here). Returns o: [T/cp, Hq, D]."""
    if plan is None:
        plan = allgather_varlen_plan(q, cu_q, cu_k, causal, rt, zigzag)
    return _Gathered.apply(q, k, v, allgather_varlen_forward, allgather_varlen_backward, plan, causal, scale, rt,
                           num_chunks)
