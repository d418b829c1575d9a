"""Our Hopper FP8 BLOCKWISE grouped GEMM (backend "wgmma", turbo_dist._fp8_wgmma) against bf16 grouped GEMM
(torch._grouped_mm, the issue's baseline) and the other FP8 backends, DeepSeek-V3 expert shapes, skewed token
counts on the GPU (and, for cublaslt, the same counts aligned to 128 on the host).

    python benchmarks/probe_fp8_wgmma.py --json probe.json [--cases G8_fc1_1024,...] [--rounds 5]

Every case is checked first (SNR against the fp32 product of the dequantized operands; one CTA per tile and
two sharing the weights bit-equal); times are bench_interleaved medians (L2 flushed, balanced order), ratios
against bf16 in the same call (`baseline`: the *_aligned* labels, which run on the counts aligned to 128, against
bf16 on those same counts, `bf16_torch_grouped_mm_aligned`), fraction of the FP8 datasheet peak. fp8_wgmma is
the dispatcher's call (its
cluster from fp8_wgmma.pick_cluster, column cluster_default); fp8_wgmma_c1 / _c2 call the kernel directly with
one CTA per tile / two CTAs sharing each weight tile.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import _forced, aligned_lens, skewed_lens  # noqa: E402
from common import bench_interleaved, peak_tflops, probe_main  # noqa: E402

LAYERS = {"fc1": (7168, 4096), "fc2": (2048, 7168)}  # (K, N)
CASES = ["G8_fc1_1024", "G32_fc1_1024", "G16_fc1_512", "G32_fc1_256", "G8_fc2_1024", "G32_fc2_256", "G32_fc1_128"]


def _snr(out, ref):
    err = (out.float() - ref).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / err.clamp_min(1e-30)))


def run_case(name, rounds):
    from turbo_dist.ops import ScalingGranularity, dispatcher, fp8_grouped, fp8_wgmma, quantize_fp8
    from turbo_dist.ops.fp8_grouped import _reference_grouped_scaled

    g, layer, tpe = name.split("_")
    G, tpe = int(g[1:]), int(tpe)
    K, N = LAYERS[layer]
    lens = skewed_lens(G, tpe, seed=G)
    M = int(lens.sum())
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    gran = ScalingGranularity.BLOCKWISE
    aq, sa = quantize_fp8(a, torch.float8_e4m3fn, gran)
    wq, sw = quantize_fp8(w, torch.float8_e4m3fn, gran, weight=True)
    b, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    lens_d = lens.cuda()
    offs = torch.cumsum(lens_d, 0)
    check = {}
    ref = _reference_grouped_scaled(aq, b, sa, sb, lens, "block", torch.float32)
    out = fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16)
    check["snr_db_wgmma"] = _snr(out, ref)
    out1, out2 = (fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=c,
                                                 tail_pct=0) for c in (1, 2))
    check["snr_db_wgmma_c2"] = _snr(out2, ref)
    check["c2_equal"] = bool(torch.equal(out1, out2))  # the same products in the same order: bit-equal
    check["snr_db_wgmma_sk"] = min(_snr(fp8_wgmma.wgmma_grouped_scaled(
        aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=1, tail_pct=100, tail_waves=w), ref) for w in (1, 2))
    check["cluster_default"] = fp8_wgmma.pick_cluster(M, G)
    dispatcher.set_backend("grouped_scaled_mm", "triton")
    check["snr_db_triton"] = _snr(dispatcher.dispatch("grouped_scaled_mm", aq, b, sa, sb, lens_d, "block",
                                                      torch.bfloat16), ref)
    dispatcher.set_backend("grouped_scaled_mm", None)
    del ref, out, out1, out2

    def forced(backend, lens_arg):  # bench_ops' forcing: set only when it differs, so no label pays for a reset
        return _forced(lambda: dispatcher.dispatch("grouped_scaled_mm", aq, b, sa, sb, lens_arg, "block",
                                                   torch.bfloat16), grouped_scaled_mm=backend)

    offs32 = offs.int()  # once, not a conversion kernel inside every timed call of the baseline
    fns = {"bf16_torch_grouped_mm": lambda: torch._grouped_mm(a, w.transpose(1, 2), offs=offs32),
           "fp8_triton": forced("triton", lens_d)}
    fns["fp8_wgmma"] = forced("wgmma", lens_d)
    # the kernel called directly: one CTA per tile / two sharing the weight tile, whole tiles only; one CTA per
    # tile with the stream-K tail on whenever the last wave is partial (sk) or at most half full (sk50)
    # (skr: the partial wave alone cut into runs, tail_waves 1)
    for label, cl, pct, waves in (("c1", 1, 0, 2), ("c2", 2, 0, 2), ("sk", 1, 100, 2), ("sk50", 1, 50, 2),
                                  ("skr", 1, 100, 1)):
        fns[f"fp8_wgmma_{label}"] = (lambda cl=cl, pct=pct, waves=waves: fp8_wgmma.wgmma_grouped_scaled(
            aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=cl, tail_pct=pct, tail_waves=waves,
            half_tiles=False))
    fns["fp8_wgmma_half"] = (lambda: fp8_wgmma.wgmma_grouped_scaled(  # dynamic half tiles (HALF_TILES)
        aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=1, tail_pct=0, half_tiles=True))
    lens_h = aligned_lens(lens, 128)
    if fp8_grouped.native_module() is not None and int(lens_h.sum()) == M:  # cuBLASLt per group, host counts
        offs_h32 = torch.cumsum(lens_h, 0).to("cuda", torch.int32)  # bf16 on the same aligned counts
        fns["bf16_torch_grouped_mm_aligned"] = lambda: torch._grouped_mm(a, w.transpose(1, 2), offs=offs_h32)
        fns["fp8_cublaslt_aligned_host"] = forced("cublaslt", lens_h)
        fns["fp8_wgmma_aligned_host"] = forced("wgmma", lens_h)
        lens_hd = lens_h.cuda()  # the same aligned counts on the GPU: what tile padding costs ours
        fns["fp8_wgmma_aligned"] = forced("wgmma", lens_hd)
        fns["fp8_wgmma_c2_aligned"] = (lambda: fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_hd, "block",
                                                                              torch.bfloat16, cluster=2))
        fns["fp8_wgmma_sk_aligned"] = (lambda: fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_hd, "block",
                                                                              torch.bfloat16, cluster=1,
                                                                              tail_pct=100))
    try:
        res = bench_interleaved(fns, rounds=rounds)
    finally:
        dispatcher.set_backend("grouped_scaled_mm", None)
    flops = 2.0 * M * K * N
    peak = peak_tflops("fp8")
    rows = []
    for label, ms in res.items():
        if ms is None:
            continue
        tf = flops / ms / 1e9
        base_label = "bf16_torch_grouped_mm_aligned" if "aligned" in label else "bf16_torch_grouped_mm"
        base = res.get(base_label)
        rows.append({"case": name, "impl": label, "ms": ms, "tflops": tf, "x_bf16": base / ms if base else None,
                     "baseline": base_label, "frac_peak": tf / peak if peak and label.startswith("fp8") else None,
                     "shape": f"G={G} M={M} K={K} N={N}", **check})
    return rows


def main():
    probe_main(__doc__, CASES, run_case, ["case", "impl", "ms", "tflops", "x_bf16", "frac_peak", "snr_db_wgmma",
                                          "snr_db_wgmma_sk", "c2_equal", "cluster_default"])


if __name__ == "__main__":
    main()
