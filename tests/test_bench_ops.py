"""benchmarks/bench_ops.py --dry-run --quick on CPU under the interpreter (sizes / 64, one round): every section
runs end to end through the dispatcher and our Triton kernels, with its baselines timed in the same group and the
ratios computed from them (the GPU run is the benchmark itself)."""
import json
import os

import pytest
import torch
from bench_utils import import_benchmark


def test_bench_ops_dry_run_every_section(tmp_path, monkeypatch):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU dry run (the GPU run is the benchmark itself)")
    bench_ops = import_benchmark("bench_ops")
    # one grouped case (8 experts): the 32-expert ones take the interpreter ~2 minutes more and run the same code
    monkeypatch.setattr(bench_ops, "GROUPED_QUICK", [(8, 1024)])
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--dry-run", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert set(by) == {"gemm", "grouped", "fp8", "fp8_grouped", "overhead"}
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
    impls = {(r["section"], r["impl"]) for r in rows}
    for need in (("gemm", "triton"), ("grouped", "triton"), ("grouped", "loop"), ("fp8", "mm_triton"),
                 ("fp8_grouped", "mm_triton"), ("fp8_grouped", "bf16_triton"), ("fp8_grouped", "e2e_weights_cached")):
        assert need in impls, need
    # every ratio is against a baseline row the JSON holds, of the same section and case (timed in the same
    # interleaved group): x_baseline == that row's time / this row's (FP8 dense once kept one bf16 row for all
    # granularities while each group's ratios divided by its own re-timed bf16)
    for r in rows:
        if r.get("x_baseline") is None:
            continue
        key = "ms" if "ms" in r else "host_us"
        base = [b for b in rows if (b["section"], b["case"], b["impl"]) == (r["section"], r["case"], r["baseline"])]
        assert len(base) == 1, (r["section"], r["case"], r["impl"], r["baseline"])
        assert r["x_baseline"] == pytest.approx(base[0][key] / r[key]), (r["section"], r["case"], r["impl"])
        if "baseline_ms" in r:
            assert r["baseline_ms"] == base[0]["ms"]
    assert {r["case"] for r in by["fp8"] if r["impl"] == "bf16_cublas"} == {r["case"] for r in by["fp8"]}
    # FP8 grouped: each case's rows start with its bf16 baseline, timed in the same group, and every FP8 row's
    # ratio is against that baseline's time
    cases = {}
    for r in by["fp8_grouped"]:
        cases.setdefault(r["case"], []).append(r)
    for case, rs in cases.items():
        base = rs[0]
        assert base["impl"].startswith("bf16_"), case
        for r in rs[1:]:
            assert r["baseline"] == base["impl"] and r["x_baseline"] == pytest.approx(base["ms"] / r["ms"]), case
    # grouped: fwd and bwd per case; the ratio to torch's grouped mm, which cannot run on CPU, is left empty (not
    # faked), the ratio to the per-expert loop is there
    assert {r["phase"] for r in by["grouped"]} == {"fwd", "bwd"}
    assert all(r["x_baseline"] is None and r["x_loop"] > 0 for r in by["grouped"])
    # the dispatcher's default: what it ran is named, and how it compares with the forced backends is computed
    # from the same group's times
    for r in by["grouped"]:
        assert r["default_backend"] in ("triton", "loop"), r
        assert r["choice_vs_best"] is not None and 0 < r["choice_vs_best"] <= 1.0


def test_default_fields_separate_choice_from_noise():
    bench_ops = import_benchmark("bench_ops")
    label_of = {"torch": "torch_grouped_mm", "triton": "triton"}
    # the default ran triton, the fastest backend, but its own label timed 5% slower: the choice was right,
    # the gap is the second timing of one kernel (noise + dispatch)
    res = {"torch_grouped_mm": 1.2, "triton": 1.0, "default": 1.05}
    f = bench_ops._default_fields(res, "default", "triton", label_of)
    assert f["choice_vs_best"] == pytest.approx(1.0)
    assert f["default_vs_best"] == pytest.approx(1.0 / 1.05)
    assert f["default_over_chosen"] == pytest.approx(1.05)
    # a wrong choice shows in choice_vs_best; labels that are not backends (variants, the loop baseline when not
    # in label_of) never count as "best"
    res = {"torch_grouped_mm": 1.2, "triton": 1.0, "default": 1.2, "triton_ptr": 0.5}
    f = bench_ops._default_fields(res, "default", "torch", label_of)
    assert f["choice_vs_best"] == pytest.approx(1.0 / 1.2)
    # a backend that failed (None) or a default that did not run leaves the fields empty, not guessed
    f = bench_ops._default_fields({"torch_grouped_mm": None, "triton": 1.0, "default": None}, "default", "torch",
                                  label_of)
    assert f == {"default_vs_best": None, "choice_vs_best": None, "default_over_chosen": None}
