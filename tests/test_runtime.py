import os

import pytest
import torch
import torch.distributed as dist

import turbo_dist
from turbo_dist import get_runtime
from turbo_dist.runtime import EventOverlap, apply_safety_env
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device


def test_get_runtime_without_init_raises():
    if dist.is_initialized():
        pytest.skip("process group already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        get_runtime()


def test_safety_env_forced(caplog):
    guards = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert apply_safety_env({}) == guards
    # an inherited other value (an empty NCCL_NVLS_ENABLE reads as unset: NVLS on) is replaced, with a warning
    with caplog.at_level("WARNING", logger="turbo_dist"):
        env = apply_safety_env({"NCCL_NVLS_ENABLE": "", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0", "OTHER": "x"})
    assert env == {**guards, "OTHER": "x"}
    assert "TORCH_SYMM_MEM_DISABLE_MULTICAST='0' overridden" in caplog.text


def test_event_overlap_cpu_noop():
    ev = EventOverlap()
    with ev:
        pass
    ev.current_stream_wait()
    assert ev.query()


def _runtime_basics(rank, world_size):
    rt = get_runtime()
    assert rt is get_runtime(), "runtime must be cached per group"
    assert (rt.rank, rt.world_size) == (rank, world_size)
    assert rt.device == rank_device()
    assert rt.num_nodes * rt.local_world_size == world_size
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    rt.barrier()
    return rt.local_world_size, rt.num_nodes, rt.node_rank, rt.local_rank, rt.shmem_backend


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_runtime_basics(world_size):
    results = run_distributed(_runtime_basics, world_size)
    for rank, (lws, nodes, node_rank, local_rank, shmem) in enumerate(results):
        assert (lws, nodes) == (world_size, 1)
        assert (node_rank, local_rank) == (0, rank)
        assert shmem == ("torch" if torch.cuda.is_available() else "none")


def _ranks_per_node(rank, world_size):
    rt = get_runtime()
    return rt.local_world_size, rt.num_nodes, rt.node_rank, rt.local_rank


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(4))
def test_ranks_per_node_override(world_size):
    results = run_distributed(_ranks_per_node, world_size, env={"TURBO_DIST_RANKS_PER_NODE": "2"})
    assert results == [(2, 2, r // 2, r % 2) for r in range(world_size)]


def _subgroup_topology(rank, world_size):
    out = {}
    for ranks in ([0, 2], [1, 2], [0, 1], [2, 3], [0, 1, 2]):
        g = dist.new_group(ranks)  # collective: every rank creates every group
        if rank in ranks:
            rt = get_runtime(g)
            out[tuple(ranks)] = (rt.num_nodes, rt.local_world_size, rt.node_rank, rt.local_rank)
    return out


@pytest.mark.dist
def test_subgroup_topology_follows_global_ranks():
    """Nodes hold consecutive global ranks (2 per node here): a subgroup's topology is its members' nodes, not
    the environment's count applied to its own numbering; an irregular group gets one rank per node."""
    got = run_distributed(_subgroup_topology, 4, env={"TURBO_DIST_RANKS_PER_NODE": "2"})
    assert got[0][(0, 2)] == (2, 1, 0, 0) and got[2][(0, 2)] == (2, 1, 1, 0)
    assert got[1][(1, 2)] == (2, 1, 0, 0) and got[2][(1, 2)] == (2, 1, 1, 0)
    assert got[0][(0, 1)] == (1, 2, 0, 0) and got[1][(0, 1)] == (1, 2, 0, 1)
    assert got[2][(2, 3)] == (1, 2, 0, 0) and got[3][(2, 3)] == (1, 2, 0, 1)
    assert [got[r][(0, 1, 2)] for r in range(3)] == [(3, 1, r, 0) for r in range(3)]  # 2 + 1: irregular


def _subgroups(rank, world_size):
    evens = dist.new_group([0, 2])
    odds = dist.new_group([1, 3])
    mine = evens if rank % 2 == 0 else odds
    rt = get_runtime(mine)
    assert rt is not get_runtime()
    assert rt.world_size == 2 and rt.rank == rank // 2
    buf = rt.symm_buffer("sub", 64)
    buf.local(torch.int32, (16,)).fill_(rank)
    rt.barrier()
    other = 1 - rt.rank
    if rt.has_peer_access:
        seen = buf.peer(other, torch.int32, (16,)).clone()
        expect = rank + (2 if other > rt.rank else -2)
        assert torch.equal(seen, torch.full_like(seen, expect))
    rt.barrier()
    return rt.rank


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(4))
def test_runtime_per_subgroup(world_size):
    assert run_distributed(_subgroups, world_size) == [0, 0, 1, 1]


def _symm_buffer(rank, world_size):
    rt = get_runtime()
    buf = rt.symm_buffer("t", 1000)
    assert buf.nbytes >= 1000
    assert rt.symm_buffer("t", 10) is buf, "a smaller request must reuse the buffer"
    local = buf.local(torch.float32, (250,))
    local.copy_(torch.arange(250, dtype=torch.float32) + 1000 * rank)
    with pytest.raises(ValueError, match="needs"):
        buf.local(torch.float32, (buf.nbytes,))
    # Sizes that differ across ranks are refused on every rank at once (a rank whose request fit would not join
    # the exchange of one that grows); then the same size grows the buffer on all.
    if world_size > 1:  # (one rank: nothing to differ from)
        with pytest.raises(ValueError, match=f"different sizes \\(5000 .. {5000 + world_size - 1} bytes\\)"):
            rt.symm_buffer("t", 5000 + rank)
        assert rt.symm_buffer("t", 10) is buf, "a refused growth keeps the buffer"
    big = rt.symm_buffer("t", 5000)
    assert big.nbytes >= 5000
    with pytest.raises(ValueError, match="TURBO_DIST_MAX_SYMM_BYTES"):
        rt.symm_buffer("huge", 1 << 62)
    if not rt.has_peer_access:
        assert big.peer_ptrs is None
        with pytest.raises(RuntimeError, match="no peer access"):
            big.peer((rank + 1) % world_size, torch.float32, (4,))
        return "none"
    # Peer write then read across every pair (GPU, torch symmetric memory).
    assert big.peer_ptrs.shape == (world_size,) and big.peer_ptrs.device == rt.device
    mine = big.local(torch.float32, (world_size, 64))
    mine.fill_(-1)
    rt.barrier()
    torch.cuda.synchronize()
    for peer in range(world_size):
        view = big.peer(peer, torch.float32, (world_size, 64))
        view[rank].copy_(torch.full((64,), float(rank * 100 + peer), device=rt.device))
    torch.cuda.synchronize()
    rt.barrier()
    expect = torch.stack([torch.full((64,), float(src * 100 + rank)) for src in range(world_size)]).to(rt.device)
    assert torch.equal(mine, expect), "peer writes did not land"
    rt.barrier()
    return "peer"


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_symm_buffer(world_size):
    results = run_distributed(_symm_buffer, world_size)
    assert len(set(results)) == 1, results
    if not torch.cuda.is_available():  # gloo: no peer access, the "none" backend's checks ran
        assert results == ["none"] * world_size


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_symm_buffer_self_loop_gpu():
    # One GPU, NCCL, world 1: the rank's own symmetric buffer through the peer path (torch symm mem).
    assert run_distributed(_symm_buffer, 1, backend="nccl") == ["peer"]


def _device_mismatch(rank, world_size):
    rt = get_runtime()
    other = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match="runtime uses"):
        rt.check_tensor(other, "x")
    rt.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        rt.symm_buffer("x", 8)
    assert get_runtime() is not rt, "a destroyed runtime must be rebuilt"
    return True


@pytest.mark.dist
def test_destroy_and_device_check():
    assert run_distributed(_device_mismatch, 2) == [True, True]


def _raises_on_rank_one(rank, world_size):
    if rank == 1:
        raise KeyError("boom on one")
    dist.barrier()  # rank 0 blocks here; the harness must not hang
    return rank


@pytest.mark.dist
def test_harness_propagates_rank_failure():
    with pytest.raises(RuntimeError, match="boom on one"):
        run_distributed(_raises_on_rank_one, 2, backend="gloo", timeout=60)


def _sleeps(rank, world_size):
    import time

    time.sleep(30)


@pytest.mark.dist
def test_harness_times_out():
    # the task's timeout, not the pool start's (which has its own, longer bound)
    with pytest.raises(TimeoutError, match="_sleeps timed out after 3s"):
        run_distributed(_sleeps, 2, backend="gloo", timeout=3)


class _FakeHandle:
    """The attributes of torch's `_SymmetricMemory` that symm.check_handle reads."""

    def __init__(self, buffer_ptrs, rank, world_size, buffer_size):
        self.buffer_ptrs, self.rank, self.world_size, self.buffer_size = buffer_ptrs, rank, world_size, buffer_size


def test_symm_handle_checks_own_pointer():
    from turbo_dist.runtime import symm

    block = torch.zeros(8192, dtype=torch.uint8)
    local = block[:4096]
    ok = _FakeHandle([123, local.data_ptr()], 1, 2, 4096)
    symm.check_handle(ok, local, "buf", 4096, 1, 2)  # consistent: no error
    # The tensor sits at an offset of its symmetric allocation: peers' pointers would be off by 256 bytes.
    with pytest.raises(RuntimeError, match="own buffer pointer .* is not the local tensor's data_ptr"):
        symm.check_handle(_FakeHandle([123, local.data_ptr() - 256], 1, 2, 4352), local, "buf", 4096, 1, 2)
    with pytest.raises(RuntimeError, match="rank 0 of 2 .* this is rank 1 of a 2-rank group"):
        symm.check_handle(_FakeHandle([local.data_ptr(), 123], 0, 2, 4096), local, "buf", 4096, 1, 2)
    with pytest.raises(RuntimeError, match="3 peer pointers"):
        symm.check_handle(_FakeHandle([1, local.data_ptr(), 2], 1, 2, 4096), local, "buf", 4096, 1, 2)
    with pytest.raises(RuntimeError, match="maps 2048 bytes per rank, fewer than the 4096"):
        symm.check_handle(_FakeHandle([123, local.data_ptr()], 1, 2, 2048), local, "buf", 4096, 1, 2)
    # The nvshmem backend's handle (no buffer_size) passes the same check.
    from turbo_dist.runtime.shmem_backend import SymmHandle

    symm.check_handle(SymmHandle(local, [None, local], 1), local, "buf", 4096, 1, 2)


@pytest.mark.parametrize("raw", ["0", "-1", "inf", "nan", "soon"])
def test_peer_timeout_must_be_positive_and_finite(raw, monkeypatch):
    from turbo_dist.runtime import config

    monkeypatch.setenv("TURBO_DIST_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match="TURBO_DIST_TIMEOUT_S"):
        config.peer_timeout_s()
    monkeypatch.setenv("TURBO_DIST_TIMEOUT_S", "2.5")
    assert config.peer_timeout_s() == 2.5


def _nvshmem_growth_frees(rank, world_size):
    import turbo_dist.shmem as shmem_mod
    from turbo_dist.runtime import symm

    rt = get_runtime()
    rt.shmem_backend = "nvshmem"  # the allocation and free are stubbed: no NVSHMEM on this machine
    freed, made = [], []

    def allocate(backend, name, nbytes, group, device, r, w):
        local = torch.zeros(nbytes, dtype=torch.uint8)
        made.append(local)
        return symm.SymmBuffer(name, nbytes, local, None, None, r, w)

    orig = (symm.allocate, shmem_mod.free, torch.cuda.synchronize)
    symm.allocate, shmem_mod.free, torch.cuda.synchronize = allocate, freed.append, lambda *a: None
    try:
        rt.symm_buffer("grow", 100)
        rt.symm_buffer("grow", 50)  # fits: nothing allocated or freed
        rt.symm_buffer("grow", 10000)
    finally:
        symm.allocate, shmem_mod.free, torch.cuda.synchronize = orig
        rt.shmem_backend = "none"
    assert len(made) == 2 and len(freed) == 1 and freed[0].data_ptr() == made[0].data_ptr()
    return True


@pytest.mark.dist
def test_nvshmem_buffer_growth_frees_the_old_allocation():
    """NVSHMEM releases nothing on garbage collection: a growing buffer frees its old allocation (collectively),
    or every growth would leak symmetric heap."""
    assert run_distributed(_nvshmem_growth_frees, 2) == [True, True]


def _env_of(rank, world_size):
    return os.environ.get("NCCL_NVLS_ENABLE"), os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")


@pytest.mark.dist
def test_harness_keeps_the_multicast_guards_over_a_tests_env():
    assert run_distributed(_env_of, 2, env={"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": ""}) == \
        [("0", "1")] * 2


def _dies_on_one(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        os._exit(3)
    dist.barrier()


@pytest.mark.dist
def test_harness_reports_the_rank_that_died_first():
    with pytest.raises(RuntimeError, match="(?s)failed on rank 1 .*rank 1 died \\(exit code 3\\)"):
        run_distributed(_dies_on_one, 2, backend="gloo", timeout=60)
