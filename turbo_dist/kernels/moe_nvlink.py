"""Triton kernels of the MoE `nvlink` transport: tokens written straight into peers' symmetric buffers.

Kernels know nothing of process groups. They take local tensors, the int64 base addresses of every
rank's symmetric buffers (`data_ptrs`, `sig_ptrs`, one entry per rank, entry `rank` being our own)
and byte offsets of the regions inside them. The caller (turbo_dist/moe/nvlink.py) owns the layout.

Signal buffer (int32, same layout on every rank):
    [barrier_off + s]                 epoch of the last op source s entered (barrier flag)
    [flag_off + s * max_channels + c] epoch of the last op whose data channel c of source s finished
    [counts_off + ((e % 2) * R + s) * W + i]   notify counts of source s for op epoch e (double buffered)
Flags only grow (epochs), so nothing is ever reset and a rank running one op ahead is harmless.

Every wait on a peer is bounded: after `timeout_ns` (GPU global timer; an iteration budget under the
Triton interpreter) it records `[ERR_TIMEOUT, peer, slot, epoch]` in `err` (int32 [4]) and returns. Once
`err[0]` is set, later kernels skip their waits and data movement; the host raises on it. Capacity
guards computed from the (global) token matrix record `[ERR_CAPACITY, rows, cap_rows, row_bytes]` or
`[ERR_WORST, rows, num_worst_tokens, 0]` on every rank alike, so no rank waits for a peer that skipped.

Memory order: data stores, then a CTA barrier, then a release store of the flag at system scope; the
reader polls with acquire atomics at system scope, then a CTA barrier, then plain loads.
"""

import torch
import triton
import triton.language as tl

from ._device import globaltimer_ns, interpreting

ERR_NUMEL = 4
ERR_TIMEOUT, ERR_CAPACITY, ERR_WORST = 1, 2, 3


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _record_error(err_ptr, code, a, b, c):
    # First writer wins; the fields follow the claim (the host reads them after the kernel ends).
    old = tl.atomic_cas(err_ptr, 0, code, sem="acq_rel", scope="gpu")
    if old == 0:
        tl.store(err_ptr + 1, a)
        tl.store(err_ptr + 2, b)
        tl.store(err_ptr + 3, c)


