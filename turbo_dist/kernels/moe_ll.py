"""Triton kernels of the MoE low-latency mode: ranks store tokens straight into peers' symmetric buffers.

Kernels know nothing of process groups: they take every rank's buffer base address (`peer_ptrs`,
int64 [R] device tensor) and byte offsets of the regions inside that buffer (same layout on every
rank). Payloads move as int32 words, so any dtype whose row is a multiple of 4 bytes travels.

Signalling: a program, after all of its stores (CTA barrier), adds 1 to an int64 counter in the
receiver's buffer (release, system scope), one counter per source rank. The receiver waits until
every counter reaches the number of programs a source runs (`expected`) and then subtracts it, so
counters read 0 between calls: no epoch argument, and a captured launch replays in a CUDA graph.
The wait is a one-program kernel of its own (`wait_counters`): with every program of a receive kernel polling
the counters (system-scope atomics and a host-memory read per program) a dispatch took 1.1 ms, not 16 us (H200).
A wait never spins forever: after `timeout_s` (GPU global timer; an iteration budget under the
Triton interpreter) it writes `(code, source rank, counter value, expected)` into `err` (an int32 [4]
buffer the host can read without a sync, see `ErrorWord`) and returns without consuming. A wait captured in a
CUDA graph (no host code runs at a replay to raise) traps after writing the record, as DeepEP's kernels do: the
CUDA context fails, so the process stops at its next CUDA call instead of training on what arrived; the record
is printed at exit (`ErrorWord`).
"""
import atexit
import sys
import weakref

import torch
import triton
import triton.language as tl

from ._device import globaltimer_ns, interpreting

ERR_NUMEL = 4  # err: [code, source rank, counter value seen, expected]
ERR_DISPATCH, ERR_COMBINE = 1, 2
TRAPPED = 0x100  # or-ed into the code by a wait that trapped (captured in a CUDA graph)
_TRAPPED = tl.constexpr(TRAPPED)


@triton.jit
def _fence_sys():
    # fence.sc.sys: stores before it are visible system-wide (host included) before stores after it.
    tl.inline_asm_elementwise("fence.sc.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _trap():
    # Abort this kernel; CUDA reports a launch failure at the next synchronization and the context is unusable.
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fp8_cast_row(x_ptr, GROUPS: tl.constexpr, G_POW2: tl.constexpr, ROUND_SCALE: tl.constexpr):
    """One token row (GROUPS x 128 values) -> (fp8 e4m3 [G_POW2, 128], fp32 scales [G_POW2], group mask), bit for
    bit moe/ll_layout.per_token_cast_to_fp8 on CUDA: scale = max(amax, 1e-4) * fp32(1 / 448) (round_scale: up to
    a power of 2 from the bits), q = x / scale correctly rounded (div_rn), clamped to +-448, cast to nearest."""
    g = tl.arange(0, G_POW2)
    c = tl.arange(0, 128)
    gm = g < GROUPS
    v = tl.load(x_ptr + g[:, None] * 128 + c[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v), 1), 1e-4) * (1.0 / 448.0)
    if ROUND_SCALE:
        bits = scale.to(tl.int32, bitcast=True)
        exp = bits & 0x7F800000
        scale = tl.where((bits & 0x007FFFFF) != 0, exp + (1 << 23), exp).to(tl.float32, bitcast=True)
    scale = tl.where(gm, scale, 1.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale[:, None]), -448.0), 448.0)
    return q.to(tl.float8e4nv), scale, g, c, gm


