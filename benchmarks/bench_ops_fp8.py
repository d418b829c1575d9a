"""The FP8 sections of benchmarks/bench_ops.py (`--sections fp8,fp8_grouped`; see its docstring for what they
measure). Not a script: bench_ops.py imports it while it runs and this module reads bench_ops' settings and
helpers at call time (`B.DEVICE` etc., which --dry-run changes)."""
import torch

import bench_ops as B


def run_fp8(quick, errors):
    from turbo_dist.ops import (Float8QuantConfig, ScalingGranularity, dispatcher, gemm_fp8, quantize_fp8,
                                scaled_mm)

    rows = []
    E4M3 = torch.float8_e4m3fn
    M = N = K = max(128, 8192 // B.SHRINK)
    flops = 2.0 * M * N * K
    a = torch.randn(M, K, device=B.DEVICE, dtype=B.DTYPE)
    w = torch.randn(N, K, device=B.DEVICE, dtype=B.DTYPE)
    grans = (ScalingGranularity.ROWWISE, ScalingGranularity.BLOCKWISE) if quick else tuple(ScalingGranularity)
    for gran in grans:
        aq, sa = quantize_fp8(a, E4M3, gran)
        wq, sw = quantize_fp8(w, E4M3, gran, weight=True)
        mm = lambda: scaled_mm(aq, wq.t(), sa, sw.t(), granularity=gran)  # noqa: E731
        cfg = Float8QuantConfig(granularity=gran)
        fns = {"bf16_cublas": lambda: torch.mm(a, w.t()),
               "mm_torch": B._forced(mm, scaled_mm="torch"), "mm_triton": B._forced(mm, scaled_mm="triton"),
               "mm_default": B._forced(mm, scaled_mm=None),
               "e2e_gemm_fp8": B._forced(lambda: gemm_fp8(a, w, trans_b=True, config=cfg), scaled_mm=None),
               "e2e_weights_cached": B._weights_cached(B._forced(lambda: gemm_fp8(a, w, trans_b=True, config=cfg),
                                                                 scaled_mm=None)),
               "quant_a": lambda: quantize_fp8(a, E4M3, gran)}
        res = B._time(fns, f"fp8 {gran.name}", errors)
        case = f"8192^3 {gran.name}"
        # each granularity's group times bf16 cuBLAS again and its rows divide by that time, so each group gets
        # its own baseline row (one row for all groups recorded only the first group's time: the others' ratios
        # then divided by a baseline the JSON did not hold)
        base = res.pop("bf16_cublas")
        rows += B._rows_for("fp8", case, {"bf16_cublas": base}, "bf16_cublas", flops, "bf16",
                            {"granularity": gran.name})
        dflt = None
        if res["mm_default"] is not None:
            fns["mm_default"]()
            dflt = dispatcher.last_backend("scaled_mm")
        extra = {"granularity": gran.name, "default_backend": dflt, "quant_a_ms": res.pop("quant_a"),
                 **B._default_fields(res, "mm_default", dflt, {"torch": "mm_torch", "triton": "mm_triton"})}
        for r in B._rows_for("fp8", case, res, "-", flops, "fp8", extra):
            r["x_baseline"] = (base / r["ms"]) if base else None
            r["baseline"] = "bf16_cublas"
            r["baseline_ms"] = base
            rows.append(r)
        del aq, wq
    return rows


def _bf16_grouped_fns(a, b_t, lens):
    """The bf16 grouped GEMM baselines on these counts (torch._grouped_mm and our Triton), timed interleaved with
    the FP8 implementations (alone, one after the other, the same bf16 kernel timed up to ~15% slower on H200)."""
    from turbo_dist.ops import dispatcher

    bf16_fn = lambda: dispatcher.dispatch("grouped_gemm", a, b_t, lens, True)  # noqa: E731
    return {"bf16_torch": B._forced(bf16_fn, grouped_gemm="torch"),
            "bf16_triton": B._forced(bf16_fn, grouped_gemm="triton")}


def _fp8_grouped_rows(case, fns, base_fns, flops, extra, errors):
    """Time the FP8 implementations `fns` ("mm_<backend>", "mm_default", "e2e_...") interleaved with the bf16
    baselines `base_fns`, note what the default ran and how it compares with the best forced backend; rows with
    ratios against the faster bf16 baseline (its own row first)."""
    from turbo_dist.ops import dispatcher

    res = B._time(dict(base_fns, **fns), f"fp8_grouped {case}", errors)
    bf16 = {k: res.pop(k) for k in base_fns}
    timed = {k: v for k, v in bf16.items() if v}
    if not timed:
        return []
    label = min(timed, key=timed.get)
    base = (label, timed[label])
    base_rows = B._rows_for("fp8_grouped", case, {label: timed[label]}, label, flops, "bf16")
    dflt = None
    if res["mm_default"] is not None:
        fns["mm_default"]()
        dflt = dispatcher.last_backend("grouped_scaled_mm")
    label_of = {k[3:]: k for k in res if k.startswith("mm_") and k != "mm_default"}
    extra = dict(extra, default_backend=dflt, **B._default_fields(res, "mm_default", dflt, label_of))
    rows = base_rows
    for r in B._rows_for("fp8_grouped", case, res, "-", flops, "fp8", extra):
        r["x_baseline"] = base[1] / r["ms"]
        r["baseline"] = base[0]
        r["baseline_ms"] = base[1]
        rows.append(r)
    return rows


def _fp8_grouped_fns(aq, wq, sa, sw, lens, mode, a, b_t, gran, backends):
    from turbo_dist.ops import Float8QuantConfig, dispatcher, grouped_gemm_fp8

    mm = lambda: dispatcher.dispatch("grouped_scaled_mm", aq, wq.transpose(1, 2), sa, sw, lens, mode,  # noqa: E731
                                     torch.bfloat16)
    cfg = Float8QuantConfig(granularity=gran)
    fns = {f"mm_{name}": B._forced(mm, grouped_scaled_mm=name) for name in backends}
    fns["mm_default"] = B._forced(mm, grouped_scaled_mm=None)
    fns["e2e_grouped_gemm_fp8"] = B._forced(lambda: grouped_gemm_fp8(a, b_t, lens, trans_b=True, config=cfg),
                                            grouped_scaled_mm=None)
    fns["e2e_weights_cached"] = B._weights_cached(fns["e2e_grouped_gemm_fp8"])
    return fns


def run_fp8_grouped(quick, errors):
    from turbo_dist.ops import ScalingGranularity, quantize_fp8

    rows = []
    E4M3 = torch.float8_e4m3fn
    layer, K, N = B.GROUPED_LAYERS[0]
    for G in ((8,) if quick else (8, 32)):
        lens, a, b, _ = B._grouped_case(G, 1024, K, N)
        gl = lens.to(B.DEVICE)
        M = a.shape[0]
        b_t = b.transpose(1, 2).contiguous()  # [G, N, K]: the weight as nn.Linear stores it
        k_, n_ = a.shape[1], b_t.shape[1]  # shrunk under --dry-run (K, N stay the layer's)
        flops = 2.0 * M * k_ * n_
        base_fns = _bf16_grouped_fns(a, b_t, gl)
        grans = (ScalingGranularity.ROWWISE, ScalingGranularity.BLOCKWISE) if quick else tuple(ScalingGranularity)
        for gran in grans:
            aq, sa = quantize_fp8(a, E4M3, gran)
            wq, sw = quantize_fp8(b_t, E4M3, gran, weight=True)
            mode = {"TENSORWISE": "tensor", "ROWWISE": "row", "BLOCKWISE": "block"}[gran.name]
            if gran == ScalingGranularity.ROWWISE:
                sw = sw.reshape(G, -1)
            elif gran == ScalingGranularity.BLOCKWISE:
                sw = sw.transpose(1, 2)
            backends = ("torch", "triton") + (_wgmma() if gran == ScalingGranularity.BLOCKWISE else ())
            fns = _fp8_grouped_fns(aq, wq, sa, sw, gl, mode, a, b_t, gran, backends)
            rows += _fp8_grouped_rows(f"G{G}_{layer} {gran.name}", fns, base_fns, flops,
                                      {"granularity": gran.name, "shape": f"G={G} M={M} K={k_} N={n_}"}, errors)
            del aq, wq
        rows += _fp8_grouped_block_aligned(G, layer, lens, a, b_t, errors)
        del a, b, b_t
    return rows


def _wgmma():
    """("wgmma",) where our Hopper kernel (turbo_dist._fp8_wgmma) was built and the GPU is an SM90, else ()."""
    if B.DEVICE != "cuda" or torch.cuda.get_device_capability() != (9, 0):
        return ()
    from turbo_dist.ops import fp8_wgmma

    return ("wgmma",) if fp8_wgmma.wgmma_module() is not None else ()


def _fp8_grouped_block_aligned(G, layer, lens, a, b_t, errors, align=128):
    """BLOCKWISE FP8 grouped GEMM with host token counts aligned to 128 (what FP8 MoE training pads to): here
    cuBLASLt's blockwise GEMM can run per group (backends cublaslt, torch_loop) beside our Triton kernel; bf16 grouped
    GEMM on the same counts is the baseline."""
    from turbo_dist.ops import ScalingGranularity, quantize_fp8

    gran = ScalingGranularity.BLOCKWISE
    lens_h = B.aligned_lens(lens, max(1, align // B.SHRINK))
    if int(lens_h.sum()) != a.shape[0]:
        return []
    M, K = a.shape
    N = b_t.shape[1]
    flops = 2.0 * M * K * N
    case = f"G{G}_{layer} BLOCKWISE lens%{align}==0 host"
    lens_d = lens_h.to(a.device)
    aq, sa = quantize_fp8(a, torch.float8_e4m3fn, gran)
    wq, sw = quantize_fp8(b_t, torch.float8_e4m3fn, gran, weight=True)
    backends = ("triton",)
    if B.DEVICE == "cuda":  # cuBLASLt per group: torch_loop, and cublaslt where turbo_dist._cublaslt was built
        from turbo_dist.ops import fp8_grouped

        backends = (("cublaslt",) if fp8_grouped.native_module() is not None else ()) + ("torch_loop", "triton")
        backends += _wgmma()
    fns = _fp8_grouped_fns(aq, wq, sa, sw.transpose(1, 2), lens_h, "block", a, b_t, gran, backends)
    return _fp8_grouped_rows(case, fns, _bf16_grouped_fns(a, b_t, lens_d), flops,
                             {"granularity": gran.name, "lens": lens_h.tolist(), "shape": f"G={G} M={M} K={K} N={N}"},
                             errors)
