"""benchmarks/bench_integrations.py --cpu-check on 2 gloo ranks: the benchmark's whole logic (build each
framework's MoE layer both ways, same weights, correctness check, interleaved timing, table, JSON) at tiny
sizes. Megatron's default (alltoall) row must be skipped with its reason on CPU, not faked."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

_HAVE = all(importlib.util.find_spec(m) is not None for m in ("megatron", "torchtitan"))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.dist
@pytest.mark.skipif(not _HAVE, reason="needs megatron-core and torchtitan (pip install -e '.[megatron,torchtitan]')")
def test_bench_integrations_cpu_check(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU check; with GPUs run the benchmark itself under torchrun")
    out = tmp_path / "integrations.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "benchmarks", "bench_integrations.py"), "--cpu-check", "--nproc", "2",
         "--framework", "both", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "times mean nothing" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["meta"]["cpu_check"] and not doc["meta"]["times_meaningful"] and doc["meta"]["complete"]
    assert "bench_integrations.py" in doc["command"] and "torch" in doc["machine"]
    rows = {(r["framework"], r["path"]): r for r in doc["rows"]}
    assert set(rows) == {("megatron", "default"), ("megatron", "turbo_dist"), ("torchtitan", "default"),
                         ("torchtitan", "turbo_dist")}
    skipped = rows[("megatron", "default")]
    assert skipped["ms"] is None and "torch.cuda.Stream" in skipped["note"]
    assert "megatron/default skipped" in proc.stdout
    assert rows[("megatron", "turbo_dist")]["checked_vs"] == "reference"
    assert rows[("torchtitan", "turbo_dist")]["checked_vs"] == "default"
    assert rows[("torchtitan", "default")]["ms"] > 0
    for fw in ("megatron", "torchtitan"):
        r = rows[(fw, "turbo_dist")]
        assert r["ms"] > 0 and r["check"] == "ok"
        assert "turbo_dist" in r["impl"] and r["ep"] == 2
        assert 0 <= r["rel_err_out"] <= doc["meta"]["tol"] and 0 <= r["rel_err_dx"] <= doc["meta"]["tol"]
    assert rows[("torchtitan", "turbo_dist")]["vs_default"] > 0
    assert "vs_default" not in rows[("megatron", "turbo_dist")]  # no default time to compare with on CPU
