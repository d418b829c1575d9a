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
