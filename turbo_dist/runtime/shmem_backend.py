"""The runtime's NVSHMEM symmetric-memory backend (TURBO_DIST_SHMEM=nvshmem): a symmetric allocation from
`turbo_dist.shmem` with the peer views and the parts of torch's `_SymmetricMemory` handle that
runtime/symm.py uses, so the rest of the runtime sees one kind of handle whichever backend made it."""
import torch

from turbo_dist import shmem


class SymmHandle:
    """Peer views of one symmetric allocation, with the parts of torch's `_SymmetricMemory` we can offer.

    `buffer_ptrs[r]` is rank r's base address in our address space (0 where not reachable);
    `get_buffer(r, sizes, dtype, offset)` views it; `barrier()` is a stream-ordered barrier of all PEs.
    """

    def __init__(self, local, peers, rank):
        self._local = local
        self._peers = peers
        self.rank = rank
        self.world_size = len(peers)
        self.buffer_ptrs = [p.data_ptr() if p is not None else 0 for p in peers]

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        raw = self._peers[rank]
        if raw is None:
            raise RuntimeError(f"rank {rank} is not reachable by load/store from rank {self.rank} (another node); "
                               "use the collective or hierarchical transport for it")
        sizes = tuple(sizes)
        numel = 1
        for s in sizes:
            numel *= int(s)
        itemsize = torch.empty((), dtype=dtype).element_size()
        start = storage_offset * itemsize
        return raw[start:start + numel * itemsize].view(dtype).view(sizes)

    def barrier(self, channel=0, timeout_ms=None):
        shmem.barrier_all_on_stream()

    @property
    def signal_pad_ptrs(self):
        raise NotImplementedError("the nvshmem symmetric-memory backend has no signal pads; use TURBO_DIST_SHMEM=torch")


def symmetric_buffer(nbytes, group, device):
    """Collective over `group`: a zeroed symmetric uint8 tensor [nbytes] and its SymmHandle.

    Initialises SHMEM over `group` if needed; the group must be the whole SHMEM world, with
    group rank == PE.
    """
    import torch.distributed as dist

    rank, nranks = dist.get_rank(group), dist.get_world_size(group)
    if not shmem.is_initialized():
        shmem.init(group, device)
    known = shmem.members()  # the same PE count and index are not enough: the same processes, in the same order
    if (shmem.my_pe(), shmem.n_pes()) != (rank, nranks) or \
            (known is not None and known != tuple(dist.get_process_group_ranks(group))):
        raise NotImplementedError(
            f"the nvshmem backend serves only the group SHMEM was initialised on ({shmem.n_pes()} PEs); this group has "
            f"{nranks} ranks. Use TURBO_DIST_SHMEM=torch for subgroups"
        )
    # nvshmem_malloc is a collective with no timeout: a missing or dead peer would block it for good, so the
    # group's barrier (bounded by the process group's timeout) runs first and raises instead
    if "nccl" in str(dist.get_backend(group)).lower() and getattr(device, "index", None) is not None:
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
    local = shmem.malloc(int(nbytes))
    local.zero_()
    shmem.barrier_all()  # every PE's zeros land before any peer writes
    peers = [shmem.peer_tensor(local, pe) for pe in range(nranks)]
    return local, SymmHandle(local, peers, rank)
