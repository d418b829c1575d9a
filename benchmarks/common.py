"""Small helpers shared by the benchmark CLIs: timing, JSON output, a printed table.

Stable API (other benches import it):
    bench(fn, warmup_ms=25, rep_ms=100) -> median milliseconds
    bench_interleaved({label: fn}, rounds=5, rep_ms=40, on_error=None, warm=True, order=None) -> {label: ms}
    bench_order(order=None), round_order(labels, r, order, seed=0) -> the rounds' label order (balanced / shuffle /
                                          rotate); design_rounds(n, order); bench_seed() -> this run's order seed
    write_json(path, rows, meta)        -> writes {"command", "machine", "timing_order", "order_seed", "timestamp_utc",
                                          "meta", "rows"}
    print_table(rows, cols)             -> prints an aligned text table
    machine_info()                      -> dict describing host, GPU, versions, git commit, TURBO_DIST_* settings
    git_info(path=None)                 -> {"git_commit", "git_dirty", "git_changed", "source_digest"} of the checkout
    turbo_dist_env()                    -> the TURBO_DIST_* environment variables (they change what the defaults run)
    time_across_ranks(fn, warmup, iters)-> median ms on each rank (CUDA events), max over the group
"""
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time

import torch


def bench(fn, warmup_ms=25, rep_ms=100):
    """Median time of `fn()` in milliseconds.

    On CUDA: triton.testing.do_bench (CUDA events, L2 flushed between reps, median). On CPU: a
    perf_counter loop with the same warm-up / repetition budget, so benches also run (slowly) in CI.
    """
    if torch.cuda.is_available():
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except ImportError:  # pragma: no cover - triton always ships with CUDA torch
            if not _CUDA_EVENTS_FALLBACK:
                _CUDA_EVENTS_FALLBACK.append("triton.testing.do_bench not importable: bench() timed with CUDA events "
                                             "back to back, no L2 flush between launches")
        return _bench_cuda_events(fn, warmup_ms, rep_ms)
    return _bench_cpu(fn, warmup_ms, rep_ms)


_INTERLEAVED_CALLS = itertools.count()


ORDERS = ("balanced", "shuffle", "rotate")
_RUN_SEED = []


def bench_order(order=None):
    """The order interleaved rounds time their labels in: `order`, else TURBO_DIST_BENCH_ORDER, else "balanced"
    (see bench_interleaved); anything else raises ValueError."""
    order = order or os.environ.get("TURBO_DIST_BENCH_ORDER", "balanced")
    if order not in ORDERS:
        raise ValueError(f"bench order is one of {', '.join(repr(o) for o in ORDERS)}, got {order!r}")
    return order


def bench_seed():
    """This run's seed for the timing orders: TURBO_DIST_BENCH_SEED (an integer: a run's orders repeated), else
    drawn once per process, so two runs of a bench time their labels in different orders and their mean is not
    biased the same way twice (write_json records it as order_seed)."""
    if not _RUN_SEED:
        env = os.environ.get("TURBO_DIST_BENCH_SEED")
        try:
            _RUN_SEED.append(int(env) if env not in (None, "") else random.SystemRandom().randrange(2 ** 31))
        except ValueError:
            raise ValueError(f"TURBO_DIST_BENCH_SEED must be an integer, got {env!r}") from None
    return _RUN_SEED[0]


def design_rounds(n, order):
    """Rounds of `order` over n labels after which, within the rounds, every label has been timed right after every
    other one equally often (balanced: n for even n, 2n for odd n; 1 for the others, which promise nothing). The
    step from one round's last label to the next round's first is outside that balance: one more adjacency per
    round boundary, for pairs that change with the seed."""
    if order != "balanced" or n <= 1:
        return 1
    return n if n % 2 == 0 else 2 * n


