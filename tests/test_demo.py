"""README's main-job command runs end to end (CPU: spawned gloo ranks) and its checks pass."""
import os
import sys

import pytest

from dist_utils import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("nproc", [2, 4])
def test_demo_runs_and_checks_pass(nproc):
    if nproc == 4 and os.cpu_count() < 2:
        pytest.skip("needs 2 cores")
    proc = run_script([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--nproc", str(nproc)],
                      timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"{nproc} ranks, gloo backend" in out
    assert "all checks passed" in out
    for step in ("moe", "async-tp", "cp-ring", "cp-a2a", "cp-allgather"):
        assert f"\n{step} " in out, out
    assert "FAIL" not in out
