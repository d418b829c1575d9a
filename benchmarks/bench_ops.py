"""Benchmark of turbo_dist.ops GEMM, grouped GEMM and FP8 GEMM against same-run PyTorch baselines.

    python benchmarks/bench_ops.py --json out.json [--quick] [--sections gemm,grouped,fp8,fp8_grouped,overhead]
                                   [--rounds 5] [--rep-ms 40]

Timing: the implementations of one case are timed interleaved, `--rounds` rounds of do_bench(rep `--rep-ms`)
each in a balanced order (common.bench_interleaved: every label timed right after every other one equally often,
`--rounds` rounded up to whole designs, orders seeded per run and recorded as `order_seed`;
TURBO_DIST_BENCH_ORDER=shuffle / rotate for the older orders), and each reports the median of its round medians:
rows that run the same kernel (e.g. `default` when it is torch.mm, and `cublas`) agree to ~1-3%.

Sections (each row: time, TFLOP/s, ratio to the section's baseline measured in the same run, fraction of the
GPU's datasheet dense peak, common.peak_tflops: 989 TFLOP/s bf16 / 1979 FP8 on H100/H200 SXM):
- gemm:        bf16 C = A @ W^T (nn.Linear layout): our Triton kernel, torch.mm (cuBLAS, the baseline) and
               the dispatcher default (what `turbo_dist.ops.gemm` runs without a forced backend);
               4096/8192 cubes, Llama-3-70B and DeepSeek-V3 layer shapes at 8192 tokens.
- grouped:     DeepSeek-V3 experts (hidden 7168, expert dim 2048; fc1 7168 -> 2x2048 gate/up, fc2 2048 -> 7168),
               8/16/32 local experts at 1024 tokens per expert on average, and 32 experts at 256 and 128
               (case G32_t128_...: few tokens per expert, where a per-group loop pays G launches), skewed token
               counts with an empty expert, forward and backward (dgrad + wgrad): our persistent Triton kernel
               vs torch._grouped_mm (baseline) vs a per-group torch.mm loop (x_loop: speed-up over the loop).
- fp8:         (this and fp8_grouped: code in bench_ops_fp8.py) 8192^3 FP8 GEMM, pre-quantized operands
               (torch._scaled_mm vs our Triton; tensorwise / rowwise / blockwise 1x128 x 128x128) and end to end
               (`gemm_fp8`, quantization included; e2e_weights_cached: inside `ops.cache_fp8_weights()`, the
               weight quantized once), vs bf16 cuBLAS.
- fp8_grouped: FP8 grouped GEMM on the DeepSeek-V3 fc1 shape (pre-quantized and end to end) vs the best bf16
               grouped GEMM; plus BLOCKWISE on host token counts aligned to 128 (as FP8 MoE training pads
               them), where cuBLASLt's blockwise GEMM runs once per group (backend torch_loop).
- overhead:    host microseconds per call of ops.gemm / ops.grouped_gemm against torch.mm / torch._grouped_mm
               on tiny operands (the GPU waits on the host): what our checks and dispatcher add per call.
Without CUDA it prints a message and exits 0 (nothing to measure). `--dry-run` runs every section on the CPU
at 1/64 of the sizes in fp32 (set TRITON_INTERPRET=1 for the Triton rows): it checks the script, not speed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_interleaved, machine_info, peak_tflops, print_table, write_json  # noqa: E402

DEVICE, DTYPE, SHRINK = "cuda", torch.bfloat16, 1  # --dry-run: "cpu", torch.float32, 64
PEAK = {}  # {"bf16": TFLOP/s, "fp8": TFLOP/s}: this GPU's datasheet peaks (common.peak_tflops), set in main
ROUNDS, REP_MS = 5, 40.0  # --rounds, --rep-ms

GEMM_SHAPES = [  # (name, M, N, K): C [M, N] = A [M, K] @ W[N, K]^T
    ("cube4096", 4096, 4096, 4096),
    ("cube8192", 8192, 8192, 8192),
    ("llama70b_qkv", 8192, 10240, 8192),
    ("llama70b_o", 8192, 8192, 8192),
    ("llama70b_up", 8192, 28672, 8192),
    ("llama70b_down", 8192, 8192, 28672),
    ("dsv3_qkv_a", 8192, 2112, 7168),
    ("dsv3_o", 8192, 7168, 16384),
    ("dsv3_mlp_up", 8192, 18432, 7168),
    ("dsv3_mlp_down", 8192, 7168, 18432),
]
GEMM_QUICK = ("cube4096", "cube8192", "llama70b_up", "dsv3_mlp_down", "dsv3_qkv_a")
GROUPED_LAYERS = [("fc1", 7168, 4096), ("fc2", 2048, 7168)]  # (name, K, N)
GROUPED_CASES = [(8, 1024), (16, 1024), (32, 1024), (32, 256), (32, 128)]  # (experts, avg tokens per expert)
GROUPED_QUICK = [(8, 1024), (32, 1024), (32, 128)]
GROUPED_LABELS = {"torch": "torch_grouped_mm", "triton": "triton", "loop": "loop"}  # backend -> label


def skewed_lens(num_experts, tokens_per_expert, seed=0):
    """Token counts per expert: log-normal skew (hot and cold experts), expert 1 empty, sum = G * avg."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(num_experts, generator=g) * 0.8)
    w[1 % num_experts] = 0
    lens = torch.floor(w / w.sum() * num_experts * tokens_per_expert).long()
    lens[0] += num_experts * tokens_per_expert - int(lens.sum())
    return lens


