"""launch/: the scripts force the NVLink-multicast guards (an inherited other value never survives) and pass
their arguments and settings on as documented. torchrun / mpirun / srun are replaced on PATH by stubs that
print what they were given, so nothing is launched."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARDS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STUB = """#!/usr/bin/env bash
echo "ARGS $*"
for v in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS; do echo "ENV $v=${!v-unset}"; done
"""


def _run(tmp_path, script, args, env_extra):
    for name in ("torchrun", "mpirun", "srun", "scontrol"):
        stub = tmp_path / name
        stub.write_text(STUB)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env_extra}
    res = subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=env, capture_output=True, text=True,
                         timeout=60)
    return res


def _env_lines(out):
    return dict(line[4:].split("=", 1) for line in out.splitlines() if line.startswith("ENV "))


# inherited values that would leave multicast on: NCCL reads an empty NCCL_NVLS_ENABLE as unset (NVLS on)
HOSTILE = {"NCCL_NVLS_ENABLE": "", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0", "NVSHMEM_DISABLE_NVLS": "0"}


def test_torchrun_forces_guards(tmp_path):
    res = _run(tmp_path, "torchrun.sh", ["2", "script.py", "--x", "1"], HOSTILE)
    assert res.returncode == 0, res.stderr
    assert _env_lines(res.stdout) == GUARDS
    assert "ARGS --standalone --nproc-per-node 2 script.py --x 1" in res.stdout


def test_mpirun_forces_guards_and_forwards_settings(tmp_path):
    res = _run(tmp_path, "mpirun.sh", ["4", "script.py", "a"],
               {**HOSTILE, "TURBO_DIST_SHMEM": "torch", "NCCL_DEBUG": "WARN", "UNRELATED_VAR": "1"})
    assert res.returncode == 0, res.stderr
    assert _env_lines(res.stdout) == GUARDS
    args = res.stdout.splitlines()[0].split()
    assert args[args.index("-np") + 1] == "4"
    forwarded = {args[i + 1] for i, a in enumerate(args) if a == "-x"}
    assert {"TURBO_DIST_SHMEM", "NCCL_DEBUG", *GUARDS} <= forwarded and "UNRELATED_VAR" not in forwarded
    assert args[-3:] == [str(ROOT / "launch" / "mpi_bootstrap.py"), "script.py", "a"]


@pytest.mark.parametrize("bad", [["script.py"], ["four", "script.py"]])
def test_mpirun_usage_error(tmp_path, bad):
    res = _run(tmp_path, "mpirun.sh", bad, {})
    assert res.returncode == 2 and "usage: launch/mpirun.sh NPROC script.py" in res.stderr


def test_slurm_forces_guards(tmp_path):
    res = _run(tmp_path, "slurm.sbatch", ["bench.py"],
               {**HOSTILE, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7"})
    assert res.returncode == 0, res.stderr
    assert _env_lines(res.stdout) == GUARDS
    srun = res.stdout.splitlines()[0]
    assert srun.startswith("ARGS --export=ALL torchrun --nnodes 2 ") and srun.endswith(" --rdzv-id 7 bench.py")