def _williams_row(n, r):
    """Row r of a Williams design on 0..n-1 (a Latin square whose rows, with their mirrors for odd n, put every
    ordered pair of distinct labels next to each other equally often): row 0 is 0, 1, n-1, 2, n-2, ..., row i
    adds i mod n; for odd n rows n..2n-1 are rows 0..n-1 reversed."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    i = r % design_rounds(n, "balanced")
    row = [(x + i) % n for x in first]
    return row[::-1] if i >= n else row


def round_order(labels, r, order, seed=0):
    """Round r's sequence of `labels` under `order` (bench_order): "balanced", row r of a Williams design with the
    labels assigned to its symbols by a permutation seeded by `seed` (within the rounds, each label equally often
    right after each other one over design_rounds rounds, and in each position); "shuffle", a permutation seeded
    by (seed, r);
    "rotate", the list rotated by r."""
    if order == "balanced":
        seq = list(labels)
        if len(seq) <= 1:
            return seq
        random.Random(seed).shuffle(seq)
        return [seq[i] for i in _williams_row(len(seq), r)]
    if order == "shuffle":
        seq = list(labels)
        random.Random(seed * 1000 + r).shuffle(seq)
        return seq
    return labels[r % len(labels):] + labels[:r % len(labels)] if labels else []


def bench_interleaved(fns, rounds=5, warmup_ms=10, rep_ms=40, on_error=None, warm=True, order=None):
    """Time several implementations of one case fairly: {label: fn} -> {label: ms, None if it raised}.

    Each fn runs once untimed (compile / autotune / caches), then `rounds` rounds each time every fn with
    bench(fn, warmup_ms, rep_ms); a label's time is the median of its round medians. Clock, thermal and
    allocator drift then hit every label alike, so two labels running the same kernel agree to ~1-3% (one
    back-to-back do_bench per label does not: up to 6% apart on H200).
    order: "balanced" (default; the rounds follow a Williams design, so within the rounds each label is timed
    right after each other one equally often (the round boundaries add one adjacency each, for pairs drawn by the
    seed), and `rounds` > 1 is rounded up to whole designs: design_rounds, 2n rounds for an odd number n of
    labels, each round's warmup_ms and rep_ms cut in proportion to keep about the time asked for, down to 5 / 10
    ms), "shuffle" (a permutation per round) or "rotate" (the list rotated by one per round: each label keeps its
    neighbours). The orders matter because a label timed right after a power-hungry one is
    timed slower: on H200 a bf16 GEMM 12-15% slower after an 8192^3 bf16 GEMM than after an idle GPU, an FP8
    grouped GEMM 4%; shuffled, 0-2% (benchmarks/results/probe_interleave_bias_h200.json). Shuffled rounds
    still leave pairs unevenly: five shuffled rounds of bench_ops' grouped G=8 fc1 forward timed `default` right
    after `wgmma` four times, and since the seeds were fixed, in every run (up to 2026-12-05), which put the
    default label 1-5% behind the same kernels forced. Orders are seeded by the call's number in this process
    and bench_seed() (TURBO_DIST_BENCH_SEED, else random per run); TURBO_DIST_BENCH_ORDER overrides the default.
    A fn that raises is reported through on_error(label, exc) and not timed again (on_error None: it raises).
    warm=False skips the untimed first call (CPU dry runs, where every call is slow and nothing compiles).
    """
    order = bench_order(order)
    call = next(_INTERLEAVED_CALLS)
    labels = list(fns)
    alive = []
    for label in labels:
        try:
            if warm:
                fns[label]()
            alive.append(label)
        except Exception as exc:  # a backend that cannot run this case is reported, not fatal
            if on_error is None:
                raise
            on_error(label, exc)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = {label: [] for label in alive}
    asked = rounds = max(1, rounds)
    if rounds > 1:  # whole designs (one round: a smoke run), in about the time the rounds asked for would take
        step = design_rounds(len(alive), order)
        rounds = -(-rounds // step) * step
        warmup_ms = max(warmup_ms * asked / rounds, min(warmup_ms, 5.0))
        rep_ms = max(rep_ms * asked / rounds, min(rep_ms, 10.0))
    seed = bench_seed() * 100003 + call  # per run and call: no case repeats another's orders, nor a run another's
    for r in range(rounds):
        for label in round_order(alive, r, order, seed=seed):
            if label not in times:
                continue
            try:
                times[label].append(bench(fns[label], warmup_ms, rep_ms))
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(label, exc)
                del times[label]
    return {label: (statistics.median(times[label]) if label in times else None) for label in labels}


_CUDA_EVENTS_FALLBACK = []  # set once bench() timed without triton's do_bench (no L2 flush): machine_info says so


def _bench_cuda_events(fn, warmup_ms, rep_ms):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(3, int(rep_ms / est))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def _bench_cpu(fn, warmup_ms, rep_ms):
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, int(warmup_ms / est) - 1)):
        fn()
    times = []
    for _ in range(max(3, int(rep_ms / est))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_info():
    """Host, accelerator and library versions, for the JSON `machine` key."""
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            gpu_state=gpu_state(),
        )
    else:
        info.update(gpu=None, gpu_count=0, cpu_count=os.cpu_count())
    if _CUDA_EVENTS_FALLBACK:
        info["timing_fallback"] = _CUDA_EVENTS_FALLBACK[0]
    info.update(git_info())
    info["env"] = turbo_dist_env()
    return info


def git_info(path=None):
    """The commit of the checkout `path` (default: the one benchmarks/ is in) and whether tracked files differ from
    it (git_dirty; git_changed: up to 20 of their paths), so a JSON names the code that produced it. None values
    where git or the repository is missing (a copy of the tree without .git); source_digest (a hash of the sources
    under turbo_dist/, csrc/ and benchmarks/) names the code there too: compare it with a checkout's."""
    import subprocess

    root = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {"git_commit": None, "git_dirty": None, "git_changed": None, "source_digest": source_digest(root)}
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return info
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return info
    info["git_commit"] = head.stdout.strip() or None
    if status.returncode == 0:
        changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        info.update(git_dirty=bool(changed), git_changed=changed[:20])
    return info


