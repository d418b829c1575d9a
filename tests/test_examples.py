"""The training examples run end to end on spawned gloo ranks and their loss goes down."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["moe_layer.py", "tp_mlp.py"])
def test_example_trains(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--world-size", "2",
                           "--steps", "8"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.eE+-]+)", proc.stdout, re.M)]
    assert len(losses) >= 8, proc.stdout  # every step of rank 0 is reported
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    assert "world 2 (cpu, fp32" in proc.stdout
