"""Buffer(comm=...): an mpi4py-style communicator in place of a process group (turbo_dist/runtime/mpi.py).

The CI machine has no MPI, so the communicator here is a stand-in with the four methods used (Get_rank,
Get_size, bcast, allgather) over a torch store; launch/mpi_bootstrap.py covers real mpirun launches.
"""
import pickle

import pytest
import torch
import torch.distributed as dist

from turbo_dist.moe import Buffer
from turbo_dist.runtime import destroy_all
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device


class StoreComm:
    """The mpi4py.MPI.Comm methods Buffer(comm=) uses, over a torch key-value store."""

    def __init__(self, store, rank, size):
        self.store, self.rank, self.size, self.n = store, rank, size, 0

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def bcast(self, obj, root=0):
        key, self.n = f"b{self.n}", self.n + 1
        if self.rank == root:
            self.store.set(key, pickle.dumps(obj))
        return pickle.loads(self.store.get(key))

    def allgather(self, obj):
        n, self.n = self.n, self.n + 1
        self.store.set(f"a{n}_{self.rank}", pickle.dumps(obj))
        return [pickle.loads(self.store.get(f"a{n}_{r}")) for r in range(self.size)]


def _store(prefix):
    return dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())


def _comm_body(rank, world):
    comm = StoreComm(_store("world"), rank, world)
    buf = Buffer(None, comm=comm, transport="collective")
    assert buf.group is dist.group.WORLD and (buf.rank, buf.group_size) == (rank, world)
    assert Buffer(None, comm=comm, transport="collective").group is buf.group
    with pytest.raises(NotImplementedError, match="orders the torch ranks"):  # communicator order != torch order
        Buffer(None, comm=StoreComm(_store("reversed"), world - 1 - rank, world))
    with pytest.raises(NotImplementedError, match="communicator of 1 ranks"):  # a sub-communicator
        Buffer(None, comm=StoreComm(_store(f"solo{rank}"), 0, 1))
    with pytest.raises(TypeError, match="mpi4py communicator"):
        Buffer(None, comm=object())
    return True


def _comm_init_body(rank, world):
    """torch.distributed not initialized: Buffer(comm=) initializes it over the communicator."""
    comm = StoreComm(_store("init"), rank, world)
    destroy_all()
    dist.destroy_process_group()
    assert not dist.is_initialized()
    buf = Buffer(None, comm=comm, transport="collective")
    assert dist.is_initialized() and (buf.rank, buf.group_size) == (rank, world)
    t = torch.full((1,), float(rank + 1))
    dist.all_reduce(t, group=buf.group)
    assert t.item() == world * (world + 1) / 2
    # torch.distributed torn down and initialized again: the communicator maps to the new WORLD, not the dead one
    destroy_all()
    dist.destroy_process_group()
    again = Buffer(None, comm=comm, transport="collective")
    assert again.group is dist.group.WORLD and again.group is not buf.group
    t = torch.ones(1)
    dist.all_reduce(t, group=again.group)
    assert t.item() == world
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
@pytest.mark.parametrize("body", [_comm_body, _comm_init_body], ids=["maps_to_world", "initializes_torch_distributed"])
def test_buffer_comm(world_size, body):
    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) check covers this host-side mapping")
    assert all(run_distributed(body, world_size, env={"TURBO_DIST_TEST_POOL": body.__name__}))