@triton.jit
def _wait_flags(sig_ptr, first, num_src, stride, per_src, epoch, err_ptr, timeout_ns, max_iters,
                BLOCK: tl.constexpr, USE_TIMER: tl.constexpr):
    """Spin until sig[first + s * stride + c] >= epoch for s < num_src, c < per_src (bounded)."""
    offs = tl.arange(0, BLOCK)
    n = num_src * per_src
    m = offs < n
    ptrs = sig_ptr + first + (offs // per_src) * stride + offs % per_src
    err = tl.load(err_ptr, volatile=True)
    vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
    lo = tl.min(tl.where(m, vals, epoch), 0)
    pending = (lo < epoch) & (err == 0)
    it = 0
    if USE_TIMER:
        t0 = globaltimer_ns()
    while pending:
        vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
        lo = tl.min(tl.where(m, vals, epoch), 0)
        err = tl.load(err_ptr, volatile=True)
        it += 1
        if USE_TIMER:
            expired = (globaltimer_ns() - t0) > timeout_ns
        else:
            expired = it > max_iters
        if expired & (lo < epoch) & (err == 0):
            first_late = tl.min(tl.where(m & (vals < epoch), offs, BLOCK), 0)
            _record_error(err_ptr, 1, first_late // per_src, first + (first_late // per_src) * stride
                          + first_late % per_src, epoch)
            err = err * 0 + 1  # keeps err an int32 tensor (one type through the loop)
        pending = (lo < epoch) & (err == 0)
    tl.debug_barrier()
    return err


@triton.jit
def _barrier(sig_ptrs, sig_local, barrier_off, rank, R, epoch, err_ptr, timeout_ns, max_iters,
             BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr):
    """Tell every rank we entered op `epoch`, wait until every rank did (all earlier ops are done there)."""
    for d in range(R):
        base = tl.load(sig_ptrs + d).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(base + barrier_off + rank, epoch, sem="release", scope="sys")
    return _wait_flags(sig_local, barrier_off, R, 1, 1, epoch, err_ptr, timeout_ns, max_iters, BLOCK_R, USE_TIMER)


@triton.jit
def _signal_done(sig_ptrs, flag_off, max_channels, rank, channel, R, epoch):
    tl.debug_barrier()
    for d in range(R):
        base = tl.load(sig_ptrs + d).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(base + flag_off + rank * max_channels + channel, epoch, sem="release", scope="sys")


@triton.jit
def _row_ptrs(base_addr, byte_off, rows, row_elems, cols, ty: tl.constexpr):
    """Pointers [BLOCK_T, BLOCK_C] to element (rows, cols) of a [*, row_elems] array at base_addr + byte_off."""
    p = (base_addr + byte_off + tl.zeros_like(rows).to(tl.int64)).to(tl.pointer_type(ty))
    return p[:, None] + rows[:, None].to(tl.int64) * row_elems + cols[None, :]


# ----------------------------------------------------------------------------- notify
@triton.jit
def _notify_kernel(sig_ptrs, sig_local, row_ptr, expert_ptr, out_ptr, err_ptr, epoch, rank, R, L, W,
                   barrier_off, counts_off, timeout_ns, max_iters,
                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, USE_TIMER: tl.constexpr):
    parity = epoch % 2
    rr = tl.arange(0, BLOCK_R)
    ll = tl.arange(0, BLOCK_L)
    row = tl.load(row_ptr + rr, mask=rr < R, other=0)
    for d in range(R):
        base = tl.load(sig_ptrs + d).to(tl.pointer_type(tl.int32))
        slot = base + counts_off + (parity * R + rank) * W
        tl.store(slot + rr, row, mask=rr < R)
        for l0 in range(0, L, BLOCK_L):
            lm = (l0 + ll) < L
            tl.store(slot + R + l0 + ll, tl.load(expert_ptr + d * L + l0 + ll, mask=lm, other=0), mask=lm)
    tl.debug_barrier()
    _barrier(sig_ptrs, sig_local, barrier_off, rank, R, epoch, err_ptr, timeout_ns, max_iters, BLOCK_R, USE_TIMER)
    # Copy what every source wrote to us (the whole matrix row by row, and the counts of our experts).
    for s in range(R):
        slot = sig_local + counts_off + (parity * R + s) * W
        tl.store(out_ptr + s * (R + L) + rr, tl.load(slot + rr, mask=rr < R, other=0), mask=rr < R)
        for l0 in range(0, L, BLOCK_L):
            lm = (l0 + ll) < L
            tl.store(out_ptr + s * (R + L) + R + l0 + ll, tl.load(slot + R + l0 + ll, mask=lm, other=0), mask=lm)


# ----------------------------------------------------------------------------- dispatch
@triton.jit
def _dispatch_send_kernel(x_ptr, scales_ptr, idx_ptr, w_ptr, in_rank_ptr, send_head_ptr, recv_off_ptr,
                          recv_total_ptr, data_ptrs, sig_ptrs, sig_local, err_ptr, epoch, rank, T, R, C,
                          max_channels, XW, S, K, L, off_x, off_s, off_i, off_w, off_src, cap, worst, row_bytes,
                          flag_off, barrier_off, timeout_ns, max_iters,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, HAS_SCALES: tl.constexpr,
                          HAS_TOPK: tl.constexpr, HAS_W: tl.constexpr, BARRIER: tl.constexpr,
                          USE_TIMER: tl.constexpr):
    pid = tl.program_id(0)
    err0 = tl.load(err_ptr, volatile=True)  # a timeout before this op leaves us silent
    if BARRIER:
        _barrier(sig_ptrs, sig_local, barrier_off, rank, R, epoch, err_ptr, timeout_ns, max_iters, BLOCK_R,
                 USE_TIMER)
    rr = tl.arange(0, BLOCK_R)
    need = tl.max(tl.load(recv_total_ptr + rr, mask=rr < R, other=0), 0)
    err = tl.load(err_ptr, volatile=True)
    if (need > cap) & (err == 0):
        _record_error(err_ptr, 2, need, cap, row_bytes)
    if (worst > 0) & (need > worst) & (err == 0):
        _record_error(err_ptr, 3, need, worst, 0)
    ok = (err == 0) & (need <= cap) & ((worst == 0) | (need <= worst))
    if ok:
        xty = x_ptr.dtype.element_ty
        tt = tl.arange(0, BLOCK_T)
        hh = tl.arange(0, BLOCK_H)
        for blk in range(pid, tl.cdiv(T, BLOCK_T), C):
            t = blk * BLOCK_T + tt
            tm = t < T
            for h0 in range(0, XW, BLOCK_H):
                h = h0 + hh
                hm = h < XW
                tile = tl.load(x_ptr + t[:, None].to(tl.int64) * XW + h[None, :], mask=tm[:, None] & hm[None, :])
                for d in range(R):
                    go = tm & (tl.load(in_rank_ptr + t * R + d, mask=tm, other=0) != 0)
                    pos = tl.load(recv_off_ptr + d) + tl.load(send_head_ptr + t * R + d, mask=go, other=0)
                    base = tl.load(data_ptrs + d)
                    dst = (base + off_x).to(tl.pointer_type(xty)) + pos[:, None].to(tl.int64) * XW + h[None, :]
                    tl.store(dst, tile, mask=go[:, None] & hm[None, :])
            for d in range(R):
                go = tm & (tl.load(in_rank_ptr + t * R + d, mask=tm, other=0) != 0)
                pos = tl.load(recv_off_ptr + d) + tl.load(send_head_ptr + t * R + d, mask=go, other=0)
                base = tl.load(data_ptrs + d)
                tl.store((base + off_src).to(tl.pointer_type(tl.int32)) + pos, t, mask=go)
                if HAS_SCALES:
                    ss = tl.arange(0, BLOCK_S)
                    sm = go[:, None] & (ss[None, :] < S)
                    v = tl.load(scales_ptr + t[:, None] * S + ss[None, :], mask=sm)
                    tl.store(_row_ptrs(base, off_s, pos, S, ss, tl.float32), v, mask=sm)
                if HAS_TOPK:
                    kk = tl.arange(0, BLOCK_K)
                    km = go[:, None] & (kk[None, :] < K)
                    e = tl.load(idx_ptr + t[:, None] * K + kk[None, :], mask=km, other=-1)
                    lo = d * L
                    mine = (e >= lo) & (e < lo + L)
                    tl.store(_row_ptrs(base, off_i, pos, K, kk, tl.int64), tl.where(mine, e - lo, -1), mask=km)
                    if HAS_W:
                        wv = tl.load(w_ptr + t[:, None] * K + kk[None, :], mask=km, other=0.0)
                        tl.store(_row_ptrs(base, off_w, pos, K, kk, tl.float32), tl.where(mine, wv, 0.0), mask=km)
    # A rank that timed out before stays silent, so its peers time out naming it; a capacity guard
    # trips on every rank alike, and every rank then signals so nobody waits.
    if err0 != 1:
        _signal_done(sig_ptrs, flag_off, max_channels, rank, pid, R, epoch)


@triton.jit
def _dispatch_recv_kernel(buf_x, buf_s, buf_i, buf_w, buf_src, out_x, out_s, out_i, out_w, out_src, num_recv_ptr,
                          rows_out, sig_local, err_ptr, epoch, R, C, max_channels, XW, S, K, flag_off,
                          timeout_ns, max_iters,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_RC: tl.constexpr, HAS_SCALES: tl.constexpr,
                          HAS_TOPK: tl.constexpr, HAS_W: tl.constexpr, USE_TIMER: tl.constexpr):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    err = _wait_flags(sig_local, flag_off, R, max_channels, C, epoch, err_ptr, timeout_ns, max_iters, BLOCK_RC,
                      USE_TIMER)
    # On an error the rows are not trusted: everything is written as padding (the host raises).
    n = tl.where(err == 0, tl.minimum(tl.load(num_recv_ptr), rows_out), 0)
    tt = tl.arange(0, BLOCK_T)
    hh = tl.arange(0, BLOCK_H)
    for blk in range(pid, tl.cdiv(rows_out, BLOCK_T), grid):
        j = blk * BLOCK_T + tt
        jm = j < rows_out
        valid = j < n
        jl = j.to(tl.int64)
        for h0 in range(0, XW, BLOCK_H):
            h = h0 + hh
            m = jm[:, None] & (h[None, :] < XW)
            v = tl.load(buf_x + jl[:, None] * XW + h[None, :], mask=m & valid[:, None], other=0)
            tl.store(out_x + jl[:, None] * XW + h[None, :], v, mask=m)
        tl.store(out_src + j, tl.load(buf_src + j, mask=valid, other=-1), mask=jm)
        if HAS_SCALES:
            ss = tl.arange(0, BLOCK_S)
            m = jm[:, None] & (ss[None, :] < S)
            v = tl.load(buf_s + jl[:, None] * S + ss[None, :], mask=m & valid[:, None], other=0.0)
            tl.store(out_s + jl[:, None] * S + ss[None, :], v, mask=m)
        if HAS_TOPK:
            kk = tl.arange(0, BLOCK_K)
            m = jm[:, None] & (kk[None, :] < K)
            v = tl.load(buf_i + jl[:, None] * K + kk[None, :], mask=m & valid[:, None], other=-1)
            tl.store(out_i + jl[:, None] * K + kk[None, :], v, mask=m)
            if HAS_W:
                v = tl.load(buf_w + jl[:, None] * K + kk[None, :], mask=m & valid[:, None], other=0.0)
                tl.store(out_w + jl[:, None] * K + kk[None, :], v, mask=m)


# ----------------------------------------------------------------------------- combine
@triton.jit
def _combine_send_kernel(x_ptr, w_ptr, seg_end_ptr, seg_cnt_ptr, dst_off_ptr, send_total_ptr, data_ptrs, sig_ptrs,
                         sig_local, err_ptr, epoch, rank, rows_in, R, C, max_channels, XW, K, off_x, off_w, cap,
                         row_bytes, flag_off, barrier_off, timeout_ns, max_iters,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, HAS_W: tl.constexpr, USE_TIMER: tl.constexpr):
    pid = tl.program_id(0)
    err0 = tl.load(err_ptr, volatile=True)  # a timeout before this op leaves us silent
    _barrier(sig_ptrs, sig_local, barrier_off, rank, R, epoch, err_ptr, timeout_ns, max_iters, BLOCK_R, USE_TIMER)
    rr = tl.arange(0, BLOCK_R)
    need = tl.max(tl.load(send_total_ptr + rr, mask=rr < R, other=0), 0)
    err = tl.load(err_ptr, volatile=True)
    if (need > cap) & (err == 0):
        _record_error(err_ptr, 2, need, cap, row_bytes)
    if (err == 0) & (need <= cap):
        xty = x_ptr.dtype.element_ty
        n = tl.minimum(tl.load(seg_end_ptr + R - 1), rows_in)
        tt = tl.arange(0, BLOCK_T)
        hh = tl.arange(0, BLOCK_H)
        for blk in range(pid, tl.cdiv(n, BLOCK_T), C):
            j = blk * BLOCK_T + tt
            jm = j < n
            src = tl.zeros([BLOCK_T], dtype=tl.int32)
            for r in range(R):
                src += (j >= tl.load(seg_end_ptr + r)).to(tl.int32)
            src = tl.minimum(src, R - 1)
            start = tl.load(seg_end_ptr + src) - tl.load(seg_cnt_ptr + src)
            pos = (tl.load(dst_off_ptr + src) + j - start).to(tl.int64)
            base = tl.load(data_ptrs + src)
            for h0 in range(0, XW, BLOCK_H):
                h = h0 + hh
                m = jm[:, None] & (h[None, :] < XW)
                v = tl.load(x_ptr + j[:, None].to(tl.int64) * XW + h[None, :], mask=m)
                tl.store(_row_ptrs(base, off_x, pos, XW, h, xty), v, mask=m)
            if HAS_W:
                kk = tl.arange(0, BLOCK_K)
                m = jm[:, None] & (kk[None, :] < K)
                v = tl.load(w_ptr + j[:, None].to(tl.int64) * K + kk[None, :], mask=m)
                tl.store(_row_ptrs(base, off_w, pos, K, kk, tl.float32), v, mask=m)
    if err0 != 1:
        _signal_done(sig_ptrs, flag_off, max_channels, rank, pid, R, epoch)


@triton.jit
def _combine_recv_kernel(buf_x, buf_w, in_rank_ptr, send_head_ptr, send_off_ptr, out_ptr, out_w, bias0, bias1,
                         sig_local, err_ptr, epoch, T, R, C, max_channels, H, K, flag_off, timeout_ns, max_iters,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_RC: tl.constexpr, HAS_W: tl.constexpr, NUM_BIAS: tl.constexpr,
                         USE_TIMER: tl.constexpr):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    err = _wait_flags(sig_local, flag_off, R, max_channels, C, epoch, err_ptr, timeout_ns, max_iters, BLOCK_RC,
                      USE_TIMER)
    t_ok = tl.where(err == 0, T, 0)  # after an error nothing is read (outputs are then bias only)
    tt = tl.arange(0, BLOCK_T)
    hh = tl.arange(0, BLOCK_H)
    out_ty = out_ptr.dtype.element_ty
    for blk in range(pid, tl.cdiv(T, BLOCK_T), grid):
        t = blk * BLOCK_T + tt
        tm = t < T
        tl64 = t.to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + hh
            hm = h < H
            acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            # Rank order, fp32, one add per contributing rank: the collective path's exact sum.
            for d in range(R):
                go = (t < t_ok) & (tl.load(in_rank_ptr + t * R + d, mask=tm, other=0) != 0)
                row = (tl.load(send_off_ptr + d) + tl.load(send_head_ptr + t * R + d, mask=go, other=0)).to(tl.int64)
                m = go[:, None] & hm[None, :]
                v = tl.load(buf_x + row[:, None] * H + h[None, :], mask=m, other=0.0)
                acc = tl.where(m, acc + v.to(tl.float32), acc)
            m = tm[:, None] & hm[None, :]
            if NUM_BIAS >= 1:
                acc += tl.load(bias0 + tl64[:, None] * H + h[None, :], mask=m, other=0.0).to(tl.float32)
            if NUM_BIAS >= 2:
                acc += tl.load(bias1 + tl64[:, None] * H + h[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + tl64[:, None] * H + h[None, :], acc.to(out_ty), mask=m)
        if HAS_W:
            kk = tl.arange(0, BLOCK_K)
            km = kk < K
            accw = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            for d in range(R):
                go = (t < t_ok) & (tl.load(in_rank_ptr + t * R + d, mask=tm, other=0) != 0)
                row = (tl.load(send_off_ptr + d) + tl.load(send_head_ptr + t * R + d, mask=go, other=0)).to(tl.int64)
                m = go[:, None] & km[None, :]
                v = tl.load(buf_w + row[:, None] * K + kk[None, :], mask=m, other=0.0)
                accw = tl.where(m, accw + v, accw)
            tl.store(out_w + tl64[:, None] * K + kk[None, :], accw, mask=tm[:, None] & km[None, :])


# ----------------------------------------------------------------------------- launchers
def _timing(device, timeout_s):
    use_timer = device.type == "cuda" and not interpreting()
    timeout_ns = int(max(timeout_s, 0.0) * 1e9)
    # The interpreter has no clock: bound by iterations (each one is a slow Python round trip).
    max_iters = max(1, int(max(timeout_s, 0.0) * 1000)) if not use_timer else 1
    return use_timer, timeout_ns, max_iters


def _pow2(n, lo=1):
    return max(triton.next_power_of_2(max(int(n), 1)), lo)


_DUMMIES = {}


def _run(kernel, grid, *args, **meta):
    """Launch with every empty tensor replaced by a 1-element one of its dtype: an empty CUDA tensor has
    a null data pointer, which the Triton launcher refuses (masks keep the kernels off those tensors)."""
    fixed = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.numel() == 0:
            key = (a.dtype, a.device)
            if key not in _DUMMIES:
                _DUMMIES[key] = torch.zeros(1, dtype=a.dtype, device=a.device)
            a = _DUMMIES[key]
        fixed.append(a)
    kernel[grid](*fixed, **meta)


def notify(sig_ptrs, sig_local, num_tokens_per_rank, num_tokens_per_expert, err, epoch, rank, world_size,
           barrier_off, counts_off, slot_width, timeout_s):
    """Exchange counts and enter op `epoch` on every rank (a device-side barrier).

    num_tokens_per_rank: int32 [R]; num_tokens_per_expert: int32 [R * L]; sig_local: int32 view of our
    signal buffer. Returns int32 [R, R + L]: row s = source s's num_tokens_per_rank, then its token
    counts for our L experts.
    """
    R = world_size
    L = num_tokens_per_expert.numel() // R
    if R + L > slot_width:
        raise ValueError(f"notify: {L} experts per rank do not fit the count slot ({slot_width - R})")
    out = torch.empty(R, R + L, dtype=torch.int32, device=sig_local.device)
    use_timer, timeout_ns, max_iters = _timing(sig_local.device, timeout_s)
    _run(_notify_kernel, (1,), sig_ptrs, sig_local, num_tokens_per_rank, num_tokens_per_expert, out, err, epoch, rank, R,
                         L, slot_width, barrier_off, counts_off, timeout_ns, max_iters, BLOCK_R=_pow2(R),
                         BLOCK_L=min(_pow2(L), 256), USE_TIMER=use_timer, num_warps=1)
    return out


def dispatch_send(x, scales, topk_idx, topk_weights, in_rank, send_head, recv_off, recv_total, data_ptrs, sig_ptrs,
                  sig_local, err, epoch, rank, world_size, num_channels, max_channels, experts_per_rank, layout,
                  cap_rows, num_worst_tokens, row_bytes, flag_off, barrier_off, timeout_s, barrier):
    """Write this rank's tokens into the receivers' data regions, then raise this channel's flags there.

    x: [T, XW] any 1/2/4-byte dtype (payload bits); scales [T, S] fp32 or None; topk_idx [T, K] int64 or None
    (global expert ids, localized per receiver, -1 elsewhere); topk_weights [T, K] fp32 or None;
    in_rank [T, R] bool; send_head [T, R] int32 (row inside our block at each receiver); recv_off [R] int32
    (where our block starts at each receiver); recv_total [R] int32 (rows each receiver gets, for the
    capacity guard); layout: dict of byte offsets off_x, off_s, off_i, off_w, off_src.
    """
    T, XW = x.shape
    S = scales.size(1) if scales is not None else 0
    K = topk_idx.size(1) if topk_idx is not None else 0
    use_timer, timeout_ns, max_iters = _timing(x.device, timeout_s)
    block_h = min(_pow2(XW), 1024)
    block_t = max(1, min(8, 4096 // block_h))
    dummy = err
    _run(_dispatch_send_kernel, (num_channels,), 
        x, scales if scales is not None else dummy, topk_idx if topk_idx is not None else dummy,
        topk_weights if topk_weights is not None else dummy, in_rank.view(torch.int8), send_head, recv_off, recv_total,
        data_ptrs, sig_ptrs, sig_local, err, epoch, rank, T, world_size, num_channels, max_channels, XW, S, K,
        experts_per_rank, layout["off_x"], layout["off_s"], layout["off_i"], layout["off_w"], layout["off_src"],
        cap_rows, num_worst_tokens, row_bytes, flag_off, barrier_off, timeout_ns, max_iters,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=_pow2(S), BLOCK_K=_pow2(K), BLOCK_R=_pow2(world_size),
        HAS_SCALES=scales is not None, HAS_TOPK=topk_idx is not None, HAS_W=topk_weights is not None,
        BARRIER=barrier, USE_TIMER=use_timer, num_warps=8 if block_t * block_h >= 4096 else 4)


def dispatch_recv(bufs, outs, num_recv, rows_out, sig_local, err, epoch, world_size, num_channels, max_channels,
                  flag_off, timeout_s, num_programs):
    """Wait for every source's channels, copy the received rows out of our data region (pad the rest).

    bufs / outs: dicts x [*, XW], s [*, S] fp32, i [*, K] int64, w [*, K] fp32, src [*] int32 (s/i/w may be None);
    bufs are views of our data region, outs are [rows_out, ...]. num_recv: int32 device scalar tensor.
    """
    out_x = outs["x"]
    XW = out_x.size(1)
    S = outs["s"].size(1) if outs.get("s") is not None else 0
    K = outs["i"].size(1) if outs.get("i") is not None else 0
    use_timer, timeout_ns, max_iters = _timing(out_x.device, timeout_s)
    block_h = min(_pow2(XW), 1024)
    block_t = max(1, min(16, 4096 // block_h))
    grid = max(1, min(num_programs, triton.cdiv(rows_out, block_t)))
    d = err
    _run(_dispatch_recv_kernel, (grid,), 
        bufs["x"], bufs.get("s") if S else d, bufs.get("i") if K else d, bufs.get("w") if outs.get("w") is not None
        else d, bufs["src"], out_x, outs["s"] if S else d, outs["i"] if K else d,
        outs["w"] if outs.get("w") is not None else d, outs["src"], num_recv, rows_out, sig_local, err, epoch,
        world_size, num_channels, max_channels, XW, S, K, flag_off, timeout_ns, max_iters,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=_pow2(S), BLOCK_K=_pow2(K),
        BLOCK_RC=_pow2(world_size * num_channels), HAS_SCALES=S > 0, HAS_TOPK=K > 0,
        HAS_W=outs.get("w") is not None, USE_TIMER=use_timer, num_warps=4)


def combine_send(x, topk_weights, seg_end, seg_cnt, dst_off, send_total, data_ptrs, sig_ptrs, sig_local, err, epoch,
                 rank, world_size, num_channels, max_channels, off_x, off_w, cap_rows, row_bytes, flag_off,
                 barrier_off, timeout_s):
    """Enter op `epoch` (barrier), write each received row back into its source's data region, flag it.

    x: [rows, XW] payload bits in dispatch order; topk_weights [rows, K] fp32 or None. seg_end [R] int32
    (rank_prefix_matrix[:, me]), seg_cnt [R] (rows we got from each source), dst_off [R] (where our block
    starts in each source's send order), send_total [R] (rows each source gets back: capacity guard).
    """
    rows, XW = x.shape
    K = topk_weights.size(1) if topk_weights is not None else 0
    use_timer, timeout_ns, max_iters = _timing(x.device, timeout_s)
    block_h = min(_pow2(XW), 1024)
    block_t = max(1, min(8, 4096 // block_h))
    _run(_combine_send_kernel, (num_channels,), 
        x, topk_weights if topk_weights is not None else err, seg_end, seg_cnt, dst_off, send_total, data_ptrs,
        sig_ptrs, sig_local, err, epoch, rank, rows, world_size, num_channels, max_channels, XW, K, off_x, off_w,
        cap_rows, row_bytes, flag_off, barrier_off, timeout_ns, max_iters,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_K=_pow2(K), BLOCK_R=_pow2(world_size), HAS_W=topk_weights is not None,
        USE_TIMER=use_timer, num_warps=8 if block_t * block_h >= 4096 else 4)


def combine_recv(buf_x, buf_w, in_rank, send_head, send_off, out, out_w, biases, sig_local, err, epoch, world_size,
                 num_channels, max_channels, flag_off, timeout_s, num_programs):
    """Wait for every rank's channels, then out[t] = sum over ranks d in order of the row t got back from d
    (fp32) + biases, cast to out.dtype; out_w likewise for the weights. buf_x: [cap, H] out.dtype view of our
    data region; send_off [R] int32: where our block for rank d starts in our send order."""
    T, H = out.shape
    K = out_w.size(1) if out_w is not None else 0
    use_timer, timeout_ns, max_iters = _timing(out.device, timeout_s)
    block_h = min(_pow2(H), 512)
    block_t = max(1, min(16, 2048 // block_h))
    grid = max(1, min(num_programs, triton.cdiv(T, block_t)))
    b = list(biases) + [out] * (2 - len(biases))
    _run(_combine_recv_kernel, (grid,), 
        buf_x, buf_w if buf_w is not None else err, in_rank.view(torch.int8), send_head, send_off, out,
        out_w if out_w is not None else err, b[0], b[1], sig_local, err, epoch, T, world_size, num_channels,
        max_channels, H, K, flag_off, timeout_ns, max_iters,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_K=_pow2(K), BLOCK_RC=_pow2(world_size * num_channels),
        HAS_W=out_w is not None, NUM_BIAS=len(biases), USE_TIMER=use_timer, num_warps=4)