@triton.jit
def _ll_dispatch_send_kernel(x_ptr, s_ptr, idx_ptr, num_tokens, peer_ptrs, me, experts_per_rank,
                             num_max, x_off, s_off, idx_off, cnt_off, stride_x,
                             X_WORDS: tl.constexpr, S_WORDS: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK: tl.constexpr, HAS_S: tl.constexpr, CAST: tl.constexpr = False,
                             ROUND_SCALE: tl.constexpr = False, GROUPS: tl.constexpr = 1,
                             G_POW2: tl.constexpr = 1, mask_ptr=None, HAS_MASK: tl.constexpr = False):
    # Program (t, d) sends token t (t >= num_tokens: an empty slot, its expert ids all -1) to slot [me, t]
    # of rank d; the payload only where d owns one of the token's experts. CAST: x is the bf16/fp16 row,
    # cast here to FP8 with per-128 scales (moe/ll_layout.per_token_cast_to_fp8) and stored as fp8 + fp32
    # scales; otherwise x (and s) are rows of int32 words, moved as they are.
    t = tl.program_id(0)
    d = tl.program_id(1)
    if HAS_MASK:  # a masked destination (Buffer(enable_shrink=True)) gets nothing, not even the counter bump
        if tl.load(mask_ptr + d) != 0:
            return
    kk = tl.arange(0, BLOCK_K)
    valid = (kk * 0 + t) < num_tokens  # a vector mask: the interpreter rejects scalar-bool masks
    idx = tl.load(idx_ptr + t.to(tl.int64) * K + kk, mask=(kk < K) & valid, other=-1)
    row = (me * num_max + t).to(tl.int64)
    base = tl.load(peer_ptrs + d)
    lo = d * experts_per_rank
    hit = tl.sum(((idx >= lo) & (idx < lo + experts_per_rank)).to(tl.int32), axis=0) > 0
    ip = (base + idx_off).to(tl.pointer_type(tl.int32))
    tl.store(ip + row * K + kk, idx.to(tl.int32), mask=kk < K)
    if hit:
        if CAST:
            q, scale, g, c, gm = _fp8_cast_row(x_ptr + t.to(tl.int64) * stride_x, GROUPS, G_POW2, ROUND_SCALE)
            xp = (base + x_off).to(tl.pointer_type(tl.float8e4nv))
            tl.store(xp + row * (GROUPS * 128) + g[:, None] * 128 + c[None, :], q, mask=gm[:, None])
            sp = (base + s_off).to(tl.pointer_type(tl.float32))
            tl.store(sp + row * GROUPS + g, scale, mask=gm)
        else:
            offs = tl.arange(0, BLOCK)
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
    cp = (base + cnt_off).to(tl.pointer_type(tl.int64))
    tl.atomic_add(cp + me, 1, sem="release", scope="sys")


