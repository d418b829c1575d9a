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
    assert a_tr["x_baseline"] == pytest.approx(1.1 / 0.9) and a_tr["x_loop"] == pytest.approx(1.2 / 0.9)
    assert ("grouped", "A", "default") not in rows
    b = rows[("grouped", "B", "triton")]  # no baseline, no loop in that case: ratios left empty, not guessed
    assert b["n"] == 1 and b["x_baseline"] is None and b["x_loop"] is None
    assert rows[("gemm", "A", "triton")]["ms"] == 9.0
    assert {r["section"] for r in agg.aggregate(runs, section="grouped")} == {"grouped"}


def test_cli_on_the_committed_runs(tmp_path, capsys):
    """The five H200 runs README's grouped means come from: fc1 forward at 32 x 256 tokens per expert, ours 1.18x
    the per-expert loop on the means."""
    agg = import_benchmark("aggregate_ops")
    names = [f"ops_grouped_{k}_h200.json" for k in ("rule512", "shuffled", "choice", "fc1rule1", "fc1rule2")]
    files = [os.path.join(BENCH_DIR, "results", n) for n in names]
    out = tmp_path / "means.json"
    assert agg.main([*files, "--section", "grouped", "--json", str(out)]) == 0
    rows = {(r["case"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    r = rows[("G32_t256_fc1_fwd", "triton")]
    assert r["n"] == 5 and r["fastest"] == "triton" and r["x_loop"] == pytest.approx(1.184, abs=2e-3)
    assert "means of 5 runs" in capsys.readouterr().out
