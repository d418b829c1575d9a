"""What the GPU does while one grouped-GEMM kernel runs back to back: SM clock, power and throttle reasons
(nvidia-smi sampled every 50 ms) beside the kernel's time, for the forward and the weight gradient of DeepSeek-V3
expert shapes (skewed token counts). An H200 under WGMMA load sits at its 700 W cap: the clock, not only the
kernel, sets the time, and two kernels of equal work can run at different clocks (the forward of our Hopper
kernel at 1.32 GHz, torch's at 1.48 GHz, the weight gradients at 1.7-1.8 GHz, G=32 x 256 fc1).

    python benchmarks/probe_grouped_clocks.py --json clocks.json [--cases G32_fc1_256,...] [--seconds 2.5]
    ncu --profile-from-start off --section SpeedOfLight python benchmarks/probe_grouped_clocks.py --ncu

Labels: fwd_torch (torch._grouped_mm), fwd_wgmma (our Hopper kernel, its defaults), fwd_wgmma_whole (the same
without half tiles: a group's last rows padded to 128), fwd_loop (one torch.mm per expert: the issue's baseline),
fwd_dense (torch.mm of all rows by one expert's weight: the same FLOPs with no grouping, the bound the grouped
kernels approach), fwd_bmm_uniform (torch.bmm with M // G rows per expert: every weight streamed, no skew),
wgrad_torch, wgrad_triton, wgrad_wgmma (grouped_gemm_wgrad's backends); mj_per_call: power x time. Times here are
back to back with L2 warm (not bench_interleaved's flushed medians): they go with the clocks measured at the same
time. --ncu: each label once between cudaProfilerStart / Stop, nothing timed, no nvidia-smi.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import _forced  # noqa: E402
from common import print_table, write_json  # noqa: E402
from probe_grouped_wgmma import grouped_case  # noqa: E402

CASES = ["G32_fc1_256", "G8_fc1_1024"]
SMI_FIELDS = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"


def labels(name):
    from turbo_dist.ops import dispatcher, grouped_wgmma

    G, K, N, lens, M = grouped_case(name)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dc = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(G, K, N, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    gl = lens.cuda()
    offs = torch.cumsum(gl, 0).int()

    def wgrad(backend):
        return _forced(lambda: dispatcher.dispatch("grouped_gemm_wgrad", a, dc, gl, False), grouped_gemm_wgrad=backend)

    bounds = [0] + torch.cumsum(lens, 0).tolist()
    pieces = [(a[s:e], w[g]) for g, (s, e) in enumerate(zip(bounds, bounds[1:])) if e > s]

    def loop():  # the baseline: one cuBLAS GEMM per expert
        return [torch.mm(x, y) for x, y in pieces]

    fns = {"fwd_torch": lambda: torch._grouped_mm(a, w, offs=offs),
           "fwd_wgmma": lambda: grouped_wgmma.wgmma_grouped(a, w, gl, False),
           "fwd_wgmma_whole": lambda: grouped_wgmma.wgmma_grouped(a, w, gl, False, half_tiles=False),
           "fwd_loop": loop,
           "fwd_dense": lambda: torch.mm(a, w[0]),  # the same FLOPs as one GEMM: one weight, no padding
           # cuBLAS's batched GEMM on uniform counts (M // G rows each, every weight): grouping at no cost
           "fwd_bmm_uniform": lambda: torch.bmm(a[:M // G * G].view(G, M // G, K), w),
           "wgrad_torch": wgrad("torch"), "wgrad_triton": wgrad("triton"), "wgrad_wgmma": wgrad("wgmma")}
    return fns, 2.0 * M * K * N, f"G={G} M={M} K={K} N={N}"


def parse_smi(path):
    """[(unix time, SM MHz, W, throttle reasons)] from nvidia-smi's CSV (timestamps in the machine's local time)."""
    out = []
    for line in open(path):
        p = [x.strip() for x in line.split(",")]
        try:
            ts = datetime.datetime.strptime(p[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((ts, float(p[1]), float(p[2]), p[3]))
        except (ValueError, IndexError):
            continue
    return out


def run_case(name, seconds):
    from turbo_dist.ops import dispatcher

    fns, flops, shape = labels(name)
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as log:
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=log)
        marks = []
        try:
            time.sleep(1.0)
            for label, fn in fns.items():
                fn()
                torch.cuda.synchronize()
                t0, n = time.time(), 0
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                while time.time() - t0 < seconds:
                    for _ in range(20):
                        fn()
                    n += 20
                    torch.cuda.synchronize()
                e1.record()
                torch.cuda.synchronize()
                marks.append((label, t0 + 0.5, time.time(), e0.elapsed_time(e1) / n))  # the first 0.5 s: ramping
                time.sleep(0.5)
        finally:
            smi.terminate()
            smi.wait()
            dispatcher.set_backend("grouped_gemm_wgrad", None)  # the wgrad labels' forcing
        samples = parse_smi(log.name)
    rows = []
    for label, t0, t1, ms in marks:
        sel = [s for s in samples if t0 <= s[0] <= t1]
        rows.append({"case": name, "impl": label, "ms_back_to_back": ms, "tflops": flops / ms / 1e9,
                     "sm_clock_mhz": sum(s[1] for s in sel) / len(sel) if sel else None,
                     "power_w": sum(s[2] for s in sel) / len(sel) if sel else None,
                     "mj_per_call": sum(s[2] for s in sel) / len(sel) * ms if sel else None,  # W x ms = mJ
                     "throttle_reasons": sorted({s[3] for s in sel}), "samples": len(sel), "shape": shape})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--ncu", action="store_true", help="each label once between cudaProfilerStart / Stop")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.ncu:
        for name in args.cases.split(","):
            fns, _, _ = labels(name)
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            for label, fn in fns.items():
                torch.cuda.nvtx.range_push(f"{name}:{label}")
                fn()
                torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args.seconds)
        print_table([r for r in rows if r["case"] == name],
                    ["case", "impl", "ms_back_to_back", "tflops", "sm_clock_mhz", "power_w", "mj_per_call",
                     "throttle_reasons"])
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
