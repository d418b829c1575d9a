"""Means over several runs of benchmarks/bench_ops.py: on this power-capped GPU one case's times move by up to
~5% between runs with nothing changed, so ratios that close are read from several runs (README quotes such means).

    python benchmarks/aggregate_ops.py benchmarks/results/ops_grouped_{rule512,shuffled,choice,fc1rule1,fc1rule2}_h200.json \
        [--section grouped] [--baseline torch_grouped_mm] [--json means.json]

Per (section, case): each implementation's mean time over the runs that have it (and how many), the fastest
implementation on those means, and every implementation's speed-up over `--baseline` and over the per-group loop
(`loop`, where the section has one), each a ratio of the means.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_json  # noqa: E402


def aggregate(runs, section=None, baseline="torch_grouped_mm"):
    """runs: bench_ops JSON documents ({"rows": [...]}) -> one row per (case, impl) with the mean ms over the runs
    that timed it, n (that count), fastest (the case's fastest impl on the means), x_baseline and x_loop (ratios of
    the means; None where the case has no such impl)."""
    times = {}
    for doc in runs:
        for r in doc["rows"]:
            if section and r.get("section") != section or not r.get("ms"):
                continue
            times.setdefault((r["section"], r["case"]), {}).setdefault(r["impl"], []).append(r["ms"])
    out = []
    for (sec, case), impls in times.items():
        means = {impl: statistics.mean(ts) for impl, ts in impls.items()}
        fastest = min(means, key=means.get)
        base, loop = means.get(baseline), means.get("loop")
        for impl, ms in means.items():
            out.append({"section": sec, "case": case, "impl": impl, "ms": ms, "n": len(impls[impl]),
                        "fastest": fastest, "x_baseline": (base / ms) if base else None,
                        "x_loop": (loop / ms) if loop else None})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="bench_ops.py --json outputs")
    p.add_argument("--section", default=None, help="only this section (gemm, grouped, fp8, fp8_grouped)")
    p.add_argument("--baseline", default="torch_grouped_mm", help="the implementation x_baseline is against")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = []
    for f in args.files:
        with open(f) as fh:
            runs.append(json.load(fh))
    rows = aggregate(runs, args.section, args.baseline)
    print(f"# means of {len(runs)} runs: {', '.join(os.path.basename(f) for f in args.files)}")
    print_table(rows, ["section", "case", "impl", "ms", "n", "fastest", "x_baseline", "x_loop"])
    if args.json:
        write_json(args.json, rows, {"files": [os.path.basename(f) for f in args.files], "baseline": args.baseline})
    return 0


if __name__ == "__main__":
    sys.exit(main())
