"""Symmetric buffers: one named allocation per rank, addressable by every peer of the group.

Backends (TURBO_DIST_SHMEM): `torch` (torch.distributed._symmetric_memory over CUDA IPC, one
node), `nvshmem` (our native binding, turbo_dist._shmem), `none` (plain local tensors: CPU or no
peer access; features then use collectives).
"""
import logging

import torch
import torch.distributed as dist

from . import config

log = logging.getLogger("turbo_dist")


class SymmBuffer:
    """A byte buffer of `nbytes` on each rank; `local()` views ours, `peer(r)` views rank r's.

    `peer_ptrs` is an int64 device tensor of every rank's base address (for Triton kernels that
    write into peers); it is None when the backend has no peer access.
    """

    def __init__(self, name, nbytes, local_bytes, handle, peer_ptrs, rank, world_size):
        self.name = name
        self.nbytes = nbytes
        self._bytes = local_bytes  # uint8 tensor [nbytes]
        self._handle = handle
        self.peer_ptrs = peer_ptrs
        self.rank = rank
        self.world_size = world_size

    @property
    def has_peer_access(self):
        return self._handle is not None

    @property
    def handle(self):
        """The backend's handle (torch `_SymmetricMemory`), for signal pads and device barriers."""
        return self._handle

    def _view(self, raw, dtype, shape, offset):
        itemsize = dtype.itemsize
        numel = 1
        for s in shape:
            numel *= int(s)
        end = offset + numel * itemsize
        if offset % itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
        if end > self.nbytes:
            raise ValueError(
                f"symmetric buffer '{self.name}' holds {self.nbytes} bytes; a view of {tuple(shape)} {dtype} "
                f"at offset {offset} needs {end}"
            )
        return raw[offset:end].view(dtype).view(tuple(shape))

    def local(self, dtype=torch.uint8, shape=None, offset=0):
        shape = (self.nbytes // dtype.itemsize,) if shape is None else shape
        return self._view(self._bytes, dtype, shape, offset)

    def peer(self, rank, dtype=torch.uint8, shape=None, offset=0):
        if rank == self.rank:
            return self.local(dtype, shape, offset)
        if self._handle is None:
            raise RuntimeError(
                f"symmetric buffer '{self.name}' has no peer access (TURBO_DIST_SHMEM=none or no CUDA IPC); "
                "use the collective transport"
            )
        if not 0 <= rank < self.world_size:
            raise ValueError(f"peer rank {rank} outside [0, {self.world_size})")
        raw = self._handle.get_buffer(rank, (self.nbytes,), torch.uint8, 0)
        shape = (self.nbytes // dtype.itemsize,) if shape is None else shape
        return self._view(raw, dtype, shape, offset)


def torch_symm_mem_available(device):
    if device.type != "cuda":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception:
        return False
    return True


def check_handle(handle, local, name, nbytes, rank, world_size):
    """Raise unless `handle` describes `local` as this rank's buffer of a `world_size`-rank group.

    Kernels address peers through `handle.buffer_ptrs` while this rank reads and writes `local`: if the
    handle's own pointer is not `local.data_ptr()` (e.g. a sub-allocation at an offset inside a larger
    symmetric block), every peer pointer is off by the same amount and peers' writes land elsewhere.
    """
    ptrs = list(handle.buffer_ptrs)
    h_rank = getattr(handle, "rank", rank)
    h_world = getattr(handle, "world_size", len(ptrs))
    if (h_rank, h_world, len(ptrs)) != (rank, world_size, world_size):
        raise RuntimeError(
            f"symmetric buffer '{name}': the symmetric-memory handle is for rank {h_rank} of {h_world} "
            f"({len(ptrs)} peer pointers) but this is rank {rank} of a {world_size}-rank group; the peer "
            "pointers would address the wrong ranks"
        )
    if int(ptrs[rank]) != local.data_ptr():
        raise RuntimeError(
            f"symmetric buffer '{name}': the handle's own buffer pointer {int(ptrs[rank]):#x} is not the local "
            f"tensor's data_ptr {local.data_ptr():#x}; the peer pointers would be wrong (the tensor is not at the "
            "start of its symmetric allocation)"
        )
    size = getattr(handle, "buffer_size", None)
    if size is not None and int(size) < nbytes:
        raise RuntimeError(
            f"symmetric buffer '{name}': the handle maps {int(size)} bytes per rank, fewer than the {nbytes} asked for"
        )


def allocate(backend, name, nbytes, group, device, rank, world_size):
    """Allocate `nbytes` on every rank of `group` (collective: every rank calls with the same size)."""
    if backend == "none":
        local = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        return SymmBuffer(name, nbytes, local, None, None, rank, world_size)
    config.apply_safety_env()  # no multicast object, whoever built this process's environment
    if backend == "torch":
        import torch.distributed._symmetric_memory as symm_mem

        group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            try:
                enable(group_name)
            except Exception as exc:  # newer torch: not needed / already enabled
                log.debug("symm: enable_symm_mem_for_group(%r) raised %r (rendezvous decides)", group_name, exc)
        local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        local.zero_()
        handle = symm_mem.rendezvous(local, group_name)
        check_handle(handle, local, name, nbytes, rank, world_size)
        peer_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        return SymmBuffer(name, nbytes, local, handle, peer_ptrs, rank, world_size)
    if backend == "nvshmem":
        try:
            from turbo_dist import _shmem  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "TURBO_DIST_SHMEM=nvshmem but the native module turbo_dist._shmem is not built "
                f"({exc}); install NVSHMEM (pip install nvidia-nvshmem-cu13 or set NVSHMEM_HOME) and "
                "reinstall, or set TURBO_DIST_SHMEM=torch"
            ) from None
        from turbo_dist.runtime import shmem_backend

        local, handle = shmem_backend.symmetric_buffer(nbytes, group, device)  # peers off-node: None, pointer 0
        check_handle(handle, local, name, nbytes, rank, world_size)
        peer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        return SymmBuffer(name, nbytes, local, handle, peer_ptrs, rank, world_size)
    raise ValueError(f"unknown symmetric-memory backend {backend!r}; expected torch, nvshmem or none")


def group_min_max(value, group, device):
    """(min, max) of an int over the group: one all-reduce and one read back (a host sync). Used when a buffer
    grows, by the cross-rank checks (TURBO_DIST_CHECK_RANKS) and by raise_together (the packed CP / llama3 plans,
    once per plan; the HF adapter's layers, every call)."""
    t = torch.tensor([-int(value), int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    lo, hi = t.tolist()
    return -lo, hi
