"""The grouped GEMM's weight gradient (op grouped_gemm_wgrad: dB[g] = a[rows of g]^T @ dc[rows of g]) on Hopper:
our CUDA kernel (backend "wgmma", csrc/fp8_wgmma/grouped_wgrad.cu) against torch._grouped_mm, our Triton TMA
kernel and the per-expert loop, DeepSeek-V3 expert shapes, skewed token counts on the GPU.

    python benchmarks/probe_grouped_wgrad.py --json probe.json [--cases G32_fc1_256,...] [--rounds 5]

Labels: the backends through the dispatcher (wgmma: its default cluster), and our kernel called directly with
one CTA per tile (wgmma_c1) or two sharing dc's boxes (wgmma_c2), and the default cluster with the stmatrix
epilogue (wgmma_stsm). Every case is checked first (relative error of each backend against torch._grouped_mm); times are
bench_interleaved medians (L2 flushed, balanced order); x_torch / x_loop: the baseline's time over the label's,
same call; frac_peak against the bf16 datasheet peak.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import _forced  # noqa: E402
from common import bench_interleaved, probe_main  # noqa: E402
from probe_grouped_wgmma import _rel, grouped_case, timing_rows  # noqa: E402

CASES = ["G32_fc1_256", "G32_fc2_256", "G32_fc1_128", "G32_fc2_128", "G8_fc1_1024", "G32_fc1_1024"]
BACKENDS = {"torch": "torch_grouped_mm", "triton": "triton", "loop": "loop", "wgmma": "wgmma"}


def run_case(name, rounds):
    from turbo_dist.ops import dispatcher, grouped_wgmma

    G, K, N, lens, M = grouped_case(name)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dc = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    gl = lens.cuda()
    fns = {label: _forced(lambda: dispatcher.dispatch("grouped_gemm_wgrad", a, dc, gl, False),
                          grouped_gemm_wgrad=backend) for backend, label in BACKENDS.items()}
    for cl in (1, 2):  # our kernel called directly: one CTA per tile (dynamic order), two sharing dc's boxes
        fns[f"wgmma_c{cl}"] = lambda cl=cl: grouped_wgmma.wgmma_wgrad(a, dc, gl, cluster=cl, stsm=False)
    fns["wgmma_stsm"] = lambda: grouped_wgmma.wgmma_wgrad(a, dc, gl, stsm=True)
    try:
        ref = fns["torch_grouped_mm"]()
        check = {f"rel_err_{label}": _rel(fns[label](), ref)
                 for label in ("triton", "wgmma_c1", "wgmma_c2")}
        check["stsm_equal"] = bool(torch.equal(fns["wgmma_stsm"](), fns["wgmma_c1"]()))
        del ref
        res = bench_interleaved(fns, rounds=rounds)
    finally:
        dispatcher.set_backend("grouped_gemm_wgrad", None)
    return timing_rows(res, name, 2.0 * M * K * N, f"G={G} M={M} K={K} N={N}", check)


def main():
    probe_main(__doc__, CASES, run_case, ["case", "impl", "ms", "tflops", "x_torch", "x_loop", "frac_peak",
                                          "rel_err_triton", "rel_err_wgmma_c1", "stsm_equal"])


if __name__ == "__main__":
    main()
