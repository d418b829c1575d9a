"""A torch.distributed process group for an mpi4py communicator (DeepEP's `Buffer(comm=...)`).

Our runtimes live on process groups, so a communicator is mapped to one: when torch.distributed is not
initialized yet, it is initialized over the communicator (rank 0's MASTER_ADDR or host name and a free port
broadcast over MPI, rank and world size from it, LOCAL_RANK / LOCAL_WORLD_SIZE from its node-local split, one GPU
per local rank: NCCL on CUDA, gloo otherwise; the NVLink-multicast guards set first); then the
communicator must span every rank of the default group (a sub-communicator would need the ranks outside it to
take part in creating its group: pass `group=` for those) in the default group's rank order (a process group
numbers its ranks in ascending global order, so another order could not keep Buffer.rank == comm.Get_rank()):
that is WORLD. `comm` is anything with Get_rank, Get_size, bcast and allgather (mpi4py is imported only for the
node-local split, and without it the communicator counts as one node).
"""
import logging
import os
import socket

import torch
import torch.distributed as dist

from .config import apply_safety_env

log = logging.getLogger("turbo_dist")

_GROUPS = {}  # id(comm) -> (comm, group)


def _init_from_comm(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = port = None
    if rank == 0:
        # the host's name, resolved by each peer (gethostbyname here can give a loopback address such as
        # 127.0.1.1 from /etc/hosts, unreachable from other nodes)
        addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    addr, port = comm.bcast((addr, port), root=0)
    _set_local_env(comm)
    apply_safety_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per rank of a node, as launch/mpi_bootstrap.py sets up
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size)


def _set_local_env(comm):
    """LOCAL_RANK / LOCAL_WORLD_SIZE from the node-local communicator, unless a launcher set them: the runtime's
    topology (ranks per node) and the device choice read them."""
    if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        return
    split = getattr(comm, "Split_type", None)
    try:
        from mpi4py import MPI

        local = split(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(local.Get_rank()), str(local.Get_size())
        local.Free()
    except Exception as exc:  # noqa: BLE001 - not an mpi4py communicator with node-local splits: one node
        log.warning("runtime.mpi: no node-local communicator (%r): treating the communicator as one node", exc)
        os.environ.setdefault("LOCAL_RANK", str(comm.Get_rank()))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(comm.Get_size()))


def group_from_comm(comm):
    """The process group whose ranks are the communicator's, in its order (collective over `comm`)."""
    for name in ("Get_rank", "Get_size", "bcast", "allgather"):
        if not callable(getattr(comm, name, None)):
            raise TypeError(f"comm must be an mpi4py communicator (no {name} on {type(comm).__name__})")
    cached = _GROUPS.get(id(comm))
    if cached is not None and cached[0] is comm and dist.is_initialized() and cached[1] is dist.group.WORLD:
        return cached[1]  # (a group destroyed and initialized again is a new WORLD: validated afresh)
    if not dist.is_initialized():
        _init_from_comm(comm)
    world = dist.get_world_size()
    if comm.Get_size() != world:
        raise NotImplementedError(
            f"Buffer(comm=...) with a communicator of {comm.Get_size()} ranks inside a torch.distributed world of "
            f"{world}: creating its process group needs every rank of that world; create it on all of them with "
            "torch.distributed.new_group(ranks) and pass it as `group`")
    ranks = comm.allgather(dist.get_rank())  # the torch rank of each communicator rank, in communicator order
    if ranks != list(range(world)):
        raise NotImplementedError(
            f"Buffer(comm=...): the communicator orders the torch ranks as {ranks}; a process group numbers them "
            "in ascending order, so Buffer.rank would differ from comm.Get_rank(). Initialize torch.distributed "
            "with rank = comm.Get_rank() (launch/mpi_bootstrap.py does) or pass `group`")
    _GROUPS[id(comm)] = (comm, dist.group.WORLD)
    return dist.group.WORLD
