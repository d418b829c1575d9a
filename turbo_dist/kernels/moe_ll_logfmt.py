"""LogFMT for the low-latency combine (DeepEP's `use_logfmt`): expert rows travel as 10-bit log-magnitude codes
with a per-64-channel range instead of bf16, 88 bytes per 64 values instead of 128 (1.45x fewer bytes on NVLink).

Our own encoding (DeepEP's bit layout is internal to it; only the numerics are comparable): for each group of
64 values, lmax = the largest log2|x| over the group's nonzero values, lmin = the smallest, clipped to at most
LOG_RANGE = 32 octaves below lmax, step = (lmax - lmin) / 510; a value is sign bit (bit 9) + magnitude q in bits
0-8: q = 1 + round((log2|x| - lmin) / step) in [1, 511], decoded as 2 ** (lmin + (q - 1) * step), and q = 0 (sent
as zero) for an exact zero or a value whose rounding falls below lmin (more than 32 octaves below the group's
largest: an absolute error under 2 ** -32 of the group's largest magnitude). The relative error of a value that is
not flushed is at most 2 ** (step / 2) - 1: 1% when a group spans 15 octaves, 2.2% at most (a span of 32 or more;
without the clip one tiny value, a cancellation's 1e-30 beside a 1, made it 7% for the whole group). Values are
finite (inf / nan are not carried).
Wire layout of one row of H values (H % 64 == 0): [H / 64] groups of 88 bytes (22 int32 words): bytes 0-63 the
low 8 bits of value e's code at byte e, bytes 64-79 the top 2 bits at byte 64 + e // 4, bits 2 * (e % 4), then
lmin and step as fp32. Byte-aligned so that the kernels encode and decode a tile of whole groups at once.

`logfmt_encode` / `logfmt_decode` are the torch reference of the codec; the kernels are the combine's send (encode
into the source's slots) and reduce (decode, weight and sum).
"""
import torch
import triton
import triton.language as tl

from .moe_ll import masked

GROUP = 64          # values per group
GROUP_BYTES = 88    # 64 low bytes + 16 bytes of 2-bit tops + lmin, step
GROUP_WORDS = GROUP_BYTES // 4
MAX_Q = 511
LOG_RANGE = 32.0    # octaves below the group's largest magnitude that are kept (smaller values are sent as zero)
_LOG_RANGE_K = tl.constexpr(LOG_RANGE)  # the same inside the kernels (Triton reads constexpr globals only)
_SEND_GROUPS = 16   # groups one send-kernel iteration encodes


def row_bytes(hidden):
    """Bytes one LogFMT row of `hidden` values takes on the wire."""
    return hidden // GROUP * GROUP_BYTES


