"""LogFMT for the low-latency combine (DeepEP's `use_logfmt`): expert rows travel as 10-bit log-magnitude codes
with a per-64-channel range instead of bf16, 96 bytes per 64 values instead of 128 (1.33x fewer bytes on NVLink).

Our own encoding (DeepEP's bit layout is internal to it; only the numerics are comparable): for each group of
64 values, lmin / lmax = the smallest / largest log2|x| over the group's nonzero values, step = (lmax - lmin) / 510;
a value is sign bit (bit 9) + magnitude q in bits 0-8: q = 0 for an exact zero, else 1 + round((log2|x| - lmin) /
step) in [1, 511], decoded as 2 ** (lmin + (q - 1) * step). The relative error of a value is at most
2 ** (step / 2) - 1 (e.g. 1% when a group spans 15 octaves); values are finite (inf / nan are not carried).
Wire layout of one row of H values (H % 64 == 0): [H / 64] groups of 24 int32 words, 22 words of codes (value e of
the group in word e % 22 at bits 10 * (e // 22)) and then lmin, step as fp32 bits.

`logfmt_encode` / `logfmt_decode` are the torch reference of the codec; the kernels are the combine's send (encode
into the source's slots) and reduce (decode, weight and sum).
"""
import torch
import triton
import triton.language as tl

GROUP = 64          # values per group
CODE_WORDS = 22     # ceil(64 / 3): three 10-bit codes per int32 word
GROUP_WORDS = 24    # + lmin, step
MAX_Q = 511


def row_bytes(hidden):
    """Bytes one LogFMT row of `hidden` values takes on the wire."""
    return hidden // GROUP * GROUP_WORDS * 4


