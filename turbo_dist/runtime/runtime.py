"""Runtime: one per process group; owns symmetric buffers, communication streams and topology."""
import atexit
import logging
import os
import threading

import torch
import torch.distributed as dist

from . import config, symm

log = logging.getLogger("turbo_dist")

_RUNTIMES = {}
_LOCK = threading.Lock()


class Runtime:
    """Communication resources of one process group.

    Attributes: `rank`, `world_size` (in the group), `device`, `backend` (torch.distributed
    backend name), `local_world_size` (the group's ranks per node: nodes hold consecutive
    global ranks, TURBO_DIST_RANKS_PER_NODE, else LOCAL_WORLD_SIZE, of them; neither set: one node), `num_nodes`, `node_rank`, `local_rank`,
    `comm_stream` (a CUDA stream for communication; None on CPU), `shmem_backend`, `shares_gpu`
    (True only in the TURBO_DIST_TEST_SHARE_GPU test mode: a gloo group on CUDA, ranks may share a GPU).
    """

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group() "
                "(or launch with launch/torchrun.sh) before turbo_dist.get_runtime()"
            )
        # The NVLink-multicast guards, forced before this runtime's first NCCL collective or symmetric allocation
        # (NCCL creates its communicators lazily, torch's rendezvous reads TORCH_SYMM_MEM_DISABLE_MULTICAST when it
        # runs): under a framework's own launcher nothing else sets them.
        config.apply_safety_env()
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the group passed to get_runtime()")
        self.world_size = dist.get_world_size(self.group)
        self.global_rank = dist.get_rank()
        self.backend = str(dist.get_backend(self.group)).lower()
        self.shares_gpu = False
        self.device = self._pick_device()

        self._set_topology()
        lws = self.local_world_size

        self.comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.shmem_backend = self._pick_shmem_backend()
        self._buffers = {}
        self._name_counts = {}  # new_buffer_name
        self._destroyed = False
        log.debug(
            "runtime: rank %d/%d device %s backend %s nodes %d x %d shmem %s%s",
            self.rank, self.world_size, self.device, self.backend, self.num_nodes, lws, self.shmem_backend,
            " (shared-GPU test mode)" if self.shares_gpu else "",
        )

    def _set_topology(self):
        """local_world_size, num_nodes, node_rank, local_rank of this group: nodes hold consecutive GLOBAL ranks
        (TURBO_DIST_RANKS_PER_NODE, else LOCAL_WORLD_SIZE, per node: torchrun's and our launchers' numbering;
        neither set: one node), mapped onto the group's members, so a subgroup such as ranks [0, 2] of two
        2-rank nodes spans two nodes. A group whose members are not node-major with equal counts per node gets
        one rank per node: nothing assumes peer access between its ranks (logged)."""
        per_node = config.env_int("TURBO_DIST_RANKS_PER_NODE", 0) or config.env_int("LOCAL_WORLD_SIZE", 0)
        members = dist.get_process_group_ranks(self.group)
        nodes = [g // per_node if per_node > 0 else 0 for g in members]
        order = list(dict.fromkeys(nodes))  # nodes in the order the group's ranks reach them
        lws = len(members) // len(order)
        regular = len(members) % len(order) == 0 and nodes == [n for n in order for _ in range(lws)]
        if not regular:
            log.warning("runtime: the group's ranks %s are not node-major with equal ranks per node (%s per node): "
                        "treating each rank as its own node (no peer access assumed)", members, per_node)
            lws = 1
        self.local_world_size = lws
        self.num_nodes = self.world_size // lws
        self.node_rank = self.rank // lws
        self.local_rank = self.rank % lws

    def _pick_device(self):
        if "nccl" in self.backend:
            if not torch.cuda.is_available():
                raise RuntimeError("process group uses NCCL but CUDA is not available")
            return torch.device("cuda", torch.cuda.current_device())
        if config.share_gpu_mode():
            return self._shared_gpu_device()
        return torch.device("cpu")

    def _shared_gpu_device(self):
        # Test mode (TURBO_DIST_TEST_SHARE_GPU=1): NCCL refuses two ranks on one GPU, so the ranks talk
        # over gloo (which stages CUDA tensors through host memory) while symmetric memory, kernels and
        # streams are the real CUDA ones on the rank's current device.
        if "gloo" not in self.backend:
            raise RuntimeError(
                f"TURBO_DIST_TEST_SHARE_GPU=1 expects a gloo process group, got backend {self.backend!r}; "
                "unset it outside the shared-GPU test mode"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("TURBO_DIST_TEST_SHARE_GPU=1 (ranks sharing a GPU over gloo) but CUDA is not available")
        if os.environ.get("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES") != "1":
            raise RuntimeError(
                "TURBO_DIST_TEST_SHARE_GPU=1 needs TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1 in every rank, or torch "
                "symmetric memory refuses ranks on one device (turbo_dist.testing.run_distributed sets both)"
            )
        self.shares_gpu = True
        return torch.device("cuda", torch.cuda.current_device())

    def _pick_shmem_backend(self):
        requested = config.env_str("TURBO_DIST_SHMEM")
        if requested is not None:
            if requested not in ("torch", "nvshmem", "none"):
                raise ValueError(f"TURBO_DIST_SHMEM={requested!r}: expected torch, nvshmem or none")
            if requested == "torch" and not symm.torch_symm_mem_available(self.device):
                raise RuntimeError("TURBO_DIST_SHMEM=torch needs CUDA and torch.distributed._symmetric_memory")
            if requested == "nvshmem" and self.shares_gpu:
                raise NotImplementedError(
                    "TURBO_DIST_SHMEM=nvshmem with TURBO_DIST_TEST_SHARE_GPU=1: our NVSHMEM bootstrap assumes one "
                    "PE per GPU; the shared-GPU test mode supports TURBO_DIST_SHMEM=torch or none"
                )
            return requested
        if symm.torch_symm_mem_available(self.device) and self.num_nodes == 1:
            return "torch"
        return "none"

    @property
    def has_peer_access(self):
        """True when symmetric buffers can be read/written by peers (NVLink/IPC or NVSHMEM)."""
        return self.shmem_backend != "none"

    def _check_alive(self):
        if self._destroyed:
            raise RuntimeError("this turbo_dist Runtime was destroyed; call turbo_dist.get_runtime(group) again")

    def check_tensor(self, t, name="tensor"):
        """Raise if `t` is not on this runtime's device (a clear error before any kernel launches)."""
        if t.device.type != self.device.type or (
            self.device.type == "cuda" and t.device.index is not None and t.device.index != self.device.index
        ):
            raise ValueError(f"{name} is on {t.device} but the process group's runtime uses {self.device}")

    def symm_buffer(self, name, nbytes):
        """The symmetric buffer `name`, at least `nbytes` large on every rank.

        Collective when it allocates or grows: every rank of the group must call it with the same
        name and the same nbytes (a call that fits the current size costs nothing and involves no peer,
        so a rank whose request fits would not join the exchange of a rank that grows: sizes that
        differ are refused, on every rank at once, when they meet in that exchange).
        """
        self._check_alive()
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"symm_buffer({name!r}): negative size {nbytes}")
        cap = config.max_symm_bytes()
        if nbytes > cap:
            raise ValueError(
                f"symm_buffer({name!r}) asked for {nbytes} bytes, over the cap of {cap} bytes; raise "
                f"TURBO_DIST_MAX_SYMM_BYTES (e.g. TURBO_DIST_MAX_SYMM_BYTES={nbytes}) or use smaller batches"
            )
        buf = self._buffers.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        nbytes = max(nbytes, 1)
        if self.world_size > 1:
            low, high = symm.group_min_max(nbytes, self.group, self.device)
            if low != high:
                raise ValueError(
                    f"symm_buffer({name!r}): the ranks of the group asked for different sizes ({low} .. {high} "
                    "bytes); every rank must ask for the same size (derive it from values equal on all ranks, e.g. "
                    "the maximum token count, not this rank's own)")
        # Round up so small growth steps do not rendezvous again and again.
        nbytes = max(1 << (nbytes - 1).bit_length(), 4096) if nbytes > 4096 else 4096
        nbytes = min(nbytes, max(cap, 4096))
        old = self._buffers.pop(name, None)
        if old is not None and self.shmem_backend == "nvshmem":  # NVSHMEM frees nothing on garbage collection
            self._drain_and_free(old)  # collective, as this growth is
        buf = symm.allocate(self.shmem_backend, name, nbytes, self.group, self.device, self.rank, self.world_size)
        self._buffers[name] = buf
        log.debug("runtime: symmetric buffer %r now %d bytes (%s)", name, nbytes, self.shmem_backend)
        return buf

    def release_buffer(self, name):
        """Free the symmetric buffer `name` (collective: every rank, once no kernel uses it any more; the GPU is
        drained and the group synchronized first, so no peer still writes into it). Unknown names are ignored."""
        self._check_alive()
        buf = self._buffers.pop(name, None)
        if buf is not None:
            self._drain_and_free(buf)

    def new_buffer_name(self, prefix):
        """`prefix.N`, N counting this runtime's calls with `prefix`: the same name on every rank when the
        objects owning buffers are made in the same order (their construction is collective)."""
        n = self._name_counts.get(prefix, 0)
        self._name_counts[prefix] = n + 1
        return f"{prefix}.{n}"

    def _drain_and_free(self, buf):
        """Wait until no kernel of ours, nor of a peer, still uses `buf`, then free it: dropped (torch's
        allocator frees it), or nvshmem_free'd (NVSHMEM frees nothing on garbage collection)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world_size > 1:
            self.barrier()
        if self.shmem_backend == "nvshmem":
            from turbo_dist import shmem

            shmem.free(buf.local(torch.uint8, (buf.nbytes,)))

    def barrier(self):
        self._check_alive()
        if self.shares_gpu:
            # gloo's barrier is host-only; NCCL's returns once the work queued before it on the current
            # stream is done, which callers rely on (e.g. a zeroed buffer before peers write into it).
            torch.cuda.current_stream(self.device).synchronize()
            dist.barrier(group=self.group)
        elif self.device.type == "cuda":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    def destroy(self):
        """Free buffers and streams; the runtime is unusable afterwards. Idempotent."""
        if self._destroyed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._buffers.clear()
        self.comm_stream = None
        self._destroyed = True
        with _LOCK:
            for key, rt in list(_RUNTIMES.items()):
                if rt is self:
                    del _RUNTIMES[key]


def _group_alive(group):
    if not dist.is_initialized():
        return False
    try:
        from torch.distributed.distributed_c10d import _world

        return group in _world.pg_map or group is dist.group.WORLD
    except Exception:
        return True


def get_runtime(group=None):
    """The Runtime of `group` (default: WORLD), created on first use and cached.

    A runtime whose process group was destroyed is dropped and rebuilt for the new group.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() before "
            "turbo_dist.get_runtime()"
        )
    group = group if group is not None else dist.group.WORLD
    with _LOCK:
        for key, rt in list(_RUNTIMES.items()):
            if not _group_alive(rt.group):
                rt._buffers.clear()
                rt._destroyed = True
                del _RUNTIMES[key]
        rt = _RUNTIMES.get(id(group))
        if rt is not None and rt.group is group:
            return rt
    rt = Runtime(group)
    with _LOCK:
        _RUNTIMES[id(group)] = rt
    return rt


def destroy_all():
    """Destroy every cached runtime (registered at exit; call before destroy_process_group)."""
    with _LOCK:
        runtimes = list(_RUNTIMES.values())
    for rt in runtimes:
        try:
            rt.destroy()
        except Exception as exc:  # at exit the CUDA context may already be gone
            log.debug("runtime: destroy at exit failed: %s", exc)


atexit.register(destroy_all)
