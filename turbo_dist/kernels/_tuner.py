"""Config selection for our Triton GEMMs (dense and grouped): every candidate timed interleaved, not one
after another.

triton.autotune times each config alone, in list order (~100 ms each). On a power-capped H200 the clock
drifts over those seconds, so configs late in the list are measured slower than they are: on 8192x2112x7168
it kept a config 8-13% slower than the best one (benchmarks/results/tune_ops_h200.json: autotuned 0.424-0.43
ms, best forced config 0.375-0.394 ms, the same configs). Here each candidate is compiled and run once, then
all are timed round-robin in pairs of rounds, a shuffled order then its reverse (so a drifting clock and the
candidate timed before favour no one),
and the fastest median over pairs wins; each launch is timed alone with L2 flushed before it, as do_bench
does. Candidates may be different kernels (the split-tail ones beside the
plain one), so the choice
between them is measured too. Choices are cached per key for the process.
"""
import itertools
import logging
import random
import statistics

import torch

log = logging.getLogger("turbo_dist")

PAIRS = 3  # of timed rounds (forward + reversed)
TARGET_MS = 2.0  # per timed sample: enough launches (each timed alone) to make event timing noise small
_CACHE = {}
_PICKS = itertools.count()  # seeds the candidate orders of each pick


def _errors_that_skip():
    """Compile / resource failures that rule a candidate out (as triton.autotune treats them)."""
    from triton.runtime.errors import OutOfResources

    errs = [OutOfResources]
    try:
        from triton.compiler.errors import CompileTimeAssertionFailure
        errs.append(CompileTimeAssertionFailure)
    except ImportError:  # pragma: no cover
        pass
    try:
        from triton.runtime.errors import PTXASError
        errs.append(PTXASError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


FLUSH_L2_MULTIPLE = 2  # the flush buffer: twice the device's L2, zeroed before each timed launch


def cuda_event_timer(flush):
    """timer(launch, reps) -> ms per launch, from CUDA events around each launch alone, L2 flushed before
    each one (by zeroing `flush`) as between a model's layers: an operand left in L2 by the previous
    repetition (a 2112 x 7168 bf16 weight is 30 MB, the H200's L2 50 MB) would favour other configs than
    the ones that are fastest in a real step."""
    def timer(launch, reps):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for e0, e1 in events:
            flush.zero_()
            e0.record()
            launch()
            e1.record()
        events[-1][1].synchronize()
        return sum(e0.elapsed_time(e1) for e0, e1 in events) / reps
    return timer


def cached(key):
    """The index `pick` chose for `key`, or None (the caller then builds the candidates and picks)."""
    return _CACHE.get(key)


def launch_best(key, configs, launcher, device):
    """Run `launcher(configs[i])()` for the `i` chosen for `key` (timed by `pick` on first use; while a CUDA
    graph is being captured, the untimed first config). `launcher(config)` builds a no-argument launch."""
    best = _CACHE.get(key)
    if best is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        best = pick(key, [launcher(cfg) for cfg in configs], capturing=capturing, device=device)
    launcher(configs[best])()


def pick(key, launches, timer=None, capturing=False, device=None):
    """Index of the fastest of `launches` (callables running one candidate each), cached under `key`.
    A candidate whose first run raises a compile/resource error is skipped; if all are, the first error is
    raised. `timer(launch, reps) -> ms` (default: CUDA events on `device`, L2 flushed before each launch).
    While a CUDA graph is being captured nothing can be timed: candidate 0 is used and nothing is cached."""
    if key in _CACHE:
        return _CACHE[key]
    if len(launches) == 1:
        _CACHE[key] = 0
        return 0
    if capturing:
        log.warning("turbo_dist: GEMM config for %s chosen during CUDA graph capture: untimed first candidate", key)
        return 0
    if timer is not None:
        return _pick(key, launches, timer)
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):  # the launches, events and flush buffer on the operands' device
        return _pick(key, launches, _default_timer(device))


def _default_timer(device):
    """CUDA-event timer with an L2 flush buffer (twice the L2; freed after tuning). Without the memory for it
    (tuning runs in a model's first step) the launches are timed without flushing."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    try:
        flush = torch.empty(FLUSH_L2_MULTIPLE * l2, dtype=torch.int8, device=device)
    except torch.OutOfMemoryError:
        log.info("turbo_dist: no memory for the L2 flush buffer: GEMM candidates timed without flushing")
        flush = torch.empty(0, dtype=torch.int8, device=device)
    return cuda_event_timer(flush)


def _pick(key, launches, timer):
    skip = _errors_that_skip()
    alive, first_error = [], None
    for i, launch in enumerate(launches):
        try:
            launch()  # compiles; the first run is not timed
            alive.append(i)
        except skip as exc:
            first_error = first_error or exc
            log.debug("turbo_dist: GEMM candidate %d for %s ruled out: %s", i, key, exc)
    if not alive:
        raise first_error
    one = {i: timer(launches[i], 1) for i in alive}
    reps = {i: max(1, min(20, int(TARGET_MS / max(one[i], 1e-3)))) for i in alive}
    # rounds in pairs, an order then the same reversed: a pair's mean puts every candidate at the same average
    # position, so a clock drifting linearly cancels; the median over pairs drops a disturbed pair. Each pair's
    # order is a fresh permutation (seeded: reproducible per process), so no candidate is always timed right
    # after the same one: on H200 a GEMM timed right after a power-hungry one ran up to 12-15% slower
    # (benchmarks/results/probe_interleave_bias_h200.json).
    rng = random.Random(next(_PICKS))
    times = {i: [] for i in alive}
    for _ in range(PAIRS):
        pair = {}
        order = list(alive)
        rng.shuffle(order)
        for i in order + order[::-1]:
            pair[i] = pair.get(i, 0.0) + timer(launches[i], reps[i]) / 2
        for i in alive:
            times[i].append(pair[i])
    best = min(alive, key=lambda i: statistics.median(times[i]))
    log.debug("turbo_dist: GEMM candidates for %s: %s -> %d", key,
              {i: round(statistics.median(t), 4) for i, t in times.items()}, best)
    _CACHE[key] = best
    return best
