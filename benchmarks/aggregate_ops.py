"""Means over several runs of benchmarks/bench_ops.py: on this power-capped GPU one case's times move by up to
~5% between runs with nothing changed, so ratios that close are read from several runs (README quotes such means).

    python benchmarks/aggregate_ops.py benchmarks/results/ops_grouped_{rule512,shuffled,choice,fc1rule1,fc1rule2}_h200.json \
        [--section grouped] [--baseline torch_grouped_mm] [--json means.json]

Per (section, case): each implementation's mean time over the runs that have it (and how many), the fastest
implementation on those means, and every implementation's speed-up over `--baseline` and over the per-group loop
(`loop`, where the section has one): the mean of the per-run ratios over the runs that timed both (n_paired), so a
run that lacks one label does not pair one run's time with another's.
The dispatcher's default (labels `default`, `mm_default`) is only averaged over runs where it ran the same backend
(the rows' `default_backend`): where the runs disagree, one row per backend, `default (<backend>)`, each flagged
`mixed_default` (a mean of two kernels' times describes neither).
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_json  # noqa: E402

DEFAULT_LABELS = ("default", "mm_default")  # what the dispatcher chose; the other labels force one backend


def _per_run(runs, section):
    """[{(section, case): {impl: (ms, default_backend)}}], one dict per run."""
    out = []
    for doc in runs:
        run = {}
        for r in doc["rows"]:
            if section and r.get("section") != section or not r.get("ms"):
                continue
            run.setdefault((r["section"], r["case"]), {})[r["impl"]] = (r["ms"], r.get("default_backend"))
        out.append(run)
    return out


def _mean_ratio(pairs):
    ratios = [num / den for num, den in pairs]
    return (statistics.mean(ratios) if ratios else None), len(ratios)


def aggregate(runs, section=None, baseline="torch_grouped_mm"):
    """runs: bench_ops JSON documents ({"rows": [...]}) -> one row per (case, impl) with the mean ms over the runs
    that timed it, n (that count), fastest (the case's fastest impl on the means), x_baseline and x_loop (means of
    the per-run ratios over the n_paired / n_paired_loop runs that timed both; None where no run has both), and
    for a default label its backend (default_backend) and mixed_default (the runs' defaults ran different backends:
    then one row per backend)."""
    per_run = _per_run(runs, section)
    keys = []
    for run in per_run:
        keys += [k for k in run if k not in keys]
    out = []
    for key in keys:
        series = {}  # label -> [(run index, ms)]
        backends = {}  # default label -> {run index: backend}
        for i, run in enumerate(per_run):
            for impl, (ms, backend) in run.get(key, {}).items():
                series.setdefault(impl, []).append((i, ms))
                if impl in DEFAULT_LABELS:
                    backends.setdefault(impl, {})[i] = backend
        labels = {}  # output label -> (impl, [(run, ms)], default_backend, mixed)
        for impl, ts in series.items():
            seen = sorted({b for b in backends.get(impl, {}).values()}, key=str)
            if impl in DEFAULT_LABELS and len(seen) > 1:
                for b in seen:
                    labels[f"{impl} ({b})"] = (impl, [(i, ms) for i, ms in ts if backends[impl][i] == b], b, True)
            else:
                labels[impl] = (impl, ts, seen[0] if seen else None, False if impl in DEFAULT_LABELS else None)
        means = {label: statistics.mean(ms for _, ms in v[1]) for label, v in labels.items()}
        fastest = min(means, key=means.get)
        base, loop = dict(series.get(baseline, [])), dict(series.get("loop", []))
        for label, (impl, ts, backend, mixed) in labels.items():
            x_base, n_base = _mean_ratio([(base[i], ms) for i, ms in ts if i in base])
            x_loop, n_loop = _mean_ratio([(loop[i], ms) for i, ms in ts if i in loop])
            row = {"section": key[0], "case": key[1], "impl": label, "ms": means[label], "n": len(ts),
                   "fastest": fastest, "x_baseline": x_base, "n_paired": n_base, "x_loop": x_loop,
                   "n_paired_loop": n_loop}
            if impl in DEFAULT_LABELS:
                row.update(default_backend=backend, mixed_default=mixed)
            out.append(row)
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
    print_table(rows, ["section", "case", "impl", "ms", "n", "fastest", "x_baseline", "n_paired", "x_loop",
                       "default_backend", "mixed_default"])
    mixed = sorted({(r["section"], r["case"]) for r in rows if r.get("mixed_default")})
    if mixed:
        print(f"\n# the default ran different backends across runs (split by backend) in: "
              f"{', '.join(f'{s} {c}' for s, c in mixed)}")
    if args.json:
        write_json(args.json, rows, {"files": [os.path.basename(f) for f in args.files], "baseline": args.baseline,
                                     "ratios": "mean of per-run ratios over the runs that timed both labels"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
