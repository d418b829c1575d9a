"""Signal flags for the async-TP pipelines: int32 flags in symmetric memory, bounded waits.

A *pad* is an int32 array in a symmetric buffer, the same layout on every rank. A rank announces
progress by writing an epoch number into a slot of a peer's pad (`put_signal`, a release store at
system scope); the peer waits until the slot holds at least that epoch (`wait_signal`, acquire
loads). Epochs only grow, so flags never need resetting and a fast rank running ahead is harmless.

A wait never spins forever: after `timeout_s` (GPU global timer; an iteration budget under the
Triton interpreter) it records `(1, peer, slot, expected)` in a small device tensor `err` and
returns. Every later wait returns at once while `err[0]` is set; the host checks `err`.

Kernels know nothing of process groups: they take peer base addresses (`pad_ptrs`, int64 [W]).
"""

import torch
import triton
import triton.language as tl

from ._device import globaltimer_ns, interpreting

ERR_NUMEL = 4  # err: [failed, peer, slot, expected]


# Epochs, slots and ranks change on every call: do not let Triton compile a variant per value class.
@triton.jit(do_not_specialize=["slot", "value", "first_peer", "num_peers", "world_size"])
def _put_signal_kernel(pad_ptrs, slot, value, first_peer, num_peers, world_size):
    # One program writes `value` into pad[slot] of peers first_peer, first_peer + 1, ... (mod world_size).
    for i in range(num_peers):
        r = (first_peer + i) % world_size
        base = tl.load(pad_ptrs + r).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(base + slot, value, sem="release", scope="sys")


@triton.jit(do_not_specialize=["slot_base", "expected", "first_peer", "num_peers", "world_size", "timeout_ns",
                                "max_iters"])
def _wait_signal_kernel(pad_ptr, err_ptr, slot_base, expected, first_peer, num_peers, world_size,
                        timeout_ns, max_iters, USE_TIMER: tl.constexpr):
    # Waits until pad[slot_base + r] >= expected for r = first_peer, ... (mod world_size), bounded: one
    # deadline for the whole wait (not per peer), so a call never waits longer than the timeout.
    err = tl.load(err_ptr)
    it = 0
    if USE_TIMER:
        t0 = globaltimer_ns()
    for i in range(num_peers):
        r = (first_peer + i) % world_size
        flag = pad_ptr + slot_base + r
        val = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        waiting = (val < expected) & (err == 0)
        while waiting:
            val = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            it += 1
            if USE_TIMER:
                expired = (globaltimer_ns() - t0) > timeout_ns
            else:
                expired = it > max_iters
            if expired & (val < expected):
                tl.store(err_ptr + 1, r)
                tl.store(err_ptr + 2, slot_base + r)
                tl.store(err_ptr + 3, expected)
                tl.atomic_xchg(err_ptr, 1, sem="release", scope="gpu")
                err += 1
            waiting = (val < expected) & (err == 0)


def put_signal(pad_ptrs, slot, value, first_peer, num_peers, world_size):
    """Write `value` into int32 slot `slot` of the pads at `pad_ptrs[r]` for `num_peers` ranks from `first_peer`.

    pad_ptrs: int64 [world_size] device tensor of every rank's pad base address. Stream-ordered:
    it runs after the work queued before it on the current stream.
    """
    if num_peers <= 0:
        return
    _put_signal_kernel[(1,)](pad_ptrs, int(slot), int(value), int(first_peer), int(num_peers), int(world_size),
                             num_warps=1)


def wait_signal(pad, err, slot_base, expected, first_peer, num_peers, world_size, timeout_s):
    """Wait on the current stream until pad[slot_base + r] >= expected for the `num_peers` ranks from `first_peer`.

    pad: int32 local pad; err: int32 [4] device tensor (set on timeout, see module docstring).
    """
    if num_peers <= 0:
        return
    if err.dtype != torch.int32 or err.numel() < ERR_NUMEL:
        raise ValueError(f"err must be int32 with >= {ERR_NUMEL} elements, got {err.dtype} {tuple(err.shape)}")
    use_timer = not interpreting() and pad.is_cuda
    timeout_ns = int(max(timeout_s, 0.0) * 1e9)
    # No clock under the interpreter: bound by iterations, each a slow Python round trip (~0.5 ms on CPU;
    # a budget of 1e8 per second made a 100 s timeout spin for weeks there).
    max_iters = int(max(timeout_s, 0.0) * 1000) if not use_timer else 0
    _wait_signal_kernel[(1,)](pad, err, int(slot_base), int(expected), int(first_peer), int(num_peers),
                              int(world_size), timeout_ns, max(max_iters, 1), USE_TIMER=use_timer, num_warps=1)


def describe_error(err_host, timeout_s):
    """A message for a set error record (`err_host`: the 4 ints copied back from `err`), or None."""
    failed, peer, slot, expected = (int(v) for v in err_host[:ERR_NUMEL])
    if not failed:
        return None
    return (f"a GPU wait on peer rank {peer} timed out after {timeout_s:.1f}s (signal slot {slot}, "
            f"waiting for epoch {expected}); the peer is stuck, crashed or runs a different sequence of "
            f"turbo_dist.tp calls. Raise TURBO_DIST_TIMEOUT_S if it is only slow.")
