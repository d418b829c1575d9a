"""The training examples run end to end on spawned gloo ranks and their loss goes down."""
import os
import re
import sys

import pytest

from dist_utils import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["moe_layer.py", "tp_mlp.py"])
def test_example_trains(script):
    proc = run_script([sys.executable, os.path.join(ROOT, "examples", script), "--world-size", "2", "--steps", "8"],
                      timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.eE+-]+)", proc.stdout, re.M)]
    assert len(losses) >= 8, proc.stdout  # every step of rank 0 is reported
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    assert "world 2 (cpu, fp32" in proc.stdout


def test_moe_example_fp8_blockwise():
    """The MoE layer with FP8 blockwise experts (padded to 128 rows per expert) trains too; on the CPU the FP8
    GEMMs run on the reference backend, and the run says so."""
    proc = run_script([sys.executable, os.path.join(ROOT, "examples", "moe_layer.py"), "--world-size", "2",
                       "--steps", "6", "--hidden", "128", "--ffn", "128", "--fp8", "blockwise"],
                      timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.eE+-]+)", proc.stdout, re.M)]
    assert len(losses) >= 6 and losses[-1] < losses[0], proc.stdout
    assert "fp8 blockwise" in proc.stdout and "grouped_scaled_mm=reference" in proc.stdout, proc.stdout
