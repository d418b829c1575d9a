"""Host launch time vs GPU time of BLOCKWISE FP8 grouped GEMM backends (cublaslt / torch_loop: one cuBLASLt
GEMM per group, looped in C++ / through torch._scaled_mm; triton: one persistent kernel), DeepSeek-V3 fc1
(K=7168, N=4096), skewed host counts aligned to 128.

    python benchmarks/probe_fp8_grouped_host.py --json probe.json

Per call: `host_ms` is the time the Python call takes to return (launches only), `gpu_ms` the GPU time between
events with the launch queue pre-filled by a sleep kernel (so host stalls are not counted); medians of
--iters calls, each backend twice, interleaved. The bench (`bench_ops.py --sections fp8_grouped`) counts host
stalls instead (do_bench flushes L2 and times each call alone): where host_ms > gpu_ms the host sets the pace.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import aligned_lens, skewed_lens  # noqa: E402
from common import print_table, write_json  # noqa: E402


def probe(G, backends, iters, K=7168, N=4096, tpe=1024):
    from turbo_dist.ops import ScalingGranularity, dispatcher, quantize_fp8

    lens = aligned_lens(skewed_lens(G, tpe, seed=G), 128)
    a = torch.randn(int(lens.sum()), K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16)
    aq, sa = quantize_fp8(a, torch.float8_e4m3fn, ScalingGranularity.BLOCKWISE)
    wq, sw = quantize_fp8(w, torch.float8_e4m3fn, ScalingGranularity.BLOCKWISE, weight=True)
    args = (aq, wq.transpose(1, 2), sa, sw.transpose(1, 2), lens, "block", torch.bfloat16)
    rows = []
    for name in backends * 2:
        dispatcher.set_backend("grouped_scaled_mm", name)
        try:
            dispatcher.dispatch("grouped_scaled_mm", *args)
            torch.cuda.synchronize()
            host, gpu = [], []
            for _ in range(iters):
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU work queued ahead of the call
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                t0 = time.perf_counter()
                dispatcher.dispatch("grouped_scaled_mm", *args)
                host.append((time.perf_counter() - t0) * 1e3)
                e1.record()
                torch.cuda.synchronize()
                gpu.append(e0.elapsed_time(e1))
        finally:
            dispatcher.set_backend("grouped_scaled_mm", None)
        launched = int((lens > 0).sum())
        rows.append({"case": f"G{G}_fc1 {tpe} tok/expert BLOCKWISE lens%128==0 host", "impl": name,
                     "host_ms": statistics.median(host),
                     "gpu_ms": statistics.median(gpu), "groups_launched": launched,
                     "host_us_per_group": statistics.median(host) * 1e3 / launched, "lens": lens.tolist()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--experts", default="8,32", help="comma list of G")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tokens-per-expert", default="1024", help="comma list: mean tokens per expert (skewed)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_fp8_grouped_host: needs CUDA; nothing to measure")
        return 0
    rows = []
    from turbo_dist.ops import fp8_grouped

    native = ["cublaslt"] if fp8_grouped.native_module() is not None else []
    for tpe in (int(x) for x in args.tokens_per_expert.split(",")):
        for G in (int(x) for x in args.experts.split(",")):
            rows += probe(G, native + ["torch_loop", "triton"], args.iters, tpe=tpe)
    print_table(rows, ["case", "impl", "host_ms", "gpu_ms", "groups_launched", "host_us_per_group"])
    if args.json:
        write_json(args.json, rows, {"iters": args.iters})
    return 0


if __name__ == "__main__":
    sys.exit(main())
