"""Triton's compiler on our kernels, for sm_90, without a GPU (tests/_sm90_compile.py): catches programs the
interpreter runs but Triton's compiler refuses, before a GPU run does."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_sm90_compile.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


def test_kernels_compile_for_sm90():
    probe = subprocess.run([sys.executable, SCRIPT, "--probe"], env=_env(), capture_output=True, text=True,
                           timeout=120)
    if probe.returncode == 2:
        pytest.skip(f"this Triton cannot compile for sm_90 here: {probe.stdout.strip()[-300:]}")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    sys.path.insert(0, HERE)
    import _sm90_compile

    # one process per core, each compiling a share of the kernels (a cold compile of all takes minutes on one)
    names = sorted(_sm90_compile.KERNELS)
    n = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, SCRIPT, *names[i::n]], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    stdout = "".join(o for o, _ in outs)
    assert all(p.returncode == 0 for p in procs), stdout + "".join(e[-4000:] for _, e in outs)
    ok = sorted(ln.split(":")[0] for ln in stdout.splitlines() if ln.endswith(")") and ": ok (" in ln)
    assert ok == names, stdout


def test_low_latency_wait_traps_in_its_ptx():
    """The low-latency wait's traps (a timeout inside a CUDA graph replay, or a replay finding an earlier timeout's
    record) are compiled in behind its runtime `trap` argument: the eager and the captured launches share one
    binary; with a rank mask there is none."""
    probe = subprocess.run([sys.executable, SCRIPT, "--probe"], env=_env(), capture_output=True, text=True,
                           timeout=120)
    if probe.returncode == 2:
        pytest.skip(f"this Triton cannot compile for sm_90 here: {probe.stdout.strip()[-300:]}")
    out = subprocess.run([sys.executable, SCRIPT, "--count", "trap;", "ll_wait_stats", "ll_wait_stats_mask"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = dict(ln.split(": ", 1) for ln in out.stdout.splitlines() if ": ok (" in ln)
    n = int(lines["ll_wait_stats"].rsplit("x", 1)[1].rstrip(")"))
    assert n >= 2, out.stdout  # on a timeout, and on entry when an earlier (eager) timeout left the record set
    assert "'trap;' x0" in lines["ll_wait_stats_mask"], out.stdout  # a rank mask shrinks instead: never traps
