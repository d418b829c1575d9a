"""All-to-all ("Ulysses") attention: trade the sequence shard for a head shard, attend, trade back.

Rank j receives every rank's sequence shard of heads [j*Hq/cp, (j+1)*Hq/cp) (and the matching K/V
heads), runs ordinary attention on the full sequence, and returns each rank its sequence shard of
those heads. Heads are cut into `num_chunks` groups that are pipelined: every group's input all-to-alls
(q and packed k/v) are launched up front, so those of groups g+1.. and the output all-to-all of group g-1
overlap with group g's attention (all groups' received inputs are alive at the start, each released once
its attention has run).

GQA: with Hkv divisible by cp each rank receives Hkv/cp K/V heads; with Hkv < cp (cp divisible by
Hkv) each K/V head is replicated cp/Hkv times before the exchange (its gradients summed after).
Causal masks need the natural token order: with the zigzag layout the gathered sequence is
permuted once on arrival (and its outputs permuted back); non-causal attention needs no permute.

Packed variable-length sequences (`a2a_varlen_attention`): the same exchange on the B=1 view of
contiguous shards [T/cp, H, D]; each rank runs varlen attention on the whole packed sequence with
the global cu_seqlens (the inner kernels are the only difference: `kernels`).
"""
import torch

from turbo_dist.ops import attention_backward, attention_forward
from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints

from . import _comm
from ._varlen import varlen_bwd, varlen_fwd
from .layout import gathered_to_natural, natural_to_scattered


def kv_replication(hq, hkv, cp):
    """How many times each K/V head is replicated so that every rank gets whole K/V heads."""
    if hq % cp:
        raise ValueError(f"a2a (Ulysses) CP needs q heads divisible by the CP size: {hq} heads, cp={cp}")
    if hkv % cp == 0:
        return 1
    if cp % hkv == 0:
        return cp // hkv
    raise ValueError(
        f"a2a (Ulysses) CP needs kv heads divisible by cp or cp divisible by kv heads: {hkv} kv heads, cp={cp}"
    )


def _pick_chunks(num_chunks, hk_per_rank):
    n = max(1, min(int(num_chunks), hk_per_rank))
    while hk_per_rank % n:
        n -= 1
    return n


