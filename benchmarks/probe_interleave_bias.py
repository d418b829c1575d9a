"""Probe (one GPU): does a label's time in common.bench_interleaved depend on the label timed before it?

The same function sits behind two labels, one always right after a power-hungry bf16 GEMM and one right after an
idle GPU (torch.cuda._sleep) when the order is rotated (each label keeps its neighbours); with the seeded
shuffle no label always follows the same one, and with the balanced order (the default) each follows each other
one equally often. The x_after_heavy / x_after_idle ratio, per order and per
function, says whether rotation biases a label by its neighbour (1.00 = no bias).

    python benchmarks/probe_interleave_bias.py --json out.json
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_interleaved, print_table, write_json  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from turbo_dist.ops import ScalingGranularity, dispatcher, quantize_fp8
    from bench_ops import _grouped_case

    dev = "cuda"
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mid_a = torch.randn(8192, 7168, device=dev, dtype=torch.bfloat16)
    mid_b = torch.randn(7168, 4096, device=dev, dtype=torch.bfloat16)
    lens, a, b, _ = _grouped_case(8, 1024, 7168, 4096)
    b_t = b.transpose(1, 2).contiguous()
    aq, sa = quantize_fp8(a, torch.float8_e4m3fn, ScalingGranularity.BLOCKWISE)
    wq, sw = quantize_fp8(b_t, torch.float8_e4m3fn, ScalingGranularity.BLOCKWISE, weight=True)
    gl = lens.to(dev)
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1e3 * 1.5e-3) if hasattr(
        torch.cuda.get_device_properties(0), "clock_rate") else 2_000_000  # ~1.5 ms of spinning
    xs = {"bf16_mm_8192x4096x7168": lambda: mid_a @ mid_b,
          "fp8_block_grouped_G8": lambda: dispatcher.dispatch("grouped_scaled_mm", aq, wq.transpose(1, 2), sa,
                                                                sw.transpose(1, 2), gl, "block", torch.bfloat16)}
    rows = []
    for xname, x in xs.items():
        for order in ("rotate", "shuffle", "balanced"):
            for rep in range(args.repeats):
                fns = {"heavy_bf16_8192^3": lambda: big @ big, "x_after_heavy": x,
                       "idle": lambda: torch.cuda._sleep(cycles), "x_after_idle": x}
                res = bench_interleaved(fns, rounds=args.rounds, order=order)
                rows.append(dict(fn=xname, order=order, repeat=rep, x_after_heavy_ms=res["x_after_heavy"],
                                 x_after_idle_ms=res["x_after_idle"],
                                 ratio=res["x_after_heavy"] / res["x_after_idle"], heavy_ms=res["heavy_bf16_8192^3"]))
                print(rows[-1], flush=True)
    print_table(rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