def aligned_lens(lens, align):
    """Each count rounded down to a multiple of `align`, the rows taken off given to the largest group (the
    total stays; it is a multiple of `align` here): token counts as MoE layers pad them (expert_alignment)."""
    out = (lens // align) * align
    out[int(torch.argmax(lens))] += int(lens.sum() - out.sum())
    return out


def _rows_for(section, case, results, baseline, flops, peak_key, extra=None):
    """results: {label: ms}; one row each with TFLOP/s, ratio vs results[baseline], fraction of peak."""
    rows = []
    base_ms = results.get(baseline)
    for label, ms in results.items():
        if ms is None:
            continue
        tf = flops / ms / 1e9
        row = {"section": section, "case": case, "impl": label, "ms": ms, "tflops": tf,
               "x_baseline": (base_ms / ms) if base_ms else None, "baseline": baseline,
               "frac_peak": (tf / PEAK[peak_key]) if PEAK.get(peak_key) else None}
        row.update(extra or {})
        rows.append(row)
    return rows


def _default_fields(res, default_label, chosen, label_of):
    """How the dispatcher's default did, from one interleaved measurement `res` {label: ms}:
    default_vs_best: the fastest forced backend / the default label's time (dispatch included; a separate
    timing, so it also carries the bench's noise: two labels of one kernel differ by ~1-3%, up to ~7% on H200);
    choice_vs_best: the fastest forced backend / the backend the default chose (`chosen`, a backend name,
    mapped to its label by `label_of`), from the same numbers: whether the dispatcher picked right;
    default_over_chosen: the default's time / its chosen backend's, the noise plus dispatch overhead."""
    backends = {label: res.get(label) for label in label_of.values() if res.get(label)}
    best = min(backends.values(), default=None)
    dflt = res.get(default_label)
    picked = backends.get(label_of.get(chosen))
    return {"default_vs_best": (best / dflt) if best and dflt else None,
            "choice_vs_best": (best / picked) if best and picked else None,
            "default_over_chosen": (dflt / picked) if dflt and picked else None}


_FORCED_OPS = set()  # ops some _forced fn has set; back to automatic choice after each _time


def _time(fns, what, errors):
    """{label: fn} -> {label: ms or None}, timed interleaved; failures go to `errors` as '<what> <label>: ...'."""
    from turbo_dist.ops import dispatcher

    def on_error(label, exc):
        errors.append(f"{what} {label}: {type(exc).__name__}: {exc}"[:400])

    try:
        return bench_interleaved(fns, rounds=ROUNDS, rep_ms=REP_MS, on_error=on_error, warm=DEVICE == "cuda")
    finally:
        for op in _FORCED_OPS:
            dispatcher.set_backend(op, None)
        _FORCED_OPS.clear()


def _forced(fn, **op_backends):
    """fn run with dispatcher backends forced ({op: backend or None for the default}). Each fn of an interleaved
    group sets every op it dispatches, so the labels do not see each other's settings; the settings stay between
    its calls (set_backend only when they differ), so a label pays per call what a user who forces a backend
    pays, not a set/restore of the dispatcher (which cleared its choice cache twice a call). _time sets them back
    to automatic afterwards. (The forced labels' lag behind `default` on the same kernel that prompted this was
    mostly the rotated timing order's neighbour bias, see common.bench_interleaved.)"""
    from turbo_dist.ops import dispatcher

    def run():
        for op, name in op_backends.items():
            if dispatcher.get_backend(op) != name:
                dispatcher.set_backend(op, name)
            _FORCED_OPS.add(op)
        return fn()
    return run


def _weights_cached(fn):
    """fn run as inside one long `ops.cache_fp8_weights()` block (the weights' FP8 copies kept across calls,
    as over the micro-batches of a step), without putting the other implementations timed beside it there."""
    from turbo_dist.ops import fp8

    store = {}

    def run():
        prev, fp8._WEIGHT_CACHE = fp8._WEIGHT_CACHE, store
        try:
            return fn()
        finally:
            fp8._WEIGHT_CACHE = prev
    return run


def _no_tma(fn):
    def run():
        from turbo_dist.kernels import gemm as kgemm

        kgemm.USE_TMA = False
        try:
            return fn()
        finally:
            kgemm.USE_TMA = True
    return run


def _no_split_tail(fn):
    def run():
        from turbo_dist.kernels import gemm_persistent as gp

        prev, gp.SPLIT_TAIL_AUTO = gp.SPLIT_TAIL_AUTO, False
        try:
            return fn()
        finally:
            gp.SPLIT_TAIL_AUTO = prev
    return run


def _tuned_configs(M, N, K):
    """The configs our GEMM tuner picked for this shape (one per candidate list it tuned: default, no split
    tail, ...), as 'BMxBNxBKxGMxWxS[xflags]'."""
    from turbo_dist.kernels import _tuner

    return sorted({"x".join(map(str, key[-1][idx])) for key, idx in _tuner._CACHE.items()
                   if key[0] == "gemm" and key[1:4] == (M, N, K)})


def run_gemm(quick, errors):
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import gemm_persistent as gp
    from turbo_dist.ops import dispatcher, gemm

    rows = []
    for name, M, N, K in GEMM_SHAPES:
        if quick and name not in GEMM_QUICK:
            continue
        M, N, K = (max(16, d // SHRINK) for d in (M, N, K))
        a = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
        w = torch.randn(N, K, device=DEVICE, dtype=DTYPE)
        fns = {"cublas": lambda: torch.mm(a, w.t()),
               "triton": _forced(lambda: gemm(a, w, trans_b=True), gemm="triton")}
        if name == "cube8192" or not quick:  # the pointer-load kernel, for comparison with the TMA one
            fns["triton_ptr"] = _no_tma(fns["triton"])
        if DEVICE == "cuda" and gp.split_tail_pays(M, N, kgemm._num_sms(a.device)):
            fns["triton_no_split_tail"] = _no_split_tail(fns["triton"])  # what the split tail wave gains
        fns["default"] = _forced(lambda: gemm(a, w, trans_b=True), gemm=None)
        res = _time(fns, f"gemm {name}", errors)
        if res["default"] is not None:
            fns["default"]()
        default_is = dispatcher.last_backend("gemm")
        extra = {"shape": f"{M}x{N}x{K}", "default_backend": default_is, "triton_configs": _tuned_configs(M, N, K),
                 **_default_fields(res, "default", default_is, {"torch": "cublas", "triton": "triton"})}
        rows += _rows_for("gemm", name, res, "cublas", 2.0 * M * N * K, "bf16", extra)
        del a, w
    return rows


def _grouped_case(G, tpe, K, N):
    tpe, K, N = (max(16, d // SHRINK) for d in (tpe, K, N))
    lens = skewed_lens(G, tpe, seed=G)
    M = int(lens.sum())
    a = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    b = torch.randn(G, K, N, device=DEVICE, dtype=DTYPE) * K ** -0.5
    dc = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    return lens, a, b, dc


def _grouped_default_backend(fns, phase):
    """The backend the default ran for this phase: the forward's, or the backward's when its dgrad and weight
    gradient ran the same one ("dgrad/wgrad" names when they differ: no single forced label matches it then)."""
    from turbo_dist.ops import dispatcher

    fns["default"]()
    dgrad = dispatcher.last_backend("grouped_gemm")
    if phase == "fwd":
        return dgrad
    wgrad = dispatcher.last_backend("grouped_gemm_wgrad")
    return dgrad if dgrad == wgrad else f"{dgrad}/{wgrad}"


def run_grouped(quick, errors):
    from turbo_dist.ops import dispatcher, grouped_wgmma

    labels = dict(GROUPED_LABELS)
    probe = torch.zeros(8, 8, device=DEVICE, dtype=DTYPE)
    if grouped_wgmma._wgmma_grouped_can(probe, probe.view(1, 8, 8), torch.tensor([8])) is True:
        labels["wgmma"] = "wgmma"  # our Hopper kernel (SM90, turbo_dist._fp8_wgmma built)
    rows = []
    for G, tpe in (GROUPED_QUICK if quick else GROUPED_CASES):
        for layer, K, N in GROUPED_LAYERS:
            lens, a, b, dc = _grouped_case(G, tpe, K, N)
            gl = lens.to(DEVICE)
            M = a.shape[0]
            tag = f"G{G}" if tpe == 1024 else f"G{G}_t{tpe}"
            fwd_fn = lambda: dispatcher.dispatch("grouped_gemm", a, b, gl, False)  # noqa: E731
            bwd_fn = lambda: (dispatcher.dispatch("grouped_gemm", dc, b, gl, True),  # noqa: E731
                              dispatcher.dispatch("grouped_gemm_wgrad", a, dc, gl, False))
            fwd_fns, bwd_fns = {}, {}
            for backend, label in [*labels.items(), (None, "default")]:
                fwd_fns[label] = _forced(fwd_fn, grouped_gemm=backend)
                bwd_fns[label] = _forced(bwd_fn, grouped_gemm=backend, grouped_gemm_wgrad=backend)
            fwd = _time(fwd_fns, f"grouped {tag} {layer} fwd", errors)
            bwd = _time(bwd_fns, f"grouped {tag} {layer} bwd", errors)
            for phase, res, mult in (("fwd", fwd, 1), ("bwd", bwd, 2)):
                dflt = _grouped_default_backend(fwd_fns if phase == "fwd" else bwd_fns, phase) \
                    if res.get("default") is not None else None
                loop = res.get("loop")
                extra = {"shape": f"G={G} M={M} K={K} N={N}", "phase": phase, "tokens_per_expert": tpe,
                         "default_backend": dflt,
                         "lens": lens.tolist() if G <= 8 else f"min {int(lens.min())} max {int(lens.max())}",
                         **_default_fields(res, "default", dflt, labels)}
                for r in _rows_for("grouped", f"{tag}_{layer}_{phase}", res, "torch_grouped_mm",
                                   mult * 2.0 * M * K * N, "bf16", extra):
                    r["x_loop"] = (loop / r["ms"]) if loop else None
                    rows.append(r)
            del a, b, dc
    return rows


def run_fp8(quick, errors):
    import bench_ops_fp8  # the FP8 sections live there (this file is long enough); it reads this module's settings

    return bench_ops_fp8.run_fp8(quick, errors)


def run_fp8_grouped(quick, errors):
    import bench_ops_fp8

    return bench_ops_fp8.run_fp8_grouped(quick, errors)


def run_overhead(quick, errors):
    """Host time per call of our entry points (input checks, dispatcher choice, launch) against the torch op
    they wrap, on operands so small that the GPU waits on the host: microseconds a training step pays per
    call when the CPU is the bottleneck (decode, small layers, many micro-batches)."""
    import statistics
    import time

    from turbo_dist import ops
    from turbo_dist.ops import dispatcher
    from turbo_dist.ops.grouped_gemm import group_offsets

    a = torch.randn(64, 128, device=DEVICE, dtype=DTYPE)
    w = torch.randn(128, 128, device=DEVICE, dtype=DTYPE)
    ga = torch.randn(256, 128, device=DEVICE, dtype=DTYPE)
    gb = torch.randn(4, 128, 128, device=DEVICE, dtype=DTYPE)
    gl = torch.tensor([64, 64, 64, 64], device=DEVICE)
    offs = group_offsets(gl, DEVICE, torch.int32)
    cases = {"gemm": {"torch.mm": lambda: torch.mm(a, w), "ops.gemm": lambda: ops.gemm(a, w)},
             "grouped_gemm": {"ops.grouped_gemm": lambda: ops.grouped_gemm(ga, gb, gl)}}
    if DEVICE == "cuda" and hasattr(torch, "_grouped_mm"):
        cases["grouped_gemm"]["torch._grouped_mm"] = lambda: torch._grouped_mm(ga, gb, offs=offs)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    calls = 200 if DEVICE == "cpu" else 2000
    rows = []
    for case, fns in cases.items():
        samples = {k: [] for k in fns}
        try:
            for fn in fns.values():  # compile / tune / fill caches
                for _ in range(20):
                    fn()
            for _ in range(max(ROUNDS, 3)):
                for label, fn in fns.items():
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    sync()
                    samples[label].append((time.perf_counter() - t0) / calls * 1e6)
        except Exception as exc:  # noqa: BLE001 -- reported, the other sections still run
            errors.append(f"overhead {case}: {type(exc).__name__}: {exc}"[:400])
            continue
        fns[next(k for k in fns if k.startswith("ops."))]()
        base_label = next(k for k in fns if not k.startswith("ops."))  if len(fns) > 1 else None
        base = statistics.median(samples[base_label]) if base_label else None
        for label, ts in samples.items():
            us = statistics.median(ts)
            rows.append({"section": "overhead", "case": case, "impl": label, "host_us": us, "baseline": base_label,
                         "x_baseline": (base / us) if base else None,
                         "default_backend": dispatcher.last_backend(case) if label.startswith("ops.") else None})
    return rows


SECTIONS = {"gemm": run_gemm, "grouped": run_grouped, "fp8": run_fp8, "fp8_grouped": run_fp8_grouped,
            "overhead": run_overhead}
COLS = ["section", "case", "impl", "ms", "host_us", "tflops", "x_baseline", "baseline", "frac_peak", "default_backend",
        "default_vs_best", "choice_vs_best", "x_loop"]


def main(argv=None):
    global DEVICE, DTYPE, SHRINK, ROUNDS, REP_MS
    sys.modules.setdefault("bench_ops", sys.modules[__name__])  # run as a script: bench_ops_fp8 reads these globals
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write rows + machine info here (rewritten after each section)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (CI / smoke)")
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, sizes / 64: checks the script only")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {sorted(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds per case")
    p.add_argument("--rep-ms", type=float, default=REP_MS, help="do_bench repetition budget per round")
    args = p.parse_args(argv)
    ROUNDS, REP_MS = args.rounds, args.rep_ms
    if args.dry_run:
        DEVICE, DTYPE, SHRINK = "cpu", torch.float32, 64
        ROUNDS, REP_MS = 1, min(REP_MS, 1.0)  # the interpreter is slow: one round checks the script
    elif not torch.cuda.is_available():
        print("bench_ops: CUDA is not available; nothing to measure (this bench needs a GPU).")
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    torch.manual_seed(0)
    if DEVICE == "cuda":
        PEAK.update({k: peak_tflops(k) for k in ("bf16", "fp8")})
    rows, errors = [], []
    meta = {"quick": args.quick, "peak_tflops": dict(PEAK), "errors": errors, "rounds": ROUNDS, "rep_ms": REP_MS}
    print(f"# bench_ops on {machine_info().get('gpu')}", flush=True)
    for s in sections:
        new = SECTIONS[s](args.quick, errors)
        rows += new
        print(f"\n## {s}")
        print_table(new, [c for c in COLS if any(c in r for r in new)])
        if args.json:
            write_json(args.json, rows, dict(meta))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if errors:
        print("\n## backends that could not run a case")
        for e in errors:
            print(" -", e)
    if args.json:
        write_json(args.json, rows, dict(meta))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