@triton.jit
def _ll_combine_send_kernel(y_ptr, dst_ptr, peer_ptrs, me, num_max, comb_off, cnt_off,
                            Y_WORDS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, mask_ptr=None,
                            HAS_MASK: tl.constexpr = False):
    # Program (s * M + t, k): the row our expert computed for top-k slot k of token t of rank s goes to slot
    # [t, k] of rank s (nothing where that slot is not ours); then one count on s's counter of this source.
    pid = tl.program_id(0)
    k = tl.program_id(1)
    s = pid // num_max
    t = pid % num_max
    if HAS_MASK:
        if tl.load(mask_ptr + s) != 0:
            return
    base = tl.load(peer_ptrs + s)
    cp = (base + comb_off).to(tl.pointer_type(tl.int32))
    offs = tl.arange(0, BLOCK)
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
def clock64():
    """The SM's cycle counter (compiled GPU kernels only)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["trap"])
def _ll_wait_kernel(cnt_ptr, err_addr, stats_ptr, num_src, expected, code, timeout_ns, max_iters, trap,
                    BLOCK: tl.constexpr, USE_TIMER: tl.constexpr, HAS_STATS: tl.constexpr = False, mask_ptr=None,
                    HAS_MASK: tl.constexpr = False):
    # One program spins until each of the num_src counters (int64, acquire loads) reaches `expected`, then
    # consumes them all (subtracts `expected`). After timeout_ns it writes (code, lowest source still short, its
    # counter, expected) into the error record at err_addr (host-mapped int32 [4]: fields first, then a system
    # fence, then the code) and consumes nothing; a nonzero record there already: no wait. One program, so one
    # writer of the record. HAS_STATS: stats[src] += what the wait for src cost (SM clock cycles until its
    # counter was seen complete, DeepEP's dispatch_wait_recv_cost_stats unit; poll iterations under the
    # interpreter, which has no clock). HAS_MASK (Buffer(enable_shrink=True)): masked sources are neither waited
    # for nor consumed, and a timeout masks the sources still short instead of recording an error (DeepEP's shrink).
    # trap != 0 (a launch captured in a CUDA graph, no mask): after the record is written, trap. A runtime argument,
    # never specialized: the captured launch runs the kernel the eager warm-up compiled (no compile or module load
    # during a capture).
    offs = tl.arange(0, BLOCK)
    m = offs < num_src
    if HAS_MASK:
        m = m & (tl.load(mask_ptr + offs, mask=m, other=1) == 0)
    ptrs = cnt_ptr + offs
    err = err_addr.to(tl.pointer_type(tl.int32))
    vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
    lo = tl.min(tl.where(m, vals, expected), 0)
    failed = (tl.load(err, volatile=True) != 0).to(tl.int32)  # an earlier timeout: no wait (host raises)
    if not HAS_MASK:
        if USE_TIMER:
            if trap != 0:
                if failed != 0:  # an earlier (eager) timeout left the record set: a replay could neither wait nor
                    # raise, it would return what is there: trap
                    tl.store(err, tl.load(err, volatile=True) | _TRAPPED)
                    _fence_sys()
                    _trap()
    waiting = (lo < expected) & (failed == 0)
    it = 0
    if HAS_STATS:  # stats[src] = its value before + the cost while src was short, written in the loop: a tensor
        s0 = tl.load(stats_ptr + offs, mask=m, other=0)  # carried through the loop breaks Triton 3.6's compiler
    if USE_TIMER:
        t0 = globaltimer_ns()
        if HAS_STATS:
            c0 = clock64()
    while waiting:
        vals = tl.atomic_add(ptrs, 0, mask=m, sem="acquire", scope="sys")
        lo = tl.min(tl.where(m, vals, expected), 0)
        it += 1
        if USE_TIMER:
            expired = (globaltimer_ns() - t0) > timeout_ns
            if HAS_STATS:
                tl.store(stats_ptr + offs, s0 + (clock64() - c0), mask=m & (vals < expected))
        else:
            expired = it > max_iters
            if HAS_STATS:
                tl.store(stats_ptr + offs, s0 + it.to(tl.int64), mask=m & (vals < expected))
        timed_out = expired & (lo < expected)
        if HAS_MASK:
            if timed_out:  # shrink: mask the late sources, consume the complete ones (here: no loop result is
                # used after the loop, which Triton 3.6 handles badly, see HAS_STATS)
                tl.store(mask_ptr + offs, tl.full([BLOCK], 1, tl.int32), mask=m & (vals < expected))
                tl.atomic_add(ptrs, -expected, mask=m & (vals >= expected), sem="relaxed", scope="sys")
        elif timed_out:
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
            if trap != 0:
                if USE_TIMER:
                    tl.store(err, code | _TRAPPED)
                    _fence_sys()
                    _trap()
        failed = failed | timed_out.to(tl.int32)
        waiting = (lo < expected) & (failed == 0)
    if lo >= expected:  # after a timeout nothing (more) is consumed (Buffer.clean_low_latency_buffer resets)
        tl.atomic_add(ptrs, -expected, mask=m, sem="relaxed", scope="sys")


def _words(t, name):
    """`t` ([rows, n] contiguous) as int32 words [rows, n * itemsize / 4]."""
    if t.dtype == torch.int32 and t.dim() == 2 and t.numel() and t.is_contiguous():
        return t  # already words (the hot path: views made once, moe/low_latency.py)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    row_bytes = t.size(-1) * t.element_size() if t.dim() else t.element_size()
    if row_bytes % 4:
        raise ValueError(f"{name}: a row of {row_bytes} bytes is not a whole number of 4-byte words")
    return t.reshape(t.size(0), -1).view(torch.uint8).view(torch.int32) if t.numel() else \
        torch.zeros(1, max(row_bytes // 4, 1), dtype=torch.int32, device=t.device)


def masked(mask):
    """Launch arguments for an optional rank mask (int32 [R] device tensor, nonzero = masked): none at all without
    one, so the unmasked launches stay the kernels' default specialization."""
    return {} if mask is None else {"mask_ptr": mask, "HAS_MASK": True}