# ----------------------------------------------------------------------------- torch reference
def logfmt_encode(x):
    """x [rows, H] float (H % 64 == 0) -> int32 words [rows, H / 64, 24] (see the module docstring)."""
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
    step = (lmax - lmin) / (MAX_Q - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(2)
    q = torch.where(step.unsqueeze(2) > 0, torch.floor((lg - lmin.unsqueeze(2)) / safe + 0.5), torch.zeros_like(lg))
    q = (q + 1).clamp(1, MAX_Q).to(torch.int32)
    code = torch.where(nz, q | ((v < 0).to(torch.int32) << 9), torch.zeros_like(q))
    padded = torch.zeros(rows, h // GROUP, CODE_WORDS * 3, dtype=torch.int32, device=x.device)
    padded[:, :, :GROUP] = code
    slots = padded.view(rows, h // GROUP, 3, CODE_WORDS)  # value e = w + 22 * j sits at [j, w]
    words = slots[:, :, 0] | (slots[:, :, 1] << 10) | (slots[:, :, 2] << 20)
    meta = torch.stack([lmin, step], 2).contiguous().view(torch.int32)
    return torch.cat([words, meta], 2).contiguous()


def logfmt_decode(words, hidden):
    """int32 words [rows, H / 64, 24] -> fp32 [rows, H]."""
    rows = words.size(0)
    meta = words[:, :, CODE_WORDS:].contiguous().view(torch.float32)
    lmin, step = meta[:, :, 0:1], meta[:, :, 1:2]
    e = torch.arange(GROUP, device=words.device)
    code = (words[:, :, e % CODE_WORDS] >> (10 * (e // CODE_WORDS))) & 0x3FF
    q = (code & MAX_Q).float()
    mag = torch.where(q > 0, torch.exp2(lmin + (q - 1) * step), torch.zeros_like(q))
    return torch.where((code >> 9) & 1 == 1, -mag, mag).view(rows, hidden)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _encode_group(x_ptr, out_ptr):
    """The 64 values at x_ptr -> 24 int32 words at out_ptr (codes, lmin, step)."""
    w = tl.arange(0, 32)
    j = tl.arange(0, 4)
    e = w[:, None] + 22 * j[None, :]
    valid = (w[:, None] < 22) & (j[None, :] < 3) & (e < 64)
    v = tl.load(x_ptr + e, mask=valid, other=0.0).to(tl.float32)
    a = tl.abs(v)
    nz = valid & (a > 0)
    lg = tl.log2(tl.where(nz, a, 1.0))
    lmin = tl.min(tl.min(tl.where(nz, lg, float("inf")), 1), 0)
    lmax = tl.max(tl.max(tl.where(nz, lg, float("-inf")), 1), 0)
    any_nz = tl.max(tl.max(nz.to(tl.int32), 1), 0) > 0
    lmin = tl.where(any_nz, lmin, 0.0)
    lmax = tl.where(any_nz, lmax, 0.0)
    step = (lmax - lmin) / 510.0
    safe = tl.where(step > 0, step, 1.0)
    q = tl.where(step > 0, tl.floor((lg - lmin) / safe + 0.5), 0.0)
    q = tl.minimum(tl.maximum(q + 1.0, 1.0), 511.0).to(tl.int32)
    code = tl.where(nz, q | ((v < 0).to(tl.int32) << 9), 0)
    word = tl.sum(code << (10 * j)[None, :], 1)
    tl.store(out_ptr + w, word, mask=w < 22)
    meta = tl.where(j == 0, lmin, step)
    tl.store((out_ptr + 22).to(tl.pointer_type(tl.float32)) + j, meta, mask=j < 2)


@triton.jit
def _ll_combine_send_logfmt_kernel(y_ptr, dst_ptr, peer_ptrs, me, num_max, comb_off, cnt_off,
                                   H: tl.constexpr, K: tl.constexpr):
    # kernels/moe_ll.py _ll_combine_send_kernel's program (s * M + t, k), the row LogFMT-encoded into slot [t, k].
    pid = tl.program_id(0)
    k = tl.program_id(1)
    s = pid // num_max
    t = pid % num_max
    base = tl.load(peer_ptrs + s)
    cp = (base + comb_off).to(tl.pointer_type(tl.int32))
    src = tl.load(dst_ptr + pid.to(tl.int64) * K + k)
    if src >= 0:
        slot = (t * K + k).to(tl.int64)
        for g in range(H // 64):
            _encode_group(y_ptr + src * H + g * 64, cp + slot * (H // 64 * 24) + g * 24)
    tl.debug_barrier()
    cnt = (base + cnt_off).to(tl.pointer_type(tl.int64))
    tl.atomic_add(cnt + me, 1, sem="release", scope="sys")


@triton.jit
def _ll_combine_reduce_logfmt_kernel(rows_ptr, idx_ptr, w_ptr, out_ptr, stride_it, stride_ik, stride_wt, stride_wk,
                                     stride_ot, H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # rows: [M, K, H / 64, 24] LogFMT words; out[t] = sum_k w[t, k] * decode(rows[t, k]) (fp32, top-k order).
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
            grp = rows_ptr + (t * K + k) * (H // 64 * 24) + g * 24
            word = tl.load(grp + e % 22, mask=m, other=0)
            lmin = tl.load((grp + 22).to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
            step = tl.load((grp + 23).to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
            code = (word >> (10 * (e // 22))) & 0x3FF
            q = (code & 511).to(tl.float32)
            mag = tl.where(q > 0, tl.exp2(lmin + (q - 1.0) * step), 0.0)
            acc += tl.where(((code >> 9) & 1) == 1, -mag, mag) * wt
    tl.store(out_ptr + t * stride_ot + i, acc.to(out_ptr.dtype.element_ty), mask=m)


def combine_send(y, dst, peer_ptrs, me, num_ranks, num_max, comb_off, cnt_off):
    """kernels/moe_ll.combine_send with each row LogFMT-encoded: y [rows, H] bf16/fp16 contiguous, H % 64 == 0;
    the source's region holds [num_max, K, row_bytes(H)]. Same programs and counts as the bf16 send."""
    h = y.size(1)
    if h % GROUP or not y.is_contiguous():
        raise ValueError(f"LogFMT combine needs a contiguous x with hidden divisible by {GROUP}, got {tuple(y.shape)}")
    k = dst.size(1)
    _ll_combine_send_logfmt_kernel[(num_ranks * num_max, k)](
        y, dst.contiguous(), peer_ptrs, me, num_max, comb_off, cnt_off, H=h, K=k, num_warps=4)


def combine_reduce(rows, topk_idx, topk_weights, out):
    """out [T, H] = sum over k (top-k order, fp32) of topk_weights[t, k] * decode(rows[t, k]) where topk_idx >= 0;
    rows: int32 words [M >= T, K, H / 64, 24], contiguous."""
    t, k = topk_idx.shape
    h = out.size(1)
    if t == 0:
        return out
    if not rows.is_contiguous() or out.stride(1) != 1:
        raise ValueError("LogFMT combine_reduce needs contiguous rows and out rows with unit stride")
    block = min(1024, triton.next_power_of_2(h))
    _ll_combine_reduce_logfmt_kernel[(t, triton.cdiv(h, block))](
        rows, topk_idx, topk_weights, out, *topk_idx.stride(), *topk_weights.stride(), out.stride(0),
        H=h, K=k, BLOCK_H=block, num_warps=4)
    return out
