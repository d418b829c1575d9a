"""benchmarks/bench_async_tp.py --cpu on 2 gloo ranks: every op's rows (incl. the column layer's forward + backward
against Megatron's NCCL schedule) are computed, checked against the sequential reference and written to JSON.
CPU times mean nothing; the layer's saved activation is a size, the same on any machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.dist
def test_bench_async_tp_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU check; with GPUs run the benchmark itself under torchrun")
    out = tmp_path / "tp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(_ROOT, "benchmarks", "bench_async_tp.py"), "--cpu", "--hidden", "64", "--ffn", "128",
         "--tokens", "32", "--rep-ms", "1", "--algos", "collective,auto", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=_ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert not doc["meta"]["errors"], doc["meta"]["errors"]
    rows = {(r["op"], r["impl"]): r for r in doc["rows"]}
    for op in ("ag_gemm", "gemm_rs", "col_layer"):
        for impl in ("sequential", "gemm_alone", "comm_alone", "ours_collective", "ours_auto"):
            assert rows[(op, impl)]["ms"] > 0, (op, impl)
        for impl in ("ours_collective", "ours_auto"):
            assert rows[(op, impl)]["rel_err"] < 1e-2, (op, impl, rows[(op, impl)]["rel_err"])
            assert rows[(op, impl)]["algo"] == "collective"  # gloo: no peer access
    # the layer keeps the input shard's worth of activation: [tokens / 2, hidden] bf16, what Megatron's keeps (the
    # sequential row states that size by construction; ours are measured by autograd's saved-tensor hooks)
    shard_mb = 32 // 2 * 64 * 2 / 2 ** 20
    for impl in ("ours_collective", "ours_auto"):
        assert rows[("col_layer", impl)]["saved_mb"] == pytest.approx(shard_mb), impl
    assert rows[("col_layer", "sequential")]["M"] == 32 and rows[("col_layer", "sequential")]["N"] == 128