def _to_rank_major(x, cp, heads):
    """x: [B, S_loc, cp*h, D], taking head slice `heads` of each rank's group -> [cp, B, S_loc, hc, D]."""
    b, s, h, d = x.shape
    return x.view(b, s, cp, h // cp, d)[:, :, :, heads].permute(2, 0, 1, 3, 4)


def _heads_sharded(x, cp, heads, rt):
    """Launch the all-to-all of one head group: returns Pending of [cp, B, S_loc, hc, D]."""
    return _comm.all_to_all(_to_rank_major(x, cp, heads).contiguous(), rt)


def _write_back(dst, recv, cp, heads):
    """dst [B, S_loc, cp*h, D] <- recv [cp, B, S_loc, hc, D] for head slice `heads` of every rank's group."""
    b, s, h, d = dst.shape
    dst.view(b, s, cp, h // cp, d)[:, :, :, heads] = recv.permute(1, 2, 0, 3, 4)


def a2a_forward(q, k, v, causal, scale, rt, load_balance, num_chunks, kernels=None, want_lse=False):
    attn_fwd = kernels[0] if kernels is not None else attention_forward
    cp = rt.world_size
    b, s_loc, hq, d = q.shape
    rep = kv_replication(hq, k.shape[2], cp)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    hp, hk = hq // cp, k.shape[2] // cp
    nc = _pick_chunks(num_chunks, hk)
    qc, kc = hp // nc, hk // nc
    reorder = causal and load_balance and cp > 1
    kv = torch.stack([k, v], dim=0)  # [2, B, S_loc, Hkv', D]

    pend_in = []
    for j in range(nc):
        qs, ks = slice(j * qc, (j + 1) * qc), slice(j * kc, (j + 1) * kc)
        send_kv = kv.view(2, b, s_loc, cp, hk, d)[:, :, :, :, ks].permute(3, 0, 1, 2, 4, 5)
        pend_in.append((_heads_sharded(q, cp, qs, rt), _comm.all_to_all(send_kv.contiguous(), rt)))

    out = torch.empty_like(q)
    saved, pend_out, pend_lse = [], [], []
    for j in range(nc):
        rq, rkv = pend_in[j][0].wait(), pend_in[j][1].wait()
        pend_in[j] = None  # its received buffers are not held past their use
        q_h = gathered_to_natural(rq, cp, reorder, seq_dim=1).contiguous()  # [B, S, qc, D]
        kv_h = gathered_to_natural(rkv, cp, reorder, seq_dim=2).contiguous()  # [2, B, S, kc, D]
        del rq, rkv
        o_h, lse_h = attn_fwd(q_h, kv_h[0], kv_h[1], causal, scale)
        pend_out.append(_comm.all_to_all(natural_to_scattered(o_h, cp, reorder, seq_dim=1), rt))
        if want_lse:  # the output's way back, lse [B, qc, S] viewed as [B, S, qc, 1]
            lse_t = lse_h.float().transpose(1, 2).unsqueeze(-1)
            pend_lse.append(_comm.all_to_all(natural_to_scattered(lse_t, cp, reorder, seq_dim=1), rt))
        saved += [q_h, kv_h, o_h, lse_h]
    for j in range(nc):
        _write_back(out, pend_out[j].wait(), cp, slice(j * qc, (j + 1) * qc))
    lse = None
    if want_lse:
        lse4 = torch.empty((b, s_loc, hq, 1), dtype=torch.float32, device=q.device)
        for j in range(nc):
            _write_back(lse4, pend_lse[j].wait(), cp, slice(j * qc, (j + 1) * qc))
        lse = lse4[..., 0].transpose(1, 2).contiguous()  # [B, Hq, S_loc]
    return out, lse, saved, (rep, nc)


def a2a_backward(do, saved, causal, scale, rt, load_balance, rep, nc, k_shape, kernels=None):
    attn_bwd = kernels[1] if kernels is not None else attention_backward
    cp = rt.world_size
    b, s_loc, hq, d = do.shape
    hp = hq // cp
    qc = hp // nc
    reorder = causal and load_balance and cp > 1
    hk_total = k_shape[2] * rep
    kc = hk_total // cp // nc

    pend_do = [_heads_sharded(do, cp, slice(j * qc, (j + 1) * qc), rt) for j in range(nc)]
    pend = []
    for j in range(nc):
        q_h, kv_h, o_h, lse_h = saved[4 * j: 4 * j + 4]
        do_h = gathered_to_natural(pend_do[j].wait(), cp, reorder, seq_dim=1).contiguous()
        pend_do[j] = None
        dq_h, dk_h, dv_h = attn_bwd(do_h, q_h, kv_h[0], kv_h[1], o_h, lse_h, causal, scale)
        send_dq = natural_to_scattered(dq_h, cp, reorder, seq_dim=1)
        send_dkv = natural_to_scattered(torch.stack([dk_h, dv_h]), cp, reorder, seq_dim=2)
        pend.append((_comm.all_to_all(send_dq, rt), _comm.all_to_all(send_dkv, rt)))

    dq = torch.empty_like(do)
    dkv = torch.empty((2, b, s_loc, hk_total, d), dtype=saved[1].dtype, device=do.device)
    hk = hk_total // cp
    for j in range(nc):
        _write_back(dq, pend[j][0].wait(), cp, slice(j * qc, (j + 1) * qc))
        rkv = pend[j][1].wait()  # [cp, 2, B, S_loc, kc, D]
        dkv.view(2, b, s_loc, cp, hk, d)[:, :, :, :, j * kc:(j + 1) * kc] = rkv.permute(1, 2, 3, 0, 4, 5)
    if rep > 1:
        dkv = dkv.float().view(2, b, s_loc, k_shape[2], rep, d).sum(4).to(dkv.dtype)
    return dq, dkv[0], dkv[1]


class A2AAttention(torch.autograd.Function):
    """Returns (out, lse): lse [B, Hq, S_loc] fp32 of this rank's queries when want_lse (one more all-to-all
    per head group), else an empty tensor; not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, rt, load_balance, num_chunks, kernels=None, want_lse=False):
        out, lse, saved, (rep, nc) = a2a_forward(q, k, v, causal, scale, rt, load_balance, num_chunks, kernels,
                                                 want_lse)
        ctx.save_for_backward(*saved)
        ctx.args = (causal, scale, rt, load_balance, rep, nc, tuple(k.shape), kernels)
        lse = lse if lse is not None else q.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @first_order_only("turbo_dist.cp attention (a2a)")  # no double backward: a clear error, not wrong numbers
    def backward(ctx, do, dlse=None):
        causal, scale, rt, load_balance, rep, nc, k_shape, kernels = ctx.args
        dq, dk, dv = a2a_backward(do.contiguous(), list(ctx.saved_tensors), causal, scale, rt, load_balance,
                                  rep, nc, k_shape, kernels)
        return dq, dk, dv, None, None, None, None, None, None, None


def a2a_attention(q, k, v, causal, scale, rt, load_balance, num_chunks=2, want_lse=False):
    """-> (out [B, S/cp, Hq, D], lse [B, Hq, S/cp] fp32 if want_lse else empty; lse not differentiable)."""
    kv_replication(q.shape[2], k.shape[2], rt.world_size)  # validate before any communication
    return A2AAttention.apply(q, k, v, causal, scale, rt, load_balance, num_chunks, None, want_lse)


def _varlen_kernels(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The dense kernel signature on a B=1 view [1, T, h, D], running packed varlen attention."""
    def fwd(q, k, v, causal, scale):
        o, lse = varlen_fwd(q[0], k[0], v[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
        return o.unsqueeze(0), lse.unsqueeze(0)

    def bwd(do, q, k, v, o, lse, causal, scale):
        dq, dk, dv = varlen_bwd(do[0], q[0], k[0], v[0], o[0], lse[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, causal, scale)
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)

    return fwd, bwd


def packed_zigzag_order(cu_seqlens, cp):
    """Megatron / TransformerEngine THD layout under context parallelism: every sequence (length divisible by
    2*cp) is cut into 2*cp chunks and rank r holds chunks r and 2cp-1-r of each, sequence after sequence.
    Returns the global (natural) position of each token of the rank-major concatenation of all ranks' local
    shards, int64 [T] (host)."""
    cu = [int(x) for x in cu_seqlens]
    pieces = []
    for r in range(cp):
        for s0, s1 in zip(cu, cu[1:]):
            c = (s1 - s0) // (2 * cp)
            pieces += [torch.arange(s0 + r * c, s0 + (r + 1) * c),
                       torch.arange(s0 + (2 * cp - 1 - r) * c, s0 + (2 * cp - r) * c)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def inverse_order(perm):
    """The inverse of a permutation (int64 [T]): inverse_order(p)[p[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _permuted(kernels, g2n):
    """Kernels of the B=1 view taking the rank-major gathered order (position p holds natural token g2n[p]):
    the wrapped varlen kernels run in natural order, the results go back to the gathered order."""
    fwd0, bwd0 = kernels
    n2g = inverse_order(g2n)

    def fwd(q, k, v, causal, scale):
        o, lse = fwd0(q[:, n2g], k[:, n2g], v[:, n2g], causal, scale)
        return o[:, g2n], lse[:, :, g2n]

    def bwd(do, q, k, v, o, lse, causal, scale):
        dq, dk, dv = bwd0(do[:, n2g], q[:, n2g], k[:, n2g], v[:, n2g], o[:, n2g], lse[:, :, n2g].contiguous(),
                          causal, scale)
        return dq[:, g2n], dk[:, g2n], dv[:, g2n]

    return fwd, bwd


def a2a_varlen_order(q, host_cu, rt):
    """The zigzag layout's gathered-to-natural permutation on q's device (packed_zigzag_order), made once per batch."""
    return device_ints(packed_zigzag_order(host_cu, rt.world_size), torch.int64, q.device)


def a2a_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, rt,
                         num_chunks=2, zigzag=False, host_cu=None, want_lse=False, order=None):
    """q: [T/cp, Hq, D], k/v: [T/cp, Hkv, D], rank r's shard of the packed sequence: contiguous (shard r), or
    with zigzag=True the per-sequence zigzag of Megatron's THD layout (packed_zigzag_order; the caller checked
    cu_seqlens_q == cu_seqlens_k, each length divisible by 2*cp; host_cu: cu_seqlens_q as a host list, needed then).
    cu_seqlens global (validated by the caller). order: a2a_varlen_order's result (zigzag; None: made here).
    Returns (o [T/cp, Hq, D], lse [Hq, T/cp] fp32 if want_lse else empty)."""
    kv_replication(q.shape[1], k.shape[1], rt.world_size)  # validate before any communication
    kernels = _varlen_kernels(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if zigzag and rt.world_size > 1:
        kernels = _permuted(kernels, order if order is not None else a2a_varlen_order(q, host_cu, rt))
    out, lse = A2AAttention.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, scale, rt, False,
                                  num_chunks, kernels, want_lse)
    return out[0], (lse[0] if want_lse else lse)
