"""Shared-GPU test mode (turbo_dist.testing, TURBO_DIST_TEST_SHARE_GPU): ranks over gloo on one GPU.

The GPU tests force the mode (`share_gpu=True`), so they run on a one-GPU machine with or without
the variable: several processes rendezvous torch symmetric memory on the same device, write and read
each other's buffers through the IPC mappings and signal each other with the Triton peer-pointer
kernels, with no host barrier between a signal and its wait (progress comes from GPU time-slicing).
The CPU tests check the launch decisions and the errors of the mode.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

from turbo_dist import get_runtime, testing
from turbo_dist.kernels import tp_signal
from turbo_dist.runtime import Runtime
from turbo_dist.runtime.config import SHARE_GPU_VAR
from turbo_dist.testing import run_distributed

from dist_utils import rank_device
from test_runtime import _symm_buffer

WAIT_S = 30.0


def _peer_write_read(rank, world_size, rounds):
    rt = get_runtime()
    assert rt.shares_gpu and rt.backend == "gloo"
    assert rt.device == torch.device("cuda", torch.cuda.current_device()) == rank_device()
    assert rt.shmem_backend == "torch" and rt.has_peer_access
    data = rt.symm_buffer("share_gpu.data", world_size * 64 * 4)
    sig = rt.symm_buffer("share_gpu.sig", 64 * 4)
    ptrs = data.peer_ptrs.tolist()
    assert len(set(ptrs)) == world_size, f"peers' buffers must be distinct mappings, got {ptrs}"
    pad = sig.local(torch.int32, (64,))
    err = torch.zeros(tp_signal.ERR_NUMEL, dtype=torch.int32, device=rt.device)
    torch.cuda.synchronize()
    rt.barrier()  # the allocations' zeroing is done on every rank before peers write
    mine = data.local(torch.float32, (world_size, 64))
    waits = []
    for epoch in range(1, rounds + 1):
        # Copy kernels write row `rank` of every rank's buffer through the IPC mappings...
        for peer in range(world_size):
            data.peer(peer, torch.float32, (world_size, 64))[rank].fill_(epoch * 1000 + rank * 10 + peer)
        # ...then a Triton kernel raises flag `rank` in every rank's pad through peer_ptrs (release, system
        # scope), and this rank waits on the GPU for every peer's flag: no host synchronisation in between.
        tp_signal.put_signal(sig.peer_ptrs, rank, epoch, 0, world_size, world_size)
        t0 = time.perf_counter()
        tp_signal.wait_signal(pad, err, 0, epoch, 0, world_size, world_size, WAIT_S)
        torch.cuda.synchronize()
        waits.append(time.perf_counter() - t0)
        failed = tp_signal.describe_error(err.tolist(), WAIT_S)
        assert failed is None, f"rank {rank}, round {epoch}: {failed}"
        expect = torch.tensor([[float(epoch * 1000 + src * 10 + rank)] * 64 for src in range(world_size)],
                              device=rt.device)
        assert torch.equal(mine, expect), f"rank {rank}, round {epoch}: peers' writes did not land"
        for peer in range(world_size):  # read back, through the peer's mapping, what this rank wrote there
            row = data.peer(peer, torch.float32, (world_size, 64))[rank]
            assert torch.equal(row, torch.full_like(row, float(epoch * 1000 + rank * 10 + peer)))
        rt.barrier()  # everyone has checked this round before anyone overwrites it
    return max(waits)


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_gpu_symm_peer_write_read(world_size):
    waits = run_distributed(_peer_write_read, world_size, args=(3,), share_gpu=True)
    assert len(waits) == world_size
    print(f"shared GPU, {world_size} ranks: longest signal wait {max(waits) * 1e3:.2f} ms")


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_gpu_runtime_symm_buffer(world_size):
    # test_runtime's body (growth, caps, every pair's peer write/read) on ranks that share a GPU.
    assert run_distributed(_symm_buffer, world_size, share_gpu=True) == ["peer"] * world_size


# ----------------------------------------------------------------------------------- CPU checks
def test_resolve_launch(monkeypatch):
    def launch(world, gpus, var=None, **kw):
        monkeypatch.setattr(testing, "_num_gpus", lambda: gpus)
        if var is None:
            monkeypatch.delenv(SHARE_GPU_VAR, raising=False)
        else:
            monkeypatch.setenv(SHARE_GPU_VAR, var)
        return testing.resolve_launch(world, **kw)

    assert launch(2, 1) == ("gloo", False)  # without the variable: gloo on CPU, as always
    assert launch(1, 1) == ("nccl", False)
    assert launch(2, 1, "0") == ("gloo", False)
    assert launch(2, 1, "1") == ("gloo", True)  # fewer GPUs than ranks: share them
    assert launch(4, 2, "1") == ("gloo", True)
    assert launch(2, 2, "1") == ("nccl", False)  # a GPU per rank: the real thing
    assert launch(2, 0, "1") == ("gloo", False)  # no GPU: the CPU tests, unchanged
    assert launch(2, 1, "1", backend="gloo") == ("gloo", False)  # an explicit backend wins over the variable
    assert launch(2, 4, share_gpu=True) == ("gloo", True)
    assert launch(2, 1, "1", share_gpu=False) == ("gloo", False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        launch(2, 0, share_gpu=True)
    with pytest.raises(ValueError, match="over gloo"):
        launch(2, 1, share_gpu=True, backend="nccl")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        launch(2, 1, "2")


def _mode_in_rank(rank, world_size):
    inherited = os.environ.get(SHARE_GPU_VAR)
    assert rank_device() == torch.device("cpu") and not get_runtime().shares_gpu
    os.environ[SHARE_GPU_VAR] = "1"
    try:
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA is not available"):
                Runtime(dist.group.WORLD)
        else:
            os.environ.pop("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", None)
            with pytest.raises(RuntimeError, match="TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1"):
                Runtime(dist.group.WORLD)
    finally:
        os.environ.pop(SHARE_GPU_VAR, None)
    return inherited


@pytest.mark.dist
def test_explicit_gloo_ignores_the_variable(monkeypatch):
    # The parent has the variable; ranks launched with an explicit gloo backend must not inherit the mode.
    monkeypatch.setenv(SHARE_GPU_VAR, "1")
    assert run_distributed(_mode_in_rank, 2, backend="gloo", env={"TURBO_DIST_TEST_POOL": "share_gpu"}) == [None] * 2
