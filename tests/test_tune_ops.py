"""benchmarks/tune_ops.py on CPU (--dry-run under the interpreter, tiny sizes): the grouped backward cases run
end to end, every forced config and the tuned default is checked against the fp32 reference and written."""
import json
import os

import pytest
import torch
from bench_utils import import_benchmark


def test_tune_ops_dry_run_grouped_backward(tmp_path):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU dry run (the GPU run is the tuning itself)")
    tune_ops = import_benchmark("tune_ops")
    out = tmp_path / "tune.json"
    cases = ["grouped_wgrad_G8_fc2", "grouped_dgrad_G8_fc2"]
    assert tune_ops.main(["--dry-run", "--cases", ",".join(cases), "--final-top", "1", "--candidates",
                          "32x32x32x4x1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for case in cases:
        kinds = {r["impl"]: r for r in rows if r["case"] == case}
        # the forced config (the TMA weight-gradient kernel / the grouped kernel on a transposed b) and the
        # tuned default, each checked against the fp32 per-expert reference
        for impl in ("32x32x32x4x1", "default (autotune)"):
            assert kinds[impl]["ok"] is True and kinds[impl]["rel_err"] < 2e-2, kinds[impl]
    assert "triton_pointer" in {r["impl"] for r in rows if r["case"] == "grouped_wgrad_G8_fc2"}



def test_tune_ops_dry_run_grouped_forward(tmp_path):
    """A forward case (fc2 experts): a forced config and the tuned default checked against the reference."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU dry run (the GPU run is the tuning itself)")
    tune_ops = import_benchmark("tune_ops")
    out = tmp_path / "tune.json"
    assert tune_ops.main(["--dry-run", "--cases", "grouped_bf16_G8_fc2", "--final-top", "1", "--candidates",
                          "32x32x32x4x1", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"] if r["case"] == "grouped_bf16_G8_fc2"}
    for impl in ("32x32x32x4x1", "default (autotune)"):
        assert rows[impl]["ok"] is True and rows[impl]["rel_err"] < 2e-2, rows[impl]


def test_rank_and_ratios_come_from_the_interleaved_rounds_only(monkeypatch):
    """A config left out of the interleaved final rounds keeps its first-pass time (ms_single) but gets no ms, rank
    or ratio: its single pass (timed alone, here faster than the winner's interleaved time) must not outrank the
    configs that were re-timed together with the baseline."""
    tune_ops = import_benchmark("tune_ops")
    monkeypatch.setattr(tune_ops, "DEVICE", "cpu")
    monkeypatch.setattr(tune_ops, "DRY", False)
    # configs 1, 2, 3 (impl names "1", "2", "3"), the baseline and the autotuned default: one output tensor each,
    # which the fake timer maps to that implementation's first-pass time
    single = {"base": 2.0, "1": 1.0, "2": 1.1, "3": 1.2, "default (autotune)": 1.5}
    outs = {name: torch.ones(4) for name in single}
    name_of = {id(t): name for name, t in outs.items()}
    monkeypatch.setattr(tune_ops, "_time_one", lambda fn, rep_ms: single[name_of[id(fn())]])
    final = {"base": 1.8, "1": 1.3, "default (autotune)": 1.4}  # the interleaved rounds: all slower than alone
    seen = []

    def fake_interleaved(fns, rounds, rep_ms):
        seen.append(sorted(fns))
        return {k: final[k] for k in fns}
    monkeypatch.setattr(tune_ops, "bench_interleaved", fake_interleaved)

    class Args:
        rep_ms, candidates, final_top, rounds = 1.0, "", 1, 3
    cfgs = [(1,), (2,), (3,)]
    rows = tune_ops.tune_case("case", 1e9, torch.ones(4), 1e-3, {"base": lambda: outs["base"]},
                              lambda: outs["default (autotune)"], cfgs, lambda cfg: outs[str(cfg[0])], Args, cfgs)
    assert seen == [sorted(final)]  # the best single pass, the baseline and the default, re-timed together
    by = {r["impl"]: r for r in rows}
    assert [(r["impl"], r["rank"]) for r in rows if r["rank"]] == [("1", 1), ("default (autotune)", 2), ("base", 3)]
    assert by["1"]["ms"] == 1.3 and by["1"]["x_base"] == pytest.approx(1.8 / 1.3) and by["1"]["final"]
    for k in ("2", "3"):  # timed once, alone: kept, not ranked or compared with the interleaved times
        assert by[k]["ms"] is None and by[k]["rank"] is None and by[k]["x_base"] is None and not by[k]["final"]
        assert by[k]["ms_single"] == single[k] and by[k]["ok"] is True
