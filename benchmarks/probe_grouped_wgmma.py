"""Our Hopper bf16 grouped GEMM (backend "wgmma" of grouped_gemm, opt-in; turbo_dist._fp8_wgmma.grouped_bf16)
against torch._grouped_mm, our Triton kernel and the per-expert loop (the issue's baselines), DeepSeek-V3 expert
shapes, skewed token counts on the GPU: the forward (b [G, K, N], N-major) and the dgrad (dC @ b^T, K-major).

    python benchmarks/probe_grouped_wgmma.py --json probe.json [--cases G8_fc1_1024,...] [--rounds 5]

Labels wgmma_c1 / _c2 (one CTA per tile / two sharing the weight tile, whole tiles), wgmma_tall (256 x 128 tiles,
dynamic, a group's last <= 128 rows a half tile), wgmma_half (dynamic tiles
with half tiles); PROBE_STREAM_K=1 adds the stream-K tail variants (wgmma_sk, _sk50, _skr).

Every case is checked first (relative error against torch._grouped_mm; one CTA per tile and two sharing the
weights bit-equal); times are bench_interleaved medians (L2 flushed, balanced order); x_torch / x_loop: the
baseline's time over the label's, same call; frac_peak against the bf16 datasheet peak.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import GROUPED_LAYERS, _forced, skewed_lens  # noqa: E402
from common import bench_interleaved, peak_tflops, probe_main  # noqa: E402

CASES = ["G8_fc1_1024", "G32_fc1_1024", "G8_fc2_1024", "G32_fc1_256", "G32_fc2_256", "G32_fc1_128"]


def _rel(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def timing_rows(res, case, flops, shape, check):
    """A grouped probe's rows from bench_interleaved's {label: ms}: TFLOP/s, x_torch / x_loop (torch._grouped_mm's
    and the loop's time of the same call over the label's), the fraction of the bf16 peak, the case's checks."""
    peak = peak_tflops("bf16")
    base, loop = res.get("torch_grouped_mm"), res.get("loop")
    rows = []
    for label, ms in res.items():
        if ms is None:
            continue
        tf = flops / ms / 1e9
        rows.append({"case": case, "impl": label, "ms": ms, "tflops": tf, "x_torch": base / ms if base else None,
                     "x_loop": loop / ms if loop else None, "frac_peak": tf / peak if peak else None,
                     "shape": shape, **check})
    return rows


def grouped_case(name):
    """A case name like G32_fc1_256 -> (G, K, N, skewed token counts [G] on the CPU, their sum M)."""
    g, layer, tpe = name.split("_")
    G = int(g[1:])
    K, N = dict((n, (k, nn)) for n, k, nn in GROUPED_LAYERS)[layer]
    lens = skewed_lens(G, int(tpe), seed=G)
    return G, K, N, lens, int(lens.sum())


def run_case(name, rounds, stream_k=os.environ.get("PROBE_STREAM_K") == "1"):
    from turbo_dist.ops import dispatcher, grouped_wgmma

    G, K, N, lens, M = grouped_case(name)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(G, K, N, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    dc = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    gl = lens.cuda()
    offs = torch.cumsum(gl, 0).int()
    rows = []
    for phase, x, trans_b in (("fwd", a, False), ("dgrad", dc, True)):
        bb = b.transpose(1, 2) if trans_b else b  # what torch._grouped_mm takes: [G, K', N']
        check = {}
        ref = torch._grouped_mm(x, bb, offs=offs)
        out1, out2 = (grouped_wgmma.wgmma_grouped(x, b, gl, trans_b, cluster=c, tail_pct=0, half_tiles=False)
                      for c in (1, 2))
        out_sk = grouped_wgmma.wgmma_grouped(x, b, gl, trans_b, cluster=1, tail_pct=100, tail_waves=1)
        out_half = grouped_wgmma.wgmma_grouped(x, b, gl, trans_b, cluster=1, tail_pct=0, half_tiles=True)
        out_tall = grouped_wgmma.wgmma_grouped(x, b, gl, trans_b, cluster=1, tail_pct=0, tall=True)
        check["rel_err_vs_torch"] = _rel(out1, ref)
        check["rel_err_sk"] = _rel(out_sk, ref)
        check["c2_equal"] = bool(torch.equal(out1, out2))
        check["half_equal"] = bool(torch.equal(out1, out_half))
        check["rel_err_half"] = _rel(out_half, ref)
        check["rel_err_tall"] = _rel(out_tall, ref)
        del ref, out1, out2, out_sk, out_half, out_tall

        def forced(backend):
            return _forced(lambda: dispatcher.dispatch("grouped_gemm", x, b, gl, trans_b), grouped_gemm=backend)

        fns = {"torch_grouped_mm": lambda: torch._grouped_mm(x, bb, offs=offs), "triton": forced("triton"),
               "loop": forced("loop")}
        # one CTA per tile / two sharing the weight tile, whole tiles in a fixed round robin; dynamic tiles with
        # half tiles (half); 256 x 128 tall tiles, dynamic, 128-row half tiles (tall); with --stream-k the stream-K
        # tail whenever the last wave is partial (sk) or at most half full (sk50), and the partial wave alone cut
        # into runs (skr, tail_waves 1)
        variants = [("c1", 1, 0, 2, False, False), ("c2", 2, 0, 2, False, False), ("half", 1, 0, 2, True, False),
                    ("tall", 1, 0, 2, True, True)]
        if stream_k:
            variants += [("sk", 1, 100, 2, False, False), ("sk50", 1, 50, 2, False, False),
                         ("skr", 1, 100, 1, False, False)]
        for label, cl, pct, waves, half, tall in variants:
            fns[f"wgmma_{label}"] = (lambda cl=cl, pct=pct, waves=waves, half=half, tall=tall:
                                     grouped_wgmma.wgmma_grouped(x, b, gl, trans_b, cluster=cl, tail_pct=pct,
                                                                 tail_waves=waves, half_tiles=half, tall=tall))
        try:
            res = bench_interleaved(fns, rounds=rounds)
        finally:
            dispatcher.set_backend("grouped_gemm", None)
        kk, nn = (N, K) if trans_b else (K, N)
        rows += timing_rows(res, f"{name}_{phase}", 2.0 * M * kk * nn, f"G={G} M={M} K={kk} N={nn}", check)
    return rows


def main():
    probe_main(__doc__, CASES, run_case, ["case", "impl", "ms", "tflops", "x_torch", "x_loop", "frac_peak",
                                          "rel_err_vs_torch", "rel_err_half", "rel_err_tall", "half_equal",
                                          "c2_equal"],
               case_keys=lambda name: [f"{name}_fwd", f"{name}_dgrad"])


if __name__ == "__main__":
    main()
