"""Time every candidate tile config of our Triton GEMMs, one forced config at a time (no autotune), each checked
against PyTorch, to decide which configs go first in kernels/gemm.py and kernels/grouped_gemm.py.

    python benchmarks/tune_ops.py --json benchmarks/results/tune_ops_h200.json [--cases ...] [--rep-ms 25]
    TRITON_INTERPRET=1 python benchmarks/tune_ops.py --dry-run      # CPU, tiny sizes: checks the script only

Cases (one GPU): bf16 GEMM C = A @ W^T (nn.Linear layout, the TMA kernel) at cube4096, dsv3_qkv_a
(8192x2112x7168) and cube8192, against torch.mm (cuBLAS); blockwise FP8 (1x128 activations, 128x128 weights)
at 8192^3 against bf16 cuBLAS and rowwise torch._scaled_mm; blockwise FP8 grouped GEMM on the DeepSeek-V3 fc1
shape (8 experts, 1024 tokens each on average, skewed) against bf16 torch._grouped_mm; on the same shape the
rowwise FP8 and the bf16 grouped GEMM, each module list followed by its TWO_PER_SM variants (two programs per SM);
the bf16 grouped GEMM forward also at 32 experts x ~256 / ~128 tokens, fc1 and fc2 (grouped_bf16_G32_t256_fc1, ...),
where issue 3 asks for >= 1.3x a per-expert loop (`bf16_loop_mm`, torch.mm per expert over host-side splits); the grouped backward's halves
(grouped_wgrad_*: dB = A^T dC per expert, the TMA kernel's configs against the pointer kernel, torch._grouped_mm
and the loop; grouped_dgrad_*: dA = dC B^T per expert) on fc1 and fc2 at 32 x ~128 / ~256 and 8 x ~1024 tokens.

For each case: every candidate (the module's config list, then extra candidates) is compiled, run once and
compared with the reference (relative Frobenius error; `ok` = below the case's tolerance), then timed with
do_bench (rep --rep-ms); the baselines and the autotuned default are timed alongside; finally the top
--final-top candidates and the baselines are re-timed interleaved (--rounds rounds, common.bench_interleaved),
which is the number to rank by: `ms`, `rank` and the x_<baseline> ratio come from those rounds only (`final`
rows); the other rows keep `ms_single` (the first pass, each timed alone: not comparable with `ms`) and have
`ms` / `rank` None. A config that fails to compile or run (e.g. too much shared memory) is a row with `error`,
not a crash. The JSON is rewritten after each case.
--dry-run: CPU under TRITON_INTERPRET=1, sizes / 32, fp16 instead of bf16 (the interpreter mishandles bf16;
fp16 keeps the 2-byte TMA kernel path that the GPU run tunes, fp32 would take the pointer kernel).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench, bench_interleaved, machine_info, print_table, write_json  # noqa: E402
from tune_candidates import (EXTRA_16, EXTRA_BLOCK, EXTRA_EDGE_16, EXTRA_GROUPED_16, EXTRA_GROUPED_BLOCK,  # noqa: E402
                             EXTRA_WGRAD)

GEMM_CASES = [("cube4096", 4096, 4096, 4096), ("dsv3_qkv_a", 8192, 2112, 7168), ("cube8192", 8192, 8192, 8192)]
# the grouped GEMM's backward on DeepSeek-V3 experts: (case, kind, experts, tokens per expert, layer)
GROUPED_BWD_CASES = [(f"grouped_{kind}_G{G}{'' if tpe == 1024 else f'_t{tpe}'}_{layer}", kind, G, tpe, layer)
                     for kind in ("wgrad", "dgrad") for layer in ("fc1", "fc2")
                     for G, tpe in ((32, 128), (32, 256), (8, 1024), (32, 1024))]
# the bf16 grouped forward: (case, experts, tokens per expert, layer)
GROUPED_FWD_CASES = [(f"grouped_bf16_G{G}{'' if tpe == 1024 else f'_t{tpe}'}_{layer}", G, tpe, layer)
                     for layer in ("fc1", "fc2") for G, tpe in ((8, 1024), (32, 256), (32, 128))]
CASES = [c[0] for c in GEMM_CASES] + ["fp8_block_8192", "fp8_grouped_block_G8_fc1", "fp8_grouped_row_G8_fc1"] + [
    c[0] for c in GROUPED_FWD_CASES] + [c[0] for c in GROUPED_BWD_CASES]


def _two_per_sm(configs):
    """The TWO_PER_SM variant (6th entry 4) of each plain 5-entry config (kernels/grouped_gemm.py)."""
    return [(*c[:5], 4) for c in configs if len(c) == 5]


DEVICE, DTYPE, SHRINK, DRY = "cuda", torch.bfloat16, 1, False


def _uniq(rows):
    out = []
    for r in rows:
        if tuple(r) not in out:
            out.append(tuple(r))
    return out


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _time_one(fn, rep_ms):
    if DRY:  # the interpreter: one call checks the path; its time means nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return bench(fn, warmup_ms=10, rep_ms=rep_ms)


def tune_case(case, flops, ref, tol, baselines, default_fn, candidates, run, args, source):
    """candidates: [config]; run(config) -> output; baselines: {label: fn}; default_fn: the autotuned launcher."""
    rows, fns = [], {}
    t_case = time.perf_counter()
    for label, fn in baselines.items():
        fns[label] = fn
        rows.append({"case": case, "kind": "baseline", "impl": label, "ms_single": _time_one(fn, args.rep_ms)})
    if args.candidates:
        candidates = [tuple(int(v) for v in c.split("x")) for c in args.candidates.split(",") if c.strip()]
    for cfg in candidates:
        t_cfg = time.perf_counter()
        row = {"case": case, "kind": "config", "impl": "x".join(map(str, cfg)), "config": list(cfg),
               "in_module_list": cfg in source}
        try:
            out = run(cfg)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            err = rel_err(out, ref)
            row.update(rel_err=err, ok=err < tol)
            fn = (lambda c=cfg: run(c))
            row["ms_single"] = _time_one(fn, args.rep_ms)
            if row["ok"]:
                fns[row["impl"]] = fn
        except Exception as exc:  # too much shared memory, a compile error: a row, not a crash
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        print(f"  {case} {row['impl']}: ms_single {row.get('ms_single')}, rel_err {row.get('rel_err')}, "
              f"{row.get('error', 'ok' if row.get('ok') else 'WRONG')} ({time.perf_counter() - t_cfg:.1f} s)", flush=True)
    row = {"case": case, "kind": "autotuned", "impl": "default (autotune)"}
    try:
        err = rel_err(default_fn(), ref)
        row.update(rel_err=err, ok=err < tol, ms_single=_time_one(default_fn, args.rep_ms))
        fns[row["impl"]] = default_fn
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    rows.append(row)
    # re-time the best few candidates with the baselines and the autotuned default, interleaved
    timed = sorted((r for r in rows if r["kind"] == "config" and r.get("ok") and r.get("ms_single")),
                   key=lambda r: r["ms_single"])
    final = [r["impl"] for r in timed[:args.final_top]] + list(baselines) + (
        ["default (autotune)"] if "default (autotune)" in fns else [])
    if DRY:
        res = {k: next(r["ms_single"] for r in rows if r["impl"] == k) for k in final}
    else:
        res = bench_interleaved({k: fns[k] for k in final}, rounds=args.rounds, rep_ms=args.rep_ms)
    first_base = next(iter(baselines))
    base = res.get(first_base)
    for r in rows:
        # ranks and ratios from the interleaved rounds only: a first-pass time (timed alone, minutes earlier, the
        # clock elsewhere) ranked among them would compare two measurements, not two configs
        r["final"] = r["impl"] in res
        r["ms"] = res.get(r["impl"]) if r["final"] else None
        r["tflops"] = (flops / r["ms"] / 1e9) if r["ms"] else None
        r["x_" + first_base] = (base / r["ms"]) if base and r["ms"] else None
    rows.sort(key=lambda r: (r["ms"] is None, r["ms"] or 0, r.get("ms_single") is None, r.get("ms_single") or 0))
    for i, r in enumerate(rows):
        r["rank"] = (i + 1) if r["ms"] else None
    print(f"\n## {case}  ({time.perf_counter() - t_case:.1f} s)")
    print_table(rows, ["rank", "kind", "impl", "ms", "ms_single", "tflops", "x_" + first_base, "ok", "rel_err",
                       "in_module_list", "final", "error"])
    return rows


def gemm_cases(names, args):
    from turbo_dist.kernels import gemm as kgemm

    for name, M, N, K in GEMM_CASES:
        if name not in names:
            continue
        M, N, K = (max(16, d // SHRINK) for d in (M, N, K))
        # the narrow-edge configs (7th entry 32) where N leaves a narrow last tile column, as the tuner has them
        edge = [(*c, kgemm.NARROW_EDGE) for c in kgemm.CONFIGS_EDGE_16 if kgemm.edge_n(N, c[1])]
        source = [tuple(c) for c in kgemm.CONFIGS_16] + edge
        cands = _uniq(source + EXTRA_16 + [(*c, kgemm.NARROW_EDGE) for c in EXTRA_EDGE_16 if kgemm.edge_n(N, c[1])])
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(M, K, generator=g).to(DEVICE, DTYPE)
        w = torch.randn(N, K, generator=g).to(DEVICE, DTYPE)
        ref = (a.float() @ w.float().t()) if DRY else torch.mm(a, w.t())
        baselines = {"cublas": lambda: torch.mm(a, w.t())}
        yield tune_case(name, 2.0 * M * N * K, ref, 2e-2, baselines, lambda: kgemm.gemm(a, w.t()), cands,
                        lambda cfg: kgemm.gemm(a, w.t(), config=cfg), args, source)


def fp8_block_case(args):
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.ops import ScalingGranularity, quantize_fp8
    from turbo_dist.ops.fp8 import _reference_scaled_mm, _torch_blockwise_supported, _torch_scaled_mm

    B, R = ScalingGranularity.BLOCKWISE, ScalingGranularity.ROWWISE
    E4M3 = torch.float8_e4m3fn
    M = N = K = max(128, 8192 // SHRINK)
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(M, K, generator=g).to(DEVICE, DTYPE)
    w = torch.randn(N, K, generator=g).to(DEVICE, DTYPE)
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    ref = _reference_scaled_mm(aq, wq.t(), sa, sw.t(), "block", torch.float32)
    baselines = {"bf16_cublas": lambda: torch.mm(a, w.t())}
    if not DRY:
        aq_r, sa_r = quantize_fp8(a, E4M3, R)
        wq_r, sw_r = quantize_fp8(w, E4M3, R, weight=True)
        baselines["rowwise_torch_scaled_mm"] = lambda: torch._scaled_mm(
            aq_r, wq_r.t(), sa_r, sw_r.t(), out_dtype=torch.bfloat16)
        ok, why = _torch_blockwise_supported(aq.device)
        if ok:  # cuBLASLt's own 1x128 x 128x128 kernel through torch._scaled_mm
            baselines["blockwise_torch_scaled_mm"] = lambda: _torch_scaled_mm(aq, wq.t(), sa, sw.t(), "block",
                                                                              torch.bfloat16)
        else:
            print(f"no blockwise torch._scaled_mm baseline: {why}")
    source = [tuple(c) for c in kgemm.CONFIGS_BLOCK]
    out_dtype = torch.bfloat16 if not DRY else torch.float32
    run = lambda cfg: kgemm.scaled_gemm(aq, wq.t(), sa, sw.t(), kgemm.SCALE_BLOCK, out_dtype=out_dtype,  # noqa
                                        config=cfg)
    return tune_case("fp8_block_8192", 2.0 * M * N * K, ref, 2e-2, baselines, lambda: run(None),
                     _uniq(source + EXTRA_BLOCK), run, args, source)


def _fc1_experts(G=8, tokens_per_expert=1024, layer="fc1"):
    """DeepSeek-V3 fc1 experts (K 7168, N 4096; "fc2": K 2048, N 7168), G of them, skewed token counts
    (~tokens_per_expert each; bench_ops' split): (lens, a [M, K], b_t [G, N, K])."""
    from bench_ops import skewed_lens

    K, N = (7168, 4096) if layer == "fc1" else (2048, 7168)
    tpe, K, N = max(16, tokens_per_expert // SHRINK), max(128, K // SHRINK), max(128, N // SHRINK)
    lens = skewed_lens(G, tpe, seed=G)
    g = torch.Generator(device="cpu").manual_seed(2)
    a = torch.randn(int(lens.sum()), K, generator=g).to(DEVICE, DTYPE)
    b_t = (torch.randn(G, N, K, generator=g) * K ** -0.5).to(DEVICE, DTYPE)
    return lens, a, b_t


def _grouped_mm_baseline(a, b, offs):
    """bf16 torch._grouped_mm on a and b as it takes them (a [M, K] with b [G, K, N]; or a^T [K, M] with dC
    [M, N], the weight gradient) at the group end offsets offs (int64 on the device)."""
    offs32 = offs.to(torch.int32)
    return lambda: torch._grouped_mm(a, b, offs=offs32, out_dtype=torch.bfloat16)


def _splits(offs):
    """[(start, end)] row range per group from the end offsets (host-side, for the per-expert loops)."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def fp8_grouped_block_case(args):
    from turbo_dist.kernels import fp8_gemm, grouped_gemm as kgg
    from turbo_dist.ops import ScalingGranularity, quantize_fp8
    from turbo_dist.ops.fp8_grouped import _reference_grouped_scaled

    B = ScalingGranularity.BLOCKWISE
    E4M3 = torch.float8_e4m3fn
    lens, a, b_t = _fc1_experts()
    M, K, N = a.shape[0], a.shape[1], b_t.shape[1]
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(b_t, E4M3, B, weight=True)
    sw = sw.transpose(1, 2)  # [G, K/128, N/128]
    gl = lens.to(DEVICE)
    offs = torch.cumsum(gl, 0)
    ref = _reference_grouped_scaled(aq, wq.transpose(1, 2), sa, sw, lens, "block", torch.float32)
    baselines = {}
    if not DRY:
        baselines["bf16_torch_grouped_mm"] = _grouped_mm_baseline(a, b_t.transpose(1, 2), offs)
        # the cuBLASLt-per-group backend (torch_loop) on the same counts, when this torch/cuBLAS and these
        # counts (host, multiples of the probed row alignment) allow it
        from turbo_dist.ops.fp8_grouped import _torch_loop_grouped_scaled, _torch_loop_grouped_scaled_can

        loop_args = (aq, wq.transpose(1, 2), sa, sw, lens, "block", torch.bfloat16)
        ok = _torch_loop_grouped_scaled_can(*loop_args)
        if ok is True:
            print(f"blockwise cuBLAS loop baseline: relative error "
                  f"{rel_err(_torch_loop_grouped_scaled(*loop_args), ref):.3g}")
            baselines["blockwise_cublas_loop"] = lambda: _torch_loop_grouped_scaled(*loop_args)
        else:
            print(f"no blockwise cuBLAS loop baseline: {ok}")
    else:
        baselines["fp32_loop"] = lambda: _reference_grouped_scaled(aq, wq.transpose(1, 2), sa, sw, lens, "block",
                                                                   torch.float32)
    source = [tuple(c) for c in kgg.CONFIGS_BLOCK]
    out_dtype = torch.bfloat16 if not DRY else torch.float32
    run = lambda cfg: fp8_gemm.grouped_scaled_mm(aq, wq.transpose(1, 2), sa, sw, offs, fp8_gemm.SCALE_BLOCK,  # noqa
                                                 out_dtype=out_dtype, config=cfg)
    return tune_case("fp8_grouped_block_G8_fc1", 2.0 * M * K * N, ref, 2e-2, baselines, lambda: run(None),
                     _uniq(source + EXTRA_GROUPED_BLOCK), run, args, source)


def grouped_bf16_case(args, name="grouped_bf16_G8_fc1", G=8, tokens_per_expert=1024, layer="fc1"):
    """bf16 grouped GEMM (kernels/grouped_gemm.py CONFIGS_16, their TWO_PER_SM variants, EXTRA_GROUPED_16) vs
    torch._grouped_mm and a per-expert torch.mm loop over host-side splits (issue 3's "per-group loop")."""
    from turbo_dist.kernels import grouped_gemm as kgg

    lens, a, b_t = _fc1_experts(G, tokens_per_expert, layer)
    M, K, N = a.shape[0], a.shape[1], b_t.shape[1]
    offs = torch.cumsum(lens.to(DEVICE), 0)
    b = b_t.transpose(1, 2)  # [G, K, N] view
    splits = _splits(offs)

    def fp32_loop():
        return torch.cat([a[s:e].float() @ b[g].float() for g, (s, e) in enumerate(splits)])
    ref = fp32_loop()
    baselines = {}
    if not DRY:
        baselines["bf16_torch_grouped_mm"] = _grouped_mm_baseline(a, b, offs)
        baselines["bf16_loop_mm"] = lambda: [torch.mm(a[s:e], b[g]) for g, (s, e) in enumerate(splits)]
    else:
        baselines["fp32_loop"] = fp32_loop
    source = [tuple(c) for c in kgg.CONFIGS_16]
    run = lambda cfg: kgg.grouped_gemm(a, b, offs, config=cfg)  # noqa: E731
    return tune_case(name, 2.0 * M * K * N, ref, 2e-2, baselines, lambda: run(None),
                     _uniq(source + _two_per_sm(source) + EXTRA_GROUPED_16), run, args, source)


def grouped_bwd_case(args, name, kind, G, tokens_per_expert, layer):
    """The bf16 grouped GEMM's backward halves on fc1 / fc2 experts (weights b [G, K, N] as bench_ops' grouped
    section): kind "wgrad", dB[g] = a_g^T dC_g (kernels/grouped_wgrad.grouped_wgrad: the TMA kernel's configs,
    the pointer kernel as a baseline), or "dgrad", dA = dC b^T per group (the forward kernel, b transposed).
    Baselines: torch._grouped_mm and a per-expert torch.mm loop over host-side splits."""
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import grouped_gemm as kgg
    from turbo_dist.kernels import grouped_wgrad as kgw

    lens, a, b_t = _fc1_experts(G, tokens_per_expert, layer)
    M, K, N = a.shape[0], a.shape[1], b_t.shape[1]
    b = b_t.transpose(1, 2).contiguous()  # [G, K, N]
    g = torch.Generator(device="cpu").manual_seed(3)
    dc = torch.randn(M, N, generator=g).to(DEVICE, DTYPE)
    offs = torch.cumsum(lens.to(DEVICE), 0)
    splits = _splits(offs)
    baselines = {}
    if kind == "wgrad":
        def fp32_loop():
            return torch.stack([a[s:e].float().t() @ dc[s:e].float() for s, e in splits])

        def pointer():  # the pointer kernel (tuned on its first call)
            prev, kgemm.USE_TMA = kgemm.USE_TMA, False
            try:
                return kgw.grouped_wgrad(a, dc, offs, G)
            finally:
                kgemm.USE_TMA = prev

        if not DRY:
            baselines["bf16_torch_grouped_mm"] = _grouped_mm_baseline(a.t(), dc, offs)
            baselines["bf16_loop_mm"] = lambda: [torch.mm(a[s:e].t(), dc[s:e]) for s, e in splits]
        else:
            baselines["fp32_loop"] = fp32_loop
        baselines["triton_pointer"] = pointer
        source = [tuple(c) for c in kgw.CONFIGS_WGRAD_TMA]
        run = lambda cfg: kgw.grouped_wgrad(a, dc, offs, G, config=cfg)  # noqa: E731
        cands = _uniq(source + EXTRA_WGRAD)
    else:
        def fp32_loop():
            return torch.cat([dc[s:e].float() @ b[i].float().t() for i, (s, e) in enumerate(splits)])

        if not DRY:
            baselines["bf16_torch_grouped_mm"] = _grouped_mm_baseline(dc, b.transpose(1, 2), offs)
            baselines["bf16_loop_mm"] = lambda: [torch.mm(dc[s:e], b[i].t()) for i, (s, e) in enumerate(splits)]
        else:
            baselines["fp32_loop"] = fp32_loop
        source = [tuple(c) for c in kgg.CONFIGS_16]
        run = lambda cfg: kgg.grouped_gemm(dc, b.transpose(1, 2), offs, config=cfg)  # noqa: E731
        cands = _uniq(source + EXTRA_GROUPED_16)
    ref = fp32_loop()
    return tune_case(name, 2.0 * M * K * N, ref, 2e-2, baselines, lambda: run(None), cands, run, args, source)


def fp8_grouped_row_case(args):
    """Rowwise FP8 grouped GEMM (CONFIGS_8 and their TWO_PER_SM variants) vs bf16 torch._grouped_mm."""
    from turbo_dist.kernels import fp8_gemm, grouped_gemm as kgg
    from turbo_dist.ops import ScalingGranularity, quantize_fp8
    from turbo_dist.ops.fp8_grouped import _reference_grouped_scaled

    R = ScalingGranularity.ROWWISE
    lens, a, b_t = _fc1_experts()
    G, M, K, N = b_t.shape[0], a.shape[0], a.shape[1], b_t.shape[1]
    aq, sa = quantize_fp8(a, torch.float8_e4m3fn, R)
    wq, sw = quantize_fp8(b_t, torch.float8_e4m3fn, R, weight=True)
    sw = sw.reshape(G, -1)
    offs = torch.cumsum(lens.to(DEVICE), 0)
    ref = _reference_grouped_scaled(aq, wq.transpose(1, 2), sa, sw, lens, "row", torch.float32)
    baselines = {}
    if not DRY:
        baselines["bf16_torch_grouped_mm"] = _grouped_mm_baseline(a, b_t.transpose(1, 2), offs)
    else:
        baselines["fp32_loop"] = lambda: _reference_grouped_scaled(aq, wq.transpose(1, 2), sa, sw, lens, "row",
                                                                   torch.float32)
    source = [tuple(c) for c in kgg.CONFIGS_8]
    out_dtype = torch.bfloat16 if not DRY else torch.float32
    run = lambda cfg: fp8_gemm.grouped_scaled_mm(aq, wq.transpose(1, 2), sa, sw, offs, fp8_gemm.SCALE_ROW,  # noqa
                                                 out_dtype=out_dtype, config=cfg)
    return tune_case("fp8_grouped_row_G8_fc1", 2.0 * M * K * N, ref, 2e-2, baselines, lambda: run(None),
                     _uniq(source + _two_per_sm(source)), run, args, source)


def main(argv=None):
    global DEVICE, DTYPE, SHRINK, DRY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write rows + machine info here (rewritten after each case)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    p.add_argument("--rep-ms", type=float, default=25.0, help="do_bench repetition budget per timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the final re-timing")
    p.add_argument("--final-top", type=int, default=4, help="candidates re-timed interleaved with the baselines")
    p.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes")
    p.add_argument("--candidates", default="", help="only these configs, e.g. 128x128x128x8x4,128x128x128x8x4x1 "
                   "(the case's tuple layout; default: the module list then the extras)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {CASES}")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        DEVICE, DTYPE, SHRINK, DRY = "cpu", torch.float16, 32, True
    elif not torch.cuda.is_available():
        print("tune_ops: CUDA is not available; nothing to tune (use --dry-run under TRITON_INTERPRET=1).")
        return 0
    t0 = time.perf_counter()
    rows = []
    meta = {"rep_ms": args.rep_ms, "rounds": args.rounds, "final_top": args.final_top, "dry_run": DRY}
    print(f"# tune_ops on {machine_info().get('gpu') or 'CPU (interpreter)'}", flush=True)

    def done(new):
        rows.extend(new)
        if args.json:
            meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
            write_json(args.json, rows, dict(meta))

    for case_rows in gemm_cases(names, args):
        done(case_rows)
    if "fp8_block_8192" in names:
        done(fp8_block_case(args))
    if "fp8_grouped_block_G8_fc1" in names:
        done(fp8_grouped_block_case(args))
    if "fp8_grouped_row_G8_fc1" in names:
        done(fp8_grouped_row_case(args))
    for case, G, tpe, layer in GROUPED_FWD_CASES:
        if case in names:
            done(grouped_bf16_case(args, case, G, tpe, layer))
    for case, kind, G, tpe, layer in GROUPED_BWD_CASES:
        if case in names:
            done(grouped_bwd_case(args, case, kind, G, tpe, layer))
    print("\n## best config per case (rank by ms, correct results only)")
    best = []
    for case in names:
        cand = [r for r in rows if r["case"] == case and r["kind"] == "config" and r.get("ok") and r.get("ms")]
        base = [r for r in rows if r["case"] == case and r["kind"] != "config" and r.get("ms")]
        if cand:
            c = min(cand, key=lambda r: r["ms"])
            best.append({"case": case, "best_config": c["impl"], "ms": c["ms"], "in_module_list": c["in_module_list"],
                         **{f"{r['impl']}_ms": r["ms"] for r in base}})
    print_table(best)
    meta["best"] = best
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        done([])
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