def dispatch_send(x, x_scales, topk_idx, num_max, peer_ptrs, me, num_ranks, experts_per_rank,
                  x_off, s_off, idx_off, cnt_off, cast_fp8=False, round_scale=False, mask=None):
    """Store this rank's tokens into every rank's dispatch region and bump its counter there.

    x: [T, H] payload (any dtype, rows of whole 4-byte words), x_scales: [T, G] fp32 or None,
    topk_idx: [T, K] int64. cast_fp8: x is bf16/fp16/fp32 [T, H] (H % 128 == 0, CUDA: the interpreter's FP8
    conversion rounds wrongly), cast to FP8 in the kernel (what per_token_cast_to_fp8 gives, `round_scale`
    as there; x_scales must be None). Region layout on each receiver (byte offsets into its buffer):
    x_off: [num_ranks * num_max, row words], s_off: the same for scales, idx_off: [num_ranks * num_max, K]
    int32, cnt_off: int64 [num_ranks] counters. Runs num_max programs per destination rank, each adding 1 to
    that rank's counter of this source (so a receiver expects `num_max`). mask: int32 [R] or None; a masked
    destination gets no store at all.
    """
    num_tokens, k = topk_idx.shape
    idx = topk_idx.contiguous() if num_tokens else torch.full((1, k), -1, dtype=torch.int64, device=x.device)
    meta = dict(K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK=1024, num_warps=4, **masked(mask))
    if cast_fp8:
        if x_scales is not None or x.dim() != 2 or x.size(1) % 128 or not x.dtype.is_floating_point or \
                x.element_size() not in (2, 4):
            raise ValueError("cast_fp8 takes a bf16/fp16/fp32 x [T, H] with H % 128 == 0 and no x_scales")
        if x.stride(1) != 1:
            x = x.contiguous()
        groups = x.size(1) // 128
        xin = x if num_tokens else torch.zeros(1, x.size(1), dtype=x.dtype, device=x.device)
        _ll_dispatch_send_kernel[(num_max, num_ranks)](
            xin, xin, idx, num_tokens, peer_ptrs, me, experts_per_rank, num_max, x_off, s_off, idx_off, cnt_off,
            xin.stride(0), X_WORDS=1, S_WORDS=1, HAS_S=True, CAST=True, ROUND_SCALE=bool(round_scale),
            GROUPS=groups, G_POW2=triton.next_power_of_2(groups), **meta)
        return
    xw = _words(x, "x")
    sw = _words(x_scales, "x_scales") if x_scales is not None else xw
    _ll_dispatch_send_kernel[(num_max, num_ranks)](
        xw, sw, idx, num_tokens, peer_ptrs, me, experts_per_rank, num_max, x_off, s_off, idx_off, cnt_off, 0,
        X_WORDS=xw.size(1), S_WORDS=sw.size(1), HAS_S=x_scales is not None, **meta)


def combine_send(y, dst, peer_ptrs, me, num_ranks, num_max, comb_off, cnt_off, mask=None):
    """Store every row our experts computed into its source rank's combine region, then bump its counter.

    y: [rows, H] (the experts' outputs, flattened), dst: int64 [num_ranks * num_max, K], the row of y
    holding (source rank, token, k) or -1. Region on each source: [num_max, K, row words] at comb_off.
    Runs num_ranks * num_max * K programs, num_max * K per destination (the count a receiver expects); none for
    a destination masked in `mask` (int32 [R] or None).
    """
    yw = _words(y, "combine x")
    k = dst.size(1)
    _ll_combine_send_kernel[(num_ranks * num_max, k)](
        yw, dst.contiguous(), peer_ptrs, me, num_max, comb_off, cnt_off,
        Y_WORDS=yw.size(1), K=k, BLOCK=1024, num_warps=4, **masked(mask))


def traps_on_timeout(use_timer, mask):
    """Whether a wait launched now traps on a timeout: when captured in a CUDA graph (a replay's timeout cannot
    raise on the host and would return what arrived, silently), unless a rank mask shrinks instead."""
    return bool(use_timer and mask is None and torch.cuda.is_current_stream_capturing())


