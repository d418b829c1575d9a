"""benchmarks/aggregate_ops.py: means over several bench_ops runs (the README's multi-run grouped figures)."""
import json
import os

import pytest
from bench_utils import BENCH_DIR, import_benchmark


def _run(*rows):
    return {"rows": [dict(section="grouped", case=c, impl=i, ms=ms) for c, i, ms in rows]}


def test_means_fastest_and_ratios():
    agg = import_benchmark("aggregate_ops")
    runs = [_run(("A", "torch_grouped_mm", 1.0), ("A", "triton", 0.8), ("A", "loop", 1.2), ("B", "triton", 2.0)),
            _run(("A", "torch_grouped_mm", 1.2), ("A", "triton", 1.0), ("A", "loop", 1.2)),
            {"rows": [dict(section="gemm", case="A", impl="triton", ms=9.0),  # another section: kept apart
                      dict(section="grouped", case="A", impl="default", ms=None)]}]  # a failed label: not counted
    rows = {(r["section"], r["case"], r["impl"]): r for r in agg.aggregate(runs)}
    a_tr = rows[("grouped", "A", "triton")]
    assert a_tr["ms"] == pytest.approx(0.9) and a_tr["n"] == 2 and a_tr["fastest"] == "triton"
    # ratios: the mean of each run's own ratio (1.0 / 0.8 and 1.2 / 1.0), not a ratio of the means
    assert a_tr["x_baseline"] == pytest.approx((1.0 / 0.8 + 1.2 / 1.0) / 2) and a_tr["n_paired"] == 2
    assert a_tr["x_loop"] == pytest.approx((1.2 / 0.8 + 1.2 / 1.0) / 2)
    assert ("grouped", "A", "default") not in rows
    b = rows[("grouped", "B", "triton")]  # no baseline, no loop in that case: ratios left empty, not guessed
    assert b["n"] == 1 and b["x_baseline"] is None and b["x_loop"] is None and b["n_paired"] == 0
    assert rows[("gemm", "A", "triton")]["ms"] == 9.0
    assert {r["section"] for r in agg.aggregate(runs, section="grouped")} == {"grouped"}


def test_unpaired_runs_and_mixed_defaults():
    """A label timed in a run without the baseline adds to its mean time but to no ratio; a default that ran
    different backends in different runs is not averaged into one number: one row per backend, flagged."""
    agg = import_benchmark("aggregate_ops")

    def run(backend, *rows):
        doc = _run(*rows)
        for r in doc["rows"]:
            r["default_backend"] = backend
        return doc
    runs = [run("torch", ("A", "torch_grouped_mm", 1.0), ("A", "triton", 0.9), ("A", "default", 1.0)),
            run("triton", ("A", "triton", 0.5), ("A", "default", 0.5)),  # no baseline in this run
            run("triton", ("A", "torch_grouped_mm", 1.2), ("A", "triton", 1.0), ("A", "default", 1.0))]
    rows = {r["impl"]: r for r in agg.aggregate(runs)}
    tr = rows["triton"]
    assert tr["n"] == 3 and tr["ms"] == pytest.approx(0.8)
    assert tr["n_paired"] == 2 and tr["x_baseline"] == pytest.approx((1.0 / 0.9 + 1.2 / 1.0) / 2)
    assert "default" not in rows and "mixed_default" not in tr
    by_torch, by_triton = rows["default (torch)"], rows["default (triton)"]
    assert by_torch["n"] == 1 and by_torch["ms"] == 1.0 and by_torch["x_baseline"] == pytest.approx(1.0)
    assert by_triton["n"] == 2 and by_triton["ms"] == pytest.approx(0.75) and by_triton["n_paired"] == 1
    assert by_triton["x_baseline"] == pytest.approx(1.2) and by_triton["default_backend"] == "triton"
    assert by_torch["mixed_default"] and by_triton["mixed_default"]
    # the same backend in every run: one row, not flagged
    rows = {r["impl"]: r for r in agg.aggregate(runs[1:])}
    assert rows["default"]["n"] == 2 and rows["default"]["mixed_default"] is False


def test_cli_on_the_committed_runs(tmp_path, capsys):
    """The five H200 runs README's grouped means come from: fc1 forward at 32 x 256 tokens per expert, ours 1.18x
    the per-expert loop (the mean of the per-run ratios; the ratio of the mean times, the method before, gave the
    same 1.184)."""
    agg = import_benchmark("aggregate_ops")
    names = [f"ops_grouped_{k}_h200.json" for k in ("rule512", "shuffled", "choice", "fc1rule1", "fc1rule2")]
    files = [os.path.join(BENCH_DIR, "results", n) for n in names]
    out = tmp_path / "means.json"
    assert agg.main([*files, "--section", "grouped", "--json", str(out)]) == 0
    rows = {(r["case"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    r = rows[("G32_t256_fc1_fwd", "triton")]
    assert r["n"] == 5 and r["fastest"] == "triton" and r["x_loop"] == pytest.approx(1.184, abs=2e-3)
    assert "means of 5 runs" in capsys.readouterr().out
