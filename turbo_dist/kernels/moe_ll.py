"""Triton kernels of the MoE low-latency mode: ranks store tokens straight into peers' symmetric buffers.

Kernels know nothing of process groups: they take every rank's buffer base address (`peer_ptrs`,
int64 [R] device tensor) and byte offsets of the regions inside that buffer (same layout on every
rank). Payloads move as int32 words, so any dtype whose row is a multiple of 4 bytes travels.

Signalling: a program, after all of its stores (CTA barrier), adds 1 to an int64 counter in the
receiver's buffer (release, system scope), one counter per source rank. The receiver waits until
every counter reaches the number of programs a source runs (`expected`) and then subtracts it, so
counters read 0 between calls: no epoch argument, and a captured launch replays in a CUDA graph.
A wait never spins forever: after `timeout_s` (GPU global timer; an iteration budget under the
Triton interpreter) it writes `(code, source rank, counter value, expected)` into `err` (an int32 [4]
buffer the host can read without a sync, see `ErrorWord`) and returns without consuming.
"""

import torch
import triton
import triton.language as tl

from ._device import globaltimer_ns, interpreting

ERR_NUMEL = 4  # err: [code, source rank, counter value seen, expected]
ERR_DISPATCH, ERR_COMBINE = 1, 2


@triton.jit
def _fence_sys():
    # fence.sc.sys: stores before it are visible system-wide (host included) before stores after it.
    tl.inline_asm_elementwise("fence.sc.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ll_dispatch_send_kernel(x_ptr, s_ptr, idx_ptr, num_tokens, peer_ptrs, me, num_ranks, experts_per_rank,
                             num_max, x_off, s_off, idx_off, cnt_off,
                             X_WORDS: tl.constexpr, S_WORDS: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK: tl.constexpr, HAS_S: tl.constexpr):
    # Program t sends token t (t >= num_tokens: an empty slot, its expert ids all -1) to slot
    # [me, t] of every rank; the payload only where the rank owns one of the token's experts.
    t = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    valid = (kk * 0 + t) < num_tokens  # a vector mask: the interpreter rejects scalar-bool masks
    idx = tl.load(idx_ptr + t.to(tl.int64) * K + kk, mask=(kk < K) & valid, other=-1)
    row = (me * num_max + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for d in range(num_ranks):
        base = tl.load(peer_ptrs + d)
        lo = d * experts_per_rank
        hit = tl.sum(((idx >= lo) & (idx < lo + experts_per_rank)).to(tl.int32), axis=0) > 0
        ip = (base + idx_off).to(tl.pointer_type(tl.int32))
        tl.store(ip + row * K + kk, idx.to(tl.int32), mask=kk < K)
        if hit:
            xp = (base + x_off).to(tl.pointer_type(tl.int32))
            for c in range(0, X_WORDS, BLOCK):
                m = (c + offs) < X_WORDS
                v = tl.load(x_ptr + t.to(tl.int64) * X_WORDS + c + offs, mask=m)
                tl.store(xp + row * X_WORDS + c + offs, v, mask=m)
            if HAS_S:
                sp = (base + s_off).to(tl.pointer_type(tl.int32))
                for c in range(0, S_WORDS, BLOCK):
                    m = (c + offs) < S_WORDS
                    v = tl.load(s_ptr + t.to(tl.int64) * S_WORDS + c + offs, mask=m)
                    tl.store(sp + row * S_WORDS + c + offs, v, mask=m)
    tl.debug_barrier()  # every thread's stores happen before the release below
    for d in range(num_ranks):
        base = tl.load(peer_ptrs + d)
        cp = (base + cnt_off).to(tl.pointer_type(tl.int64))
        tl.atomic_add(cp + me, 1, sem="release", scope="sys")


@triton.jit
def _ll_combine_send_kernel(y_ptr, dst_ptr, peer_ptrs, me, num_max, comb_off, cnt_off,
                            Y_WORDS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    # Program (s, t): the rows our experts computed for token t of rank s go to slot [t, k] of rank s.
    pid = tl.program_id(0)
    s = pid // num_max
    t = pid % num_max
    base = tl.load(peer_ptrs + s)
    cp = (base + comb_off).to(tl.pointer_type(tl.int32))
    offs = tl.arange(0, BLOCK)
    for k in range(K):
        src = tl.load(dst_ptr + pid.to(tl.int64) * K + k)
        if src >= 0:
            slot = (t * K + k).to(tl.int64)
            for c in range(0, Y_WORDS, BLOCK):
                m = (c + offs) < Y_WORDS
                v = tl.load(y_ptr + src * Y_WORDS + c + offs, mask=m)
                tl.store(cp + slot * Y_WORDS + c + offs, v, mask=m)
    tl.debug_barrier()
    cnt = (base + cnt_off).to(tl.pointer_type(tl.int64))
    tl.atomic_add(cnt + me, 1, sem="release", scope="sys")


@triton.jit
def _ll_wait_kernel(cnt_ptr, err_addr, num_src, expected, code, timeout_ns, max_iters, BLOCK: tl.constexpr,
                    USE_TIMER: tl.constexpr):
    # One program waits until every source's counter reaches `expected`, then consumes them all.
    # One program, so one writer of the error record: it names the lowest source still missing.
    offs = tl.arange(0, BLOCK)
    m = offs < num_src
    ptrs = cnt_ptr + offs
    err = err_addr.to(tl.pointer_type(tl.int32))
    vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
    lo = tl.min(tl.where(m, vals, expected), 0)
    failed = (tl.load(err, volatile=True) != 0).to(tl.int32)  # an earlier timeout: no wait (host raises)
    waiting = (lo < expected) & (failed == 0)
    it = 0
    if USE_TIMER:
        t0 = globaltimer_ns()
    while waiting:
        vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
        lo = tl.min(tl.where(m, vals, expected), 0)
        it += 1
        if USE_TIMER:
            expired = (globaltimer_ns() - t0) > timeout_ns
        else:
            expired = it > max_iters
        timed_out = expired & (lo < expected)
        if timed_out:
            late = tl.min(tl.where(m & (vals < expected), offs, BLOCK), 0)
            seen = tl.sum(tl.where(offs == late, vals, 0), 0)
            # `err` is host memory mapped into the device (ErrorWord): plain stores, which every platform
            # carries to host memory (device atomics there need PCIe AtomicOps or NVLink-C2C). Fields
            # first, then a system-scope fence, then the code: a host that sees the code sees the fields.
            tl.store(err + 1, late)
            tl.store(err + 2, seen.to(tl.int32))
            tl.store(err + 3, expected)
            if USE_TIMER:
                _fence_sys()
            tl.store(err, code)
        failed = failed | timed_out.to(tl.int32)
        waiting = (lo < expected) & (failed == 0)
    if lo >= expected:  # after a timeout nothing is consumed (Buffer.clean_low_latency_buffer resets)
        tl.atomic_add(ptrs, -expected, mask=m, sem="relaxed", scope="sys")


def _words(t, name):
    """`t` ([rows, n] contiguous) as int32 words [rows, n * itemsize / 4]."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    row_bytes = t.size(-1) * t.element_size() if t.dim() else t.element_size()
    if row_bytes % 4:
        raise ValueError(f"{name}: a row of {row_bytes} bytes is not a whole number of 4-byte words")
    return t.reshape(t.size(0), -1).view(torch.uint8).view(torch.int32) if t.numel() else \
        torch.zeros(1, max(row_bytes // 4, 1), dtype=torch.int32, device=t.device)


def dispatch_send(x, x_scales, topk_idx, num_max, peer_ptrs, me, num_ranks, experts_per_rank,
                  x_off, s_off, idx_off, cnt_off):
    """Store this rank's tokens into every rank's dispatch region and bump its counter there.

    x: [T, H] payload (any dtype, rows of whole 4-byte words), x_scales: [T, G] fp32 or None,
    topk_idx: [T, K] int64. Region layout on each receiver (byte offsets into its buffer):
    x_off: [num_ranks * num_max, row words], s_off: the same for scales, idx_off: [num_ranks * num_max, K]
    int32, cnt_off: int64 [num_ranks] counters. Runs `num_max` programs (the count a receiver expects).
    """
    num_tokens, k = topk_idx.shape
    xw = _words(x, "x")
    sw = _words(x_scales, "x_scales") if x_scales is not None else xw
    idx = topk_idx.contiguous() if num_tokens else torch.full((1, k), -1, dtype=torch.int64, device=x.device)
    _ll_dispatch_send_kernel[(num_max,)](
        xw, sw, idx, num_tokens, peer_ptrs, me, num_ranks, experts_per_rank, num_max,
        x_off, s_off, idx_off, cnt_off,
        X_WORDS=xw.size(1), S_WORDS=sw.size(1), K=k, BLOCK_K=triton.next_power_of_2(k),
        BLOCK=1024, HAS_S=x_scales is not None, num_warps=4)


def combine_send(y, dst, peer_ptrs, me, num_ranks, num_max, comb_off, cnt_off):
    """Store every row our experts computed into its source rank's combine region, then bump its counter.

    y: [rows, H] (the experts' outputs, flattened), dst: int64 [num_ranks * num_max, K], the row of y
    holding (source rank, token, k) or -1. Region on each source: [num_max, K, row words] at comb_off.
    Runs num_ranks * num_max programs, num_max per destination (the count a receiver expects).
    """
    yw = _words(y, "combine x")
    k = dst.size(1)
    _ll_combine_send_kernel[(num_ranks * num_max,)](
        yw, dst.contiguous(), peer_ptrs, me, num_max, comb_off, cnt_off,
        Y_WORDS=yw.size(1), K=k, BLOCK=1024, num_warps=4)


def wait_counters(counters, err_addr, expected, code, timeout_s):
    """Wait on the current stream until each of `counters` (int64 [R], local) reaches `expected`; consume.

    err_addr: address of an int32 [4] word block the device can write (pinned host memory on CUDA).
    One program polls every counter; after `timeout_s` it records (code, lowest source still short, its
    counter, expected) and consumes nothing. A nonzero record already there: returns at once.
    """
    if counters.dtype != torch.int64 or counters.dim() != 1 or not counters.is_contiguous():
        raise ValueError(f"counters must be a contiguous int64 [R] tensor, got {counters.dtype} "
                         f"{tuple(counters.shape)} strides {counters.stride()}")
    use_timer = counters.is_cuda and not interpreting()
    timeout_ns = int(max(timeout_s, 0.0) * 1e9)
    # No clock under the interpreter: bound by iterations, each a slow Python round trip (as moe_nvlink).
    max_iters = max(int(max(timeout_s, 0.0) * 1000), 1) if not use_timer else 1
    _ll_wait_kernel[(1,)](counters, int(err_addr), counters.numel(), int(expected), int(code), timeout_ns,
                          max_iters, BLOCK=triton.next_power_of_2(max(counters.numel(), 1)), USE_TIMER=use_timer,
                          num_warps=1)


class ErrorWord:
    """An int32 [4] error record the kernels write and the host reads without a device sync.

    On CUDA it lives in pinned host memory (mapped into the device's address space by UVA), so a
    timed-out wait becomes visible to the host at its next check without stalling the stream.
    A plain read shows what kernels that already ran wrote: a wait still queued or spinning (launches
    are asynchronous) has written nothing yet. `read(sync=True)` waits for the device first.
    """

    def __init__(self, device):
        self.device = device
        pin = device.type == "cuda"
        self.tensor = torch.zeros(ERR_NUMEL, dtype=torch.int32, pin_memory=pin)
        self.addr = self.tensor.data_ptr()

    def read(self, sync=False):
        """[code, source rank, counter value seen, expected]; sync=True: after every queued kernel ran."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [int(v) for v in self.tensor.tolist()]

    def clear(self):
        self.tensor.zero_()


@triton.jit
def _ll_place_rows_kernel(src_ptr, target_ptr, out_ptr, K: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    # Entry i = (row, k): copy source row i // K to output row target[i] (skipped where target < 0).
    i = tl.program_id(0)
    tgt = tl.load(target_ptr + i)
    if tgt >= 0:
        src = (i // K).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        for c in range(0, WORDS, BLOCK):
            m = (c + offs) < WORDS
            v = tl.load(src_ptr + src * WORDS + c + offs, mask=m)
            tl.store(out_ptr + tgt * WORDS + c + offs, v, mask=m)


def place_rows(rows, target, out, k):
    """out[target[i]] = rows[i // k] for every i with target[i] >= 0 (rows/out: int32 words [n, w])."""
    if target.numel() == 0:
        return out
    _ll_place_rows_kernel[(target.numel(),)](rows, target, out, K=k, WORDS=rows.size(1), BLOCK=1024, num_warps=4)
    return out