# ----------------------------------------------------------------------------- torch reference
def logfmt_encode(x):
    """x [rows, H] float (H % 64 == 0) -> int32 words [rows, H / 64, 22] (see the module docstring)."""
    rows, h = x.shape
    v = x.float().view(rows, h // GROUP, GROUP)
    a = v.abs()
    nz = a > 0
    lg = torch.log2(torch.where(nz, a, torch.ones_like(a)))
    inf = torch.full_like(lg, float("inf"))
    lmin = torch.where(nz, lg, inf).amin(2)
    lmax = torch.where(nz, lg, -inf).amax(2)
    any_nz = nz.any(2)
    lmin = torch.where(any_nz, lmin, torch.zeros_like(lmin))
    lmax = torch.where(any_nz, lmax, torch.zeros_like(lmax))
    lmin = torch.maximum(lmin, lmax - LOG_RANGE)
    step = (lmax - lmin) / (MAX_Q - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(2)
    q = torch.where(step.unsqueeze(2) > 0, torch.floor((lg - lmin.unsqueeze(2)) / safe + 0.5), torch.zeros_like(lg))
    keep = nz & (q >= 0)  # below the clipped range: sent as zero
    q = (q + 1).clamp(1, MAX_Q).to(torch.int32)
    code = torch.where(keep, q | ((v < 0).to(torch.int32) << 9), torch.zeros_like(q))
    low = (code & 0xFF).to(torch.uint8)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=x.device)
    tops = (((code >> 8) & 3).view(rows, h // GROUP, GROUP // 4, 4) << shifts).sum(3).to(torch.uint8)
    meta = torch.stack([lmin, step], 2).contiguous().view(torch.uint8)
    return torch.cat([low, tops, meta], 2).contiguous().view(torch.int32)


def logfmt_decode(words, hidden):
    """int32 words [rows, H / 64, 22] -> fp32 [rows, H]."""
    rows = words.size(0)
    b = words.contiguous().view(torch.uint8)
    meta = b[:, :, 80:].contiguous().view(torch.float32)
    lmin, step = meta[:, :, 0:1], meta[:, :, 1:2]
    e = torch.arange(GROUP, device=words.device)
    code = b[:, :, :GROUP].to(torch.int32) | (((b[:, :, 64 + e // 4].to(torch.int32) >> (2 * (e % 4))) & 3) << 8)
    q = (code & MAX_Q).float()
    mag = torch.where(q > 0, torch.exp2(lmin + (q - 1) * step), torch.zeros_like(q))
    return torch.where((code >> 9) & 1 == 1, -mag, mag).view(rows, hidden)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _ll_combine_send_logfmt_kernel(y_ptr, dst_ptr, peer_ptrs, me, num_max, comb_off, cnt_off,
                                   H: tl.constexpr, K: tl.constexpr, GB: tl.constexpr, mask_ptr=None,
                                   HAS_MASK: tl.constexpr = False):
    # kernels/moe_ll.py _ll_combine_send_kernel's program (s * M + t, k), the row LogFMT-encoded into slot [t, k],
    # GB groups per iteration as a [GB, 16, 4] tile (value e = 4 i + b of a group at [., i, b]).
    NG: tl.constexpr = H // 64
    pid = tl.program_id(0)
    k = tl.program_id(1)
    s = pid // num_max
    t = pid % num_max
    if HAS_MASK:
        if tl.load(mask_ptr + s) != 0:
            return
    base = tl.load(peer_ptrs + s)
    src = tl.load(dst_ptr + pid.to(tl.int64) * K + k)
    if src >= 0:
        slot = (t * K + k).to(tl.int64)
        out = (base + comb_off).to(tl.pointer_type(tl.uint8)) + slot * (NG * 88)
        gi = tl.arange(0, GB)
        i = tl.arange(0, 16)
        b = tl.arange(0, 4)
        for g0 in range(0, NG, GB):
            gm = (g0 + gi) < NG
            e = (g0 + gi)[:, None, None] * 64 + i[None, :, None] * 4 + b[None, None, :]
            v = tl.load(y_ptr + src * H + e, mask=gm[:, None, None], other=0.0).to(tl.float32)
            a = tl.abs(v)
            nz = a > 0
            lg = tl.log2(tl.where(nz, a, 1.0))
            lmin = tl.min(tl.min(tl.where(nz, lg, float("inf")), 2), 1)
            lmax = tl.max(tl.max(tl.where(nz, lg, float("-inf")), 2), 1)
            any_nz = tl.max(tl.max(nz.to(tl.int32), 2), 1) > 0
            lmin = tl.where(any_nz, lmin, 0.0)
            lmax = tl.where(any_nz, lmax, 0.0)
            lmin = tl.maximum(lmin, lmax - _LOG_RANGE_K)  # at most LOG_RANGE octaves kept below the largest
            step = (lmax - lmin) / 510.0
            safe = tl.where(step > 0, step, 1.0)
            q = tl.where(step[:, None, None] > 0, tl.floor((lg - lmin[:, None, None]) / safe[:, None, None] + 0.5), 0.0)
            keep = nz & (q >= 0.0)  # below the clipped range: sent as zero
            q = tl.minimum(tl.maximum(q + 1.0, 1.0), 511.0).to(tl.int32)
            code = tl.where(keep, q | ((v < 0).to(tl.int32) << 9), 0)
            gbase = out + (g0 + gi) * 88
            low = tl.sum((code & 0xFF) << (8 * b)[None, None, :], 2)  # 4 low bytes per word, little-endian
            wp = gbase.to(tl.pointer_type(tl.int32))
            tl.store(wp[:, None] + i[None, :], low, mask=gm[:, None])
            tops = tl.sum(((code >> 8) & 3) << (2 * b)[None, None, :], 2)
            tl.store(gbase[:, None] + 64 + i[None, :], tops.to(tl.uint8), mask=gm[:, None])
            mp = (gbase + 80).to(tl.pointer_type(tl.float32))
            tl.store(mp, lmin, mask=gm)
            tl.store(mp + 1, step, mask=gm)
    tl.debug_barrier()
    cnt = (base + cnt_off).to(tl.pointer_type(tl.int64))
    tl.atomic_add(cnt + me, 1, sem="release", scope="sys")


@triton.jit
def _ll_combine_reduce_logfmt_kernel(rows_ptr, idx_ptr, w_ptr, out_ptr, stride_it, stride_ik, stride_wt, stride_wk,
                                     stride_ot, H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # rows: uint8 [M, K, H / 64, 88] LogFMT groups; out[t] = sum_k w[t, k] * decode(rows[t, k]) (fp32, top-k order).
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = i < H
    g = i // 64
    e = i % 64
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        x = tl.load(idx_ptr + t * stride_it + k * stride_ik)
        if x >= 0:
            wt = tl.load(w_ptr + t * stride_wt + k * stride_wk)
            grp = rows_ptr + (t * K + k) * (H // 64 * 88) + g * 88
            low = tl.load(grp + e, mask=m, other=0).to(tl.int32)
            top = tl.load(grp + 64 + e // 4, mask=m, other=0).to(tl.int32)
            lmin = tl.load((grp + 80).to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
            step = tl.load((grp + 84).to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
            code = low | (((top >> (2 * (e % 4))) & 3) << 8)
            q = (code & 511).to(tl.float32)
            mag = tl.where(q > 0, tl.exp2(lmin + (q - 1.0) * step), 0.0)
            acc += tl.where(((code >> 9) & 1) == 1, -mag, mag) * wt
    tl.store(out_ptr + t * stride_ot + i, acc.to(out_ptr.dtype.element_ty), mask=m)


def combine_send(y, dst, peer_ptrs, me, num_ranks, num_max, comb_off, cnt_off, mask=None):
    """kernels/moe_ll.combine_send with each row LogFMT-encoded: y [rows, H] bf16/fp16 contiguous, H % 64 == 0;
    the source's region holds [num_max, K, row_bytes(H)]. Same programs and counts as the bf16 send."""
    h = y.size(1)
    if h % GROUP or not y.is_contiguous():
        raise ValueError(f"LogFMT combine needs a contiguous x with hidden divisible by {GROUP}, got {tuple(y.shape)}")
    k = dst.size(1)
    _ll_combine_send_logfmt_kernel[(num_ranks * num_max, k)](
        y, dst.contiguous(), peer_ptrs, me, num_max, comb_off, cnt_off, H=h, K=k,
        GB=min(_SEND_GROUPS, triton.next_power_of_2(h // GROUP)), num_warps=4, **masked(mask))


def combine_reduce(rows, topk_idx, topk_weights, out):
    """out [T, H] = sum over k (top-k order, fp32) of topk_weights[t, k] * decode(rows[t, k]) where topk_idx >= 0;
    rows: int32 words [M >= T, K, H / 64, 22], contiguous."""
    t, k = topk_idx.shape
    h = out.size(1)
    if t == 0:
        return out
    if not rows.is_contiguous() or out.stride(1) != 1:
        raise ValueError("LogFMT combine_reduce needs contiguous rows and out rows with unit stride")
    block = min(1024, triton.next_power_of_2(h))
    _ll_combine_reduce_logfmt_kernel[(t, triton.cdiv(h, block))](
        rows.view(torch.uint8), topk_idx, topk_weights, out, *topk_idx.stride(), *topk_weights.stride(), out.stride(0),
        H=h, K=k, BLOCK_H=block, num_warps=4)
    return out
