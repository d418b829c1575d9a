"""Triton kernels of the MoE low-latency mode's receive side: placing the received tokens into DeepEP's
per-expert layout (dispatch) and summing a token's returned expert rows (combine).

moe/ll_layout.place_tokens (torch ops) is the reference these match: same outputs, bit for bit, in two
launches instead of ~40 small ones (what decoding pays in launch latency, eager or in a CUDA graph):

- `_ll_place_index_kernel`, one program per local expert (plus one for the entries no local expert takes):
  scans every received (source, token, k) entry in order, gives each of its expert's entries the next slot
  (the running count, a cumsum per block), and writes dst, src_info, the expert's count, its per-source
  layout_range and the cumulative stats.
- `_ll_place_rows_kernel`, one program per entry: copies the entry's token row to its slot (int32 words) and,
  for FP8, its scales into the caller's scale layout (any strides, e.g. DeepEP's column-major one), packed as
  UE8M0 exponent bytes if asked.
- `_ll_combine_reduce_kernel`, one program per (token, column block): out = sum over k, in top-k order, of
  weight * row (fp32), skipping k with expert id -1.
"""
import torch
import triton
import triton.language as tl

from .moe_ll import _words


@triton.jit
def _ll_place_index_kernel(idx_ptr, dst_ptr, src_info_ptr, count_ptr, range_ptr, stats_ptr,
                           num_src, per_src, lo, E_L, N_SLOTS,
                           K: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK: tl.constexpr):
    # idx: [num_src * per_src] expert ids of entry (s, t, k) at s * per_src + t * K + k (per_src = M * K).
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if e == E_L:  # entries for other ranks' experts (or -1): no slot here
        for b in range(0, num_src * per_src, BLOCK):
            i = b + offs
            m = i < num_src * per_src
            v = tl.load(idx_ptr + i, mask=m, other=-1)
            mine = (v >= lo) & (v < lo + E_L)
            tl.store(dst_ptr + i, tl.full([BLOCK], -1, tl.int64), mask=m & (mine == 0))
    else:
        carry = tl.sum(offs * 0, 0)  # an int32 scalar 0 the loops can carry
        for s in range(num_src):
            begin = carry
            for b in range(0, per_src, BLOCK):
                j = b + offs
                m = j < per_src
                i = s * per_src + j
                hit = (tl.load(idx_ptr + i, mask=m, other=-1) == lo + e) & m
                h = hit.to(tl.int32)
                pos = carry + tl.cumsum(h, 0) - 1
                keep = hit & (pos < N_SLOTS)  # an entry repeating an expert can overflow its slots: dropped
                tl.store(dst_ptr + i, tl.where(keep, e * N_SLOTS + pos, -1).to(tl.int64), mask=hit)
                tl.store(src_info_ptr + e * N_SLOTS + pos, j // K, mask=keep)
                carry += tl.sum(h, 0)
            tl.store(range_ptr + e * num_src + s, (begin.to(tl.int64) << 32) | (carry - begin).to(tl.int64))
        count = tl.minimum(carry, N_SLOTS)
        tl.store(count_ptr + e, count)
        for b in range(0, N_SLOTS, BLOCK):
            j = b + offs
            tl.store(src_info_ptr + e * N_SLOTS + j, tl.full([BLOCK], -1, tl.int32), mask=(j >= count) & (j < N_SLOTS))
        if HAS_STATS:
            tl.store(stats_ptr + e, tl.load(stats_ptr + e) + count)


@triton.jit
def _ll_place_rows_kernel(src_ptr, target_ptr, out_ptr, s_src_ptr, s_out_ptr, N_SLOTS,
                          stride_se, stride_sn, stride_sg,
                          K: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr, HAS_S: tl.constexpr,
                          GROUPS: tl.constexpr, G_POW2: tl.constexpr, UE8M0: tl.constexpr):
    # Entry i = (row, k): source row i // K to output row target[i] (skipped where target < 0); its scales
    # (fp32 [GROUPS] per row) to s_out[e, pos, :] with target = e * N_SLOTS + pos; UE8M0: the exponent bytes
    # of groups 4w..4w+3 packed into int32 word w (byte j = group 4w + j).
    i = tl.program_id(0)
    tgt = tl.load(target_ptr + i)
    if tgt >= 0:
        src = (i // K).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        for c in range(0, WORDS, BLOCK):
            m = (c + offs) < WORDS
            v = tl.load(src_ptr + src * WORDS + c + offs, mask=m)
            tl.store(out_ptr + tgt * WORDS + c + offs, v, mask=m)
        if HAS_S:
            e = tgt // N_SLOTS
            pos = tgt % N_SLOTS
            s_out = s_out_ptr + e * stride_se + pos * stride_sn
            if UE8M0:
                w = tl.arange(0, G_POW2 // 4)
                j = tl.arange(0, 4)
                wm = (w < GROUPS // 4)[:, None]
                sv = tl.load(s_src_ptr + src * GROUPS + w[:, None] * 4 + j[None, :], mask=wm, other=1.0)
                exp = (sv.to(tl.int32, bitcast=True) >> 23) & 0xFF
                tl.store(s_out + w * stride_sg, tl.sum(exp << (j * 8)[None, :], 1), mask=w < GROUPS // 4)
            else:
                g = tl.arange(0, G_POW2)
                sv = tl.load(s_src_ptr + src * GROUPS + g, mask=g < GROUPS)
                tl.store(s_out + g * stride_sg, sv, mask=g < GROUPS)


@triton.jit
def _ll_combine_reduce_kernel(rows_ptr, idx_ptr, w_ptr, out_ptr, H, stride_it, stride_ik, stride_wt, stride_wk,
                              stride_ot, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # rows: [M, K, H] (slot [t, k]: what expert idx[t, k] returned for token t); out[t] = sum_k w[t, k] * rows[t, k]
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(idx_ptr + t * stride_it + k * stride_ik)
        if e >= 0:
            w = tl.load(w_ptr + t * stride_wt + k * stride_wk)
            r = tl.load(rows_ptr + (t * K + k) * H + offs, mask=m, other=0.0).to(tl.float32)
            acc += r * w
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def place(rows_x, rows_s, all_idx, rank, experts_per_rank, out_x, scales, ue8m0, count, src_info, layout_range, dst,
          stats=None):
    """Fill DeepEP's per-expert layout from the received slots; what ll_layout.place_tokens computes.

    rows_x: [R * M, H] payload of slot (source s, token t) at row s * M + t (rows of whole 4-byte words);
    rows_s: [R * M, G] fp32 scales or None; all_idx: [R, M, K] expert ids (int32/int64, -1: none).
    Written: out_x rows e * R * M + pos (at least E_l * R * M rows), scales[e, pos, :] (a [E_l, R * M, G] fp32
    view of any strides, or int32 [E_l, R * M, G / 4] with ue8m0), count [E_l] int32, src_info [E_l, R * M]
    int32, layout_range [E_l, R] int64, dst [R * M, K] int64 (contiguous), stats [E_l] int32 += count.
    """
    num_src, m, k = all_idx.shape
    n_slots = num_src * m
    idx = all_idx.contiguous()
    for name, t, dt in (("count", count, torch.int32), ("src_info", src_info, torch.int32),
                        ("layout_range", layout_range, torch.int64), ("dst", dst, torch.int64)):
        if t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} tensor, got {t.dtype} strides {t.stride()}")
    _ll_place_index_kernel[(experts_per_rank + 1,)](
        idx, dst, src_info, count, layout_range, stats if stats is not None else count,
        num_src, m * k, rank * experts_per_rank, experts_per_rank, n_slots,
        K=k, HAS_STATS=stats is not None, BLOCK=min(1024, triton.next_power_of_2(max(m * k, 16))), num_warps=4)
    if dst.numel() == 0:
        return
    words = _words(rows_x.contiguous(), "received rows")
    groups = rows_s.size(1) if rows_s is not None else 1
    s_src = rows_s.contiguous() if rows_s is not None else words
    s_out = scales if rows_s is not None else words
    strides = scales.stride() if rows_s is not None else (0, 0, 0)
    _ll_place_rows_kernel[(dst.numel(),)](
        words, dst, _words(out_x, "out_x"), s_src, s_out, n_slots,
        *strides, K=k, WORDS=words.size(1), BLOCK=1024, HAS_S=rows_s is not None, GROUPS=groups,
        G_POW2=max(triton.next_power_of_2(groups), 4), UE8M0=bool(ue8m0), num_warps=4)


def combine_reduce(rows, topk_idx, topk_weights, out):
    """out [T, H] = sum over k (top-k order, fp32) of topk_weights[t, k] * rows[t, k] where topk_idx[t, k] >= 0;
    rows: the contiguous [M >= T, K, H] combine slots."""
    t, k = topk_idx.shape
    h = rows.size(2)
    if t == 0:
        return out
    if not rows.is_contiguous() or out.stride(1) != 1:
        raise ValueError("combine_reduce needs contiguous rows and out rows with unit stride")
    block = min(1024, triton.next_power_of_2(h))
    _ll_combine_reduce_kernel[(t, triton.cdiv(h, block))](
        rows, topk_idx, topk_weights, out, h, *topk_idx.stride(), *topk_weights.stride(), out.stride(0),
        K=k, BLOCK_H=block, num_warps=4)
    return out
