"""Probe (one GPU): the bf16 grouped GEMM backward at bench_ops' grouped cases, every mix of backends for its two
halves (dgrad: the forward op with b transposed; weight gradient) timed interleaved, plus each half alone, to see
which backend the dispatcher should take per half and whether the halves slow each other when run back to back.

    python benchmarks/probe_grouped_bwd_mix.py --cases G32:1024,G8:1024 --json out.json
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import GROUPED_LAYERS, _forced, _grouped_case  # noqa: E402
from common import bench_interleaved, command_line, machine_info, print_table, write_json  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="G32:1024,G8:1024,G32:256")
    p.add_argument("--layers", default="fc1,fc2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from turbo_dist.ops import dispatcher

    rows = []
    for case in args.cases.split(","):
        G, tpe = (int(v) for v in case.lstrip("G").split(":"))
        for layer, K, N in GROUPED_LAYERS:
            if layer not in args.layers.split(","):
                continue
            lens, a, b, dc = _grouped_case(G, tpe, K, N)
            gl = lens.to(a.device)
            M = a.shape[0]
            dgrad = lambda: dispatcher.dispatch("grouped_gemm", dc, b, gl, True)  # noqa: E731
            wgrad = lambda: dispatcher.dispatch("grouped_gemm_wgrad", a, dc, gl, False)  # noqa: E731
            fns = {}
            for d in ("torch", "triton", "loop"):
                fns[f"dgrad_{d}"] = _forced(dgrad, grouped_gemm=d)
                fns[f"wgrad_{d}"] = _forced(wgrad, grouped_gemm_wgrad=d)
            for d in ("torch", "triton"):
                for w in ("torch", "triton"):
                    fns[f"bwd_{d}+{w}"] = _forced(lambda: (dgrad(), wgrad()), grouped_gemm=d, grouped_gemm_wgrad=w)
            fns["bwd_default"] = _forced(lambda: (dgrad(), wgrad()), grouped_gemm=None, grouped_gemm_wgrad=None)
            res = bench_interleaved(fns, rounds=args.rounds, on_error=lambda k, e: print(f"{k}: {e}"))
            fns["bwd_default"]()
            chosen = (dispatcher.last_backend("grouped_gemm"), dispatcher.last_backend("grouped_gemm_wgrad"))
            flops = 2.0 * M * K * N
            for label, ms in res.items():
                if ms is None:
                    continue
                f = flops * (2 if label.startswith("bwd") else 1)
                rows.append(dict(case=f"G{G}_t{tpe}_{layer}", impl=label, ms=ms, tflops=f / ms / 1e9,
                                 default_ran="+".join(map(str, chosen)) if label == "bwd_default" else None))
            halves = {k: v for k, v in res.items() if v and not k.startswith("bwd")}
            best_d = min((v for k, v in halves.items() if k.startswith("dgrad")), default=None)
            best_w = min((v for k, v in halves.items() if k.startswith("wgrad")), default=None)
            if best_d and best_w:
                rows.append(dict(case=f"G{G}_t{tpe}_{layer}", impl="sum_of_best_halves", ms=best_d + best_w))
    print_table(rows)
    if args.json:
        write_json(args.json, rows, dict(machine=machine_info(), command=command_line()))


if __name__ == "__main__":
    main()
