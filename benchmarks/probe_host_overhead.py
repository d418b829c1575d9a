"""Where the host time of one small grouped / dense GEMM call goes (GPU): each layer of the call path timed
on its own, plus a cProfile of the whole call.

    python benchmarks/probe_host_overhead.py --json probe.json

Operands are tiny (the GPU waits on the host). Each row: median microseconds per call over --calls calls,
--rounds rounds; the queue is drained before and after each round only. What the rows mean: `ops.*` is the
public entry, `dispatch` skips the input checks, `kernel wrapper` is kernels/grouped_gemm.grouped_gemm with
offsets ready, `raw launch` is the Triton JIT call alone with prepared arguments.
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402


def timed(fn, calls, rounds):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_host_overhead: needs CUDA")
        return 0
    from turbo_dist import ops
    from turbo_dist.kernels import grouped_gemm as kgg
    from turbo_dist.ops import dispatcher
    from turbo_dist.ops.grouped_gemm import check_grouped_inputs, group_offsets

    dev = "cuda"
    a = torch.randn(64, 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(128, 128, device=dev, dtype=torch.bfloat16)
    ga = torch.randn(256, 128, device=dev, dtype=torch.bfloat16)
    gb = torch.randn(4, 128, 128, device=dev, dtype=torch.bfloat16)
    gl = torch.tensor([64, 64, 64, 64], device=dev)
    offs64 = group_offsets(gl, dev)
    offs32 = group_offsets(gl, dev, torch.int32)
    out = torch.empty(256, 128, device=dev, dtype=torch.bfloat16)
    cases = {
        "torch.mm": lambda: torch.mm(a, w),
        "ops.gemm": lambda: ops.gemm(a, w),
        "gemm dispatch": lambda: dispatcher.dispatch("gemm", a, w, False, False, None),
        "gemm choose": lambda: dispatcher.choose("gemm", a, w, False, False, None),
        "torch._grouped_mm": lambda: torch._grouped_mm(ga, gb, offs=offs32),
        "ops.grouped_gemm": lambda: ops.grouped_gemm(ga, gb, gl),
        "grouped check_grouped_inputs": lambda: check_grouped_inputs(ga, gb, gl, False),
        "grouped choose": lambda: dispatcher.choose("grouped_gemm", ga, gb, gl, False),
        "grouped dispatch": lambda: dispatcher.dispatch("grouped_gemm", ga, gb, gl, False),
        "group_offsets (cumsum)": lambda: group_offsets(gl, dev),
        "torch.empty": lambda: torch.empty(256, 128, device=dev, dtype=torch.bfloat16),
        "kernel wrapper (offs ready)": lambda: kgg.grouped_gemm(ga, gb, offs64, out=out),
        "tma_operands": lambda: kgg.tma_operands(ga, gb),
    }
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        cases["TensorDescriptor.from_tensor x2"] = lambda: (TensorDescriptor.from_tensor(ga, [16, 16]),
                                                            TensorDescriptor.from_tensor(gb, [1, 16, 16]))
    except ImportError:
        pass
    rows = []
    for name, fn in cases.items():
        try:
            us = timed(fn, args.calls, args.rounds)
        except Exception as exc:  # noqa: BLE001 -- a probe row that cannot run is reported
            rows.append({"case": name, "host_us": None, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append({"case": name, "host_us": us})
        print(f"{name:34s} {us:8.2f} us", flush=True)
    ops.grouped_gemm(ga, gb, gl)
    backend = dispatcher.last_backend("grouped_gemm")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        ops.grouped_gemm(ga, gb, gl)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile_top)
    print(f"\n## cProfile of ops.grouped_gemm (backend {backend}), {args.calls} calls, sorted by own time")
    print(s.getvalue())
    print_table(rows)
    if args.json:
        write_json(args.json, rows, {"grouped_backend": backend, "calls": args.calls, "rounds": args.rounds,
                                     "profile": s.getvalue()[-6000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