def source_digest(root):
    """sha256 (16 hex digits) over the paths and bytes of the .py / .cu / .cuh / .h / .cpp files under root's
    turbo_dist/, csrc/ and benchmarks/ (None where root has none of them)."""
    import hashlib

    h, seen = hashlib.sha256(), 0
    for top in ("turbo_dist", "csrc", "benchmarks"):
        for d, dirs, files in sorted(os.walk(os.path.join(root, top))):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".cu", ".cuh", ".h", ".cpp")):
                    full = os.path.join(d, name)
                    h.update(os.path.relpath(full, root).encode() + b"\0")
                    with open(full, "rb") as f:
                        h.update(f.read())
                    seen += 1
    return h.hexdigest()[:16] if seen else None


def turbo_dist_env():
    """{name: value} of the TURBO_DIST_* environment variables set now: backend choices, rules and the bench order
    they select change what a run measured."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TURBO_DIST_")}


# Dense tensor-core peaks from NVIDIA's datasheets, TFLOP/s (no sparsity): the "hardware limit" every
# frac_peak column divides by. H100 and H200 share the compute; PCIe / NVL parts run lower clocks.
DATASHEET_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H100": {"bf16": 989.4, "fp8": 1978.9},
    "H200 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
}


def peak_tflops(kind="bf16", device_name=None):
    """Datasheet dense peak (TFLOP/s) of this GPU for `kind` ("bf16" also covers fp16, "fp8"), or None for a GPU
    not in DATASHEET_PEAK_TFLOPS (then frac_peak columns are left empty rather than guessed)."""
    peaks = _datasheet(DATASHEET_PEAK_TFLOPS, device_name)
    return None if peaks is None else peaks[kind]


# HBM bandwidth from NVIDIA's datasheets, GB/s: the bound of a copy inside one GPU (bench_moe's world-1 self-loop,
# where every byte DeepEP's count counts once is read and written once in HBM).
DATASHEET_HBM_GBPS = {
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "H200 NVL": 4800.0,
    "H200": 4800.0,
}


def _datasheet(table, device_name):
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, value in table.items():  # most specific names first
        if all(word in device_name for word in key.split()):
            return value
    return None


def peak_hbm_gbps(device_name=None):
    """Datasheet HBM bandwidth (GB/s) of this GPU, or None for a GPU not in DATASHEET_HBM_GBPS (frac_peak columns
    are then left empty rather than divided by another GPU's number)."""
    return _datasheet(DATASHEET_HBM_GBPS, device_name)


def gpu_state():
    """SM clock, its maximum, power and temperature of each GPU as nvidia-smi reports them when the JSON is
    written (None without nvidia-smi): same-kernel timings differ by several % on a throttled GPU, and this
    is the record that tells a slow clock from a slow kernel."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    fields = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] or out.stderr.strip()[:200]


def command_line():
    return " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)


def _seed_or_reason():
    try:
        return bench_seed()
    except ValueError as exc:  # a bad TURBO_DIST_BENCH_SEED must not lose a run at its last step
        return str(exc)


def write_json(path, rows, meta=None):
    """Write `rows` (list of dicts) with the command line and machine info to `path`. `timing_order`: meta's (a
    bench that does not time through bench_interleaved says how it timed), else bench_interleaved's order now
    ("balanced" / "shuffle" / "rotate", TURBO_DIST_BENCH_ORDER); `order_seed`: bench_seed(), the run's seed of
    those orders (TURBO_DIST_BENCH_SEED=<it> repeats them)."""
    meta = dict(meta or {})
    order = meta.pop("timing_order", None)
    if order is None:
        try:
            order = bench_order()
        except ValueError as exc:
            order = str(exc)
    doc = {
        "command": meta.pop("command", command_line()),
        "machine": meta.pop("machine", machine_info()),
        "timing_order": order,
        "order_seed": meta.pop("order_seed") if "order_seed" in meta else _seed_or_reason(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "meta": meta,
        "rows": rows,
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return doc


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return "" if v is None else str(v)


def print_table(rows, cols=None, file=None):
    """Print `rows` (list of dicts) as an aligned table over `cols` (default: keys of the first row)."""
    if not rows:
        print("(no rows)", file=file)
        return
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=file)
    sys.stdout.flush()


def probe_main(doc, cases, run_case, columns, case_keys=lambda name: [name]):
    """The command line of a per-case probe: --json, --cases (comma-separated, default `cases`), --rounds;
    rows += run_case(name, rounds) per case, printed as tables over `columns` (one per key of case_keys(name),
    rows whose "case" equals it), written with write_json at the end."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--cases", default=",".join(cases))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args.rounds)
        for key in case_keys(name):
            print_table([r for r in rows if r["case"] == key], columns)
    if args.json:
        write_json(args.json, rows)
    return rows


def time_across_ranks(fn, warmup, iters, device="cuda"):
    """Median ms of `fn` per rank (the same call count on every rank: CUDA events, or perf_counter with
    device="cpu"), max over the ranks of the default process group: the time the slowest rank sees, which
    is what a collective step costs."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    if device == "cpu":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
    else:
        torch.cuda.synchronize()
        dist.barrier()
        events = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        med = statistics.median(s.elapsed_time(e) for s, e in events)
    t = torch.tensor([med], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
