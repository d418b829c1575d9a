"""How far a grouped GEMM can get ahead of the per-expert loop (the issue's ">= 1.3x a per-group loop"), measured:
beside the loop and our default on DeepSeek-V3 expert shapes (skewed token counts, as bench_ops), the same FLOPs
as one dense cuBLAS GEMM (every row times one expert's weight: no grouping, no padding, 1/G of the weight bytes;
no grouped kernel does the same work faster) and cuBLAS's batched GEMM on uniform counts (torch.bmm: the vendor's
own kernel where grouping costs nothing), with the loop and our default on the same uniform counts.

    python benchmarks/probe_grouped_bounds.py --json bounds.json [--cases G32_fc1_256,...] [--rounds 5]

Labels (fwd: C = A W; bwd: dA = dC W^T and dW = A^T dC): loop, default, torch_grouped_mm (skewed counts);
dense (the same FLOPs as one GEMM per pass); bmm_uniform, loop_uniform, default_uniform (every expert M // G rows).
tall, tall_uniform: our Hopper kernel's opt-in 256 x 128 tiles (the backward: their dgrad beside the
default weight gradient), where it runs. x_loop: the skewed loop's time over the label's (uniform labels:
loop_uniform's); frac_peak against the bf16 datasheet peak. Times are bench_interleaved medians (L2 flushed,
balanced order), as bench_ops. `kernels`: the CUDA kernels one call of the label launched (torch.profiler), the
three longest with their share of its GPU time.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import _forced  # noqa: E402
from common import bench_interleaved, peak_tflops, probe_main  # noqa: E402
from probe_grouped_wgmma import grouped_case  # noqa: E402

CASES = ["G32_fc1_128", "G32_fc1_256", "G32_fc2_256", "G8_fc1_1024", "G32_fc1_1024"]


def kernels_of(fn, top=3):
    """[(kernel name, share of the call's GPU time)] of one call, longest first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] = per.get(ev.name, 0.0) + ev.device_time
    total = sum(per.values()) or 1.0
    return [(name[:160], round(t / total, 3)) for name, t in sorted(per.items(), key=lambda kv: -kv[1])[:top]]


def case_fns(name, dev="cuda", dtype=torch.bfloat16):
    """{phase: {label: fn}}, the FLOPs per pass and the shape, for one case."""
    from turbo_dist.ops import dispatcher

    G, K, N, lens, M = grouped_case(name)
    a = torch.randn(M, K, device=dev, dtype=dtype)
    dc = torch.randn(M, N, device=dev, dtype=dtype)
    w = torch.randn(G, K, N, device=dev, dtype=dtype) * K ** -0.5
    gl = lens.to(dev)
    offs = torch.cumsum(gl, 0).int()
    uni = torch.full((G,), M // G, dtype=torch.long)
    Mu = int(uni.sum())
    au, dcu, glu = a[:Mu], dc[:Mu], uni.to(dev)
    w0 = w[0]

    def fwd(x, lens_):
        return lambda: dispatcher.dispatch("grouped_gemm", x, w, lens_, False)

    def bwd(x, d, lens_):
        return lambda: (dispatcher.dispatch("grouped_gemm", d, w, lens_, True),
                        dispatcher.dispatch("grouped_gemm_wgrad", x, d, lens_, False))

    fns = {"fwd": {}, "bwd": {}}
    for suffix, x, d, lens_ in (("", a, dc, gl), ("_uniform", au, dcu, glu)):
        for backend, label in (("loop", "loop"), (None, "default")):
            fns["fwd"][label + suffix] = _forced(fwd(x, lens_), grouped_gemm=backend)
            fns["bwd"][label + suffix] = _forced(bwd(x, d, lens_), grouped_gemm=backend, grouped_gemm_wgrad=backend)
    from turbo_dist.ops import grouped_wgmma

    if grouped_wgmma._wgmma_grouped_can(a, w, gl) is True:  # our Hopper kernel's 256 x 128 tiles (opt-in)
        def tall(x, lens_, trans_b):
            return grouped_wgmma.wgmma_grouped(x, w, lens_, trans_b, tail_pct=0, tall=True)

        for suffix, x, d, lens_ in (("", a, dc, gl), ("_uniform", au, dcu, glu)):
            fns["fwd"]["tall" + suffix] = lambda x=x, lens_=lens_: tall(x, lens_, False)
            fns["bwd"]["tall" + suffix] = lambda x=x, d=d, lens_=lens_: (
                tall(d, lens_, True), dispatcher.dispatch("grouped_gemm_wgrad", x, d, lens_, False))
    fns["fwd"]["torch_grouped_mm"] = lambda: torch._grouped_mm(a, w, offs=offs)
    fns["bwd"]["torch_grouped_mm"] = lambda: (torch._grouped_mm(dc, w.transpose(1, 2), offs=offs),
                                              torch._grouped_mm(a.t(), dc, offs=offs))
    fns["fwd"]["dense"] = lambda: torch.mm(a, w0)
    fns["bwd"]["dense"] = lambda: (torch.mm(dc, w0.t()), torch.mm(a.t(), dc))
    a3, dc3 = au.view(G, Mu // G, K), dcu.view(G, Mu // G, N)
    fns["fwd"]["bmm_uniform"] = lambda: torch.bmm(a3, w)
    fns["bwd"]["bmm_uniform"] = lambda: (torch.bmm(dc3, w.transpose(1, 2)), torch.bmm(a3.transpose(1, 2), dc3))
    flops = {"fwd": 2.0 * M * K * N, "bwd": 4.0 * M * K * N}
    flops_u = {"fwd": 2.0 * Mu * K * N, "bwd": 4.0 * Mu * K * N}
    return fns, flops, flops_u, f"G={G} M={M} (uniform {Mu}) K={K} N={N}", lens


def run_case(name, rounds):
    from turbo_dist.ops import dispatcher

    fns, flops, flops_u, shape, lens = case_fns(name)
    peak = peak_tflops("bf16")
    rows = []
    for phase, group in fns.items():
        try:
            res = bench_interleaved(group, rounds=rounds)
            kernels = {}
            for label, fn in group.items():
                try:
                    kernels[label] = kernels_of(fn)
                except Exception as exc:  # noqa: BLE001 - the names are a note beside the times, not a result
                    kernels[label] = [(f"torch.profiler failed: {exc!r}"[:160], None)]
        finally:
            dispatcher.set_backend("grouped_gemm", None)
            dispatcher.set_backend("grouped_gemm_wgrad", None)
        for label, ms in res.items():
            if ms is None:
                continue
            uniform = label.endswith("_uniform")
            base = res.get("loop_uniform" if uniform else "loop")
            tf = (flops_u if uniform else flops)[phase] / ms / 1e9
            rows.append({"case": f"{name}_{phase}", "impl": label, "ms": ms, "tflops": tf,
                         "x_loop": base / ms if base else None, "frac_peak": tf / peak if peak else None,
                         "kernels": kernels[label], "shape": shape,
                         "lens": f"min {int(lens.min())} max {int(lens.max())}"})
    return rows


def main():
    probe_main(__doc__, CASES, run_case, ["case", "impl", "ms", "tflops", "x_loop", "frac_peak"],
               case_keys=lambda name: [f"{name}_fwd", f"{name}_bwd"])


if __name__ == "__main__":
    main()
