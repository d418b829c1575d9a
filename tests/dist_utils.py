"""Helpers shared by the multi-rank tests (importable from rank processes: tests/ is on sys.path)."""

import torch
import torch.distributed as dist

from turbo_dist.runtime.config import share_gpu_mode
from turbo_dist.testing import saved_activations


def rank_device():
    """The device a rank computes on: its GPU under NCCL or in the shared-GPU test mode (gloo with
    TURBO_DIST_TEST_SHARE_GPU=1, set by run_distributed), the CPU under plain gloo. Matches Runtime.device."""
    if dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        if "nccl" in backend or ("gloo" in backend and share_gpu_mode()):
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_gpu():
    return rank_device().type == "cuda"


def seeded(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def backend_switch(ops):
    """(autouse fixture, use) for a test module about dispatcher `ops`: `use(name)` forces backend `name` of
    every op (None: automatic), and the fixture puts them back to automatic after each test. Bind both at
    module level: `_reset_backends, use = backend_switch(OPS)`."""
    import pytest

    from turbo_dist.ops import dispatcher

    def use(name):
        for op in ops:
            dispatcher.set_backend(op, name)

    @pytest.fixture(autouse=True)
    def reset():
        yield
        use(None)

    return reset, use


def run_script(cmd, timeout, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own: on a timeout the whole process
    group is killed (the script's spawned ranks too, which subprocess.run would leave running), then it raises.
    The child's own harness timeout is set below `timeout`, so a hung rank reports itself first."""
    import os
    import signal
    import subprocess

    env = dict(kwargs.pop("env", None) or os.environ)
    env.setdefault("TURBO_DIST_TEST_TIMEOUT_S", str(max(30, int(timeout * 0.8))))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s (process group killed):\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def saved_activation_numel(fn, params=()):
    """(fn()'s result, elements of the tensors autograd saves for fn's backward, parameters excluded)."""
    out, numel, _ = saved_activations(fn, params)
    return out, numel