def wait_counters(counters, err_addr, expected, code, timeout_s, stats=None, mask=None):
    """Wait on the current stream until each of `counters` (int64 [R], local) reaches `expected`; consume.

    err_addr: address of an int32 [4] word block the device can write (pinned host memory on CUDA).
    One program polls every counter; after `timeout_s` it records (code, lowest source still short, its
    counter, expected) and consumes nothing. A nonzero record already there: returns at once.
    stats: int64, at least R elements, contiguous, or None: stats[src] += the cost of waiting for src (see
    _ll_wait_kernel; DeepEP's dispatch_wait_recv_cost_stats, which adds it once per local expert).
    mask: int32 [R] or None: masked sources are skipped, and instead of recording a timeout the wait masks the
    sources still short and consumes the others (Buffer(enable_shrink=True)).
    """
    if counters.dtype != torch.int64 or counters.dim() != 1 or not counters.is_contiguous():
        raise ValueError(f"counters must be a contiguous int64 [R] tensor, got {counters.dtype} "
                         f"{tuple(counters.shape)} strides {counters.stride()}")
    use_timer = counters.is_cuda and not interpreting()
    trap = traps_on_timeout(use_timer, mask)
    timeout_ns = int(max(timeout_s, 0.0) * 1e9)
    # No clock under the interpreter: bound by iterations, each a slow Python round trip (as moe_nvlink).
    max_iters = max(int(max(timeout_s, 0.0) * 1000), 1) if not use_timer else 1
    block = triton.next_power_of_2(max(counters.numel(), 1))
    if stats is not None and (stats.dtype != torch.int64 or not stats.is_contiguous() or stats.numel() < counters.numel()):
        raise ValueError(f"wait stats must be a contiguous int64 tensor of at least {counters.numel()} elements, got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    _ll_wait_kernel[(1,)](counters, int(err_addr), stats if stats is not None else counters, counters.numel(),
                          int(expected), int(code), timeout_ns, max_iters, int(trap), BLOCK=block, USE_TIMER=use_timer,
                          HAS_STATS=stats is not None, num_warps=1, **masked(mask))


class ErrorWord:
    """An int32 [4] error record the kernels write and the host reads without a device sync.

    On CUDA it lives in pinned host memory (mapped into the device's address space by UVA), so a
    timed-out wait becomes visible to the host at its next check without stalling the stream.
    A plain read shows what kernels that already ran wrote: a wait still queued or spinning (launches
    are asynchronous) has written nothing yet. `read(sync=True)` waits for the device first.
    """

    def __init__(self, device, what="turbo_dist low-latency"):
        self.device, self.what = device, what
        pin = device.type == "cuda"
        self.tensor = torch.zeros(ERR_NUMEL, dtype=torch.int32, pin_memory=pin)
        self.addr = self.tensor.data_ptr()
        _LIVE.add(self)

    def read(self, sync=False):
        """[code, source rank, counter value seen, expected]; sync=True: after every queued kernel ran."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [int(v) for v in self.tensor.tolist()]

    def clear(self):
        self.tensor.zero_()


_LIVE = weakref.WeakSet()


def describe(record, what="turbo_dist low-latency"):
    """One line for a nonzero error record, None for a clear one."""
    code, src, seen, expected = record
    if not code:
        return None
    base = code & ~TRAPPED
    op = {ERR_DISPATCH: "dispatch", ERR_COMBINE: "combine"}.get(base, f"wait (code {base})")
    line = f"{what} {op}: the wait for rank {src} timed out (its counter {seen} of {expected})"
    if code & TRAPPED:
        return line + ("; a wait replayed from a CUDA graph trapped on it (CUDA reports a launch failure or an "
                       "illegal instruction)")
    return line + " (recorded, not cleared by Buffer.clean_low_latency_buffer)"


@atexit.register
def _report_at_exit():
    # A trapped replay leaves the process with a CUDA error that names nothing of ours: say what timed out. The
    # records are pinned host memory, still mapped while the CUDA context is in its error state after a trap (an
    # exit through os._exit or a signal, e.g. NCCL's watchdog abort, skips this).
    for word in list(_LIVE):
        try:
            line = describe([int(v) for v in word.tensor.tolist()], word.what)
        except Exception:  # interpreter shutdown
            continue
        if line:
            print(line, file=sys.stderr)
