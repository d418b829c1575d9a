"""SHMEM from Python: NVSHMEM (CUDA) or rocSHMEM (ROCm) through the native `turbo_dist._shmem`.

    import turbo_dist.shmem as shmem
    shmem.init()                         # collective over torch.distributed's WORLD (or init_mpi())
    x = shmem.empty((1024,), torch.float32)        # symmetric: same size on every PE
    y = shmem.peer_tensor(x, pe)         # PE `pe`'s copy of x, addressable by our kernels (None if unreachable)
    shmem.barrier_all(); shmem.free(x); shmem.finalize()

One SHMEM world per process: PEs are the ranks of the group (or MPI communicator) that called
init, in rank order. Only the host API is bound; kernels (Triton) reach peers through the
addresses `ptr()` / `peer_tensor()` return, i.e. over NVLink/PCIe P2P inside a node.

Memory model: `malloc`/`empty`/`free` are collective (every PE, same sizes, same order).
Tensors returned here do not own their memory: freeing an allocation (or `finalize`) while a
tensor still views it leaves that tensor dangling; nothing is freed by garbage collection,
because a free is collective and GC timing differs between ranks.

NVLink multicast (NVLS) is never enabled: NVSHMEM_DISABLE_NVLS=1 is forced before init.
"""
import bisect
import logging
import os
import threading

import torch

log = logging.getLogger("turbo_dist")

_FALLBACK_HINT = (
    "To run without it, set TURBO_DIST_SHMEM=torch (CUDA IPC symmetric memory, one node; the default on CUDA) "
    "or TURBO_DIST_SHMEM=none (collectives only)."
)

_native = None
_LOCK = threading.Lock()
_STATE = {"device": None, "rank": None, "nranks": None, "via": None, "members": None}
_ALLOCS = {}  # base address -> _Allocation, live allocations only
_ALLOC_ADDRS = []  # sorted base addresses of _ALLOCS, to find the allocation holding an address
_NODE_TEAMS = {}  # ranks_per_node -> team handle (or None)


class _Allocation:
    """One symmetric allocation; every tensor viewing it (local or peer) keeps this record alive."""

    __slots__ = ("addr", "nbytes", "device", "freed", "__weakref__")

    def __init__(self, addr, nbytes, device):
        self.addr, self.nbytes, self.device, self.freed = addr, nbytes, device, False


# ---------------------------------------------------------------------------------------------
# native module


def _native_module():
    """Import turbo_dist._shmem, or raise ImportError saying how to build it or fall back."""
    global _native
    if _native is not None:
        return _native
    _apply_env()
    try:
        from turbo_dist import _shmem
    except ImportError as exc:
        raise ImportError(
            f"turbo_dist._shmem, the NVSHMEM/rocSHMEM binding, is not built ({exc}). Build it by installing "
            "NVSHMEM (pip install nvidia-nvshmem-cu13, or NVSHMEM_HOME=...; ROCSHMEM_HOME=... on ROCm) and then "
            "reinstalling turbo_dist (pip install --no-build-isolation -e .; add -v to see why setup.py skipped "
            "it, TURBO_DIST_SKIP_NATIVE=1 must not be set). " + _FALLBACK_HINT
        ) from exc
    _native = _shmem
    _point_plugins_at_loaded_library()
    return _native


def is_available():
    """True when the native module is built and loads (says nothing about whether init will succeed)."""
    try:
        _native_module()
    except ImportError:
        return False
    return True


def backend():
    """'nvshmem' or 'rocshmem' (the library the native module was built against)."""
    return _native_module().BACKEND


def version():
    """(major, minor, patch) of the SHMEM library."""
    return tuple(_native_module().version())


def _apply_env():
    # Multicast objects can take a shared host's GPUs down: never let NVSHMEM create them.
    if os.environ.get("NVSHMEM_DISABLE_NVLS", "1") != "1":
        log.warning("shmem: NVSHMEM_DISABLE_NVLS=%s overridden to 1 (NVLink multicast stays off)",
                    os.environ["NVSHMEM_DISABLE_NVLS"])
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"


def _point_plugins_at_loaded_library():
    """NVSHMEM dlopens its bootstrap plugin by file name; give it the full path beside the library we loaded."""
    if os.environ.get("NVSHMEM_BOOTSTRAP_UID_PLUGIN"):
        return
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libnvshmem_host.so" in line}
    except OSError:
        return
    for path in paths:
        plugin = os.path.join(os.path.dirname(path), "nvshmem_bootstrap_uid.so.3")
        if os.path.exists(plugin):
            os.environ["NVSHMEM_BOOTSTRAP_UID_PLUGIN"] = plugin
            return


# ---------------------------------------------------------------------------------------------
# init / finalize


def is_initialized():
    return _native is not None and _native.is_initialized()


def _check_device(device):
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("SHMEM needs a GPU, and CUDA is not available. " + _FALLBACK_HINT)
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"SHMEM needs a GPU device, got {device}. " + _FALLBACK_HINT)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _already(rank, nranks):
    """True if SHMEM is up with this rank layout; raise if it is up with another one."""
    if not is_initialized():
        return False
    if (_STATE["rank"], _STATE["nranks"]) != (rank, nranks):
        raise RuntimeError(
            f"SHMEM is already initialised as PE {_STATE['rank']} of {_STATE['nranks']} (via {_STATE['via']}); "
            f"this call asks for rank {rank} of {nranks}. One SHMEM world per process: finalize() first"
        )
    return True


def _init_failed(native, what, rank, nranks, device, exc):
    return RuntimeError(
        f"{native.BACKEND} could not initialise on this machine ({what}; rank {rank} of {nranks}, {device}): {exc}. "
        "Every rank must call init with the same unique id and reach rank 0 over TCP "
        "(NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME picks the interface); the GPUs need CUDA VMM and P2P. "
        "NVSHMEM_DEBUG=INFO says more. " + _FALLBACK_HINT
    )


def _make_unique_id(native, rank, nranks, device):
    """(bytes, None) on success, (None, RuntimeError) when the library cannot create an id."""
    try:
        return bytes(native.get_unique_id()), None
    except RuntimeError as exc:
        return None, _init_failed(native, "creating the unique id on rank 0", rank, nranks, device, exc)


def _bind_device(device):
    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # make torch's (primary) context current before SHMEM binds to it


def _init_native(native, unique_id, rank, nranks, device, via):
    try:
        native.init(bytes(unique_id), rank, nranks)
    except RuntimeError as exc:
        raise _init_failed(native, f"init via {via}", rank, nranks, device, exc) from exc
    _STATE.update(device=device, rank=rank, nranks=nranks, via=via)
    log.info("shmem: %s initialised via %s, PE %d of %d on %s", native.BACKEND, via, rank, nranks, device)


def init(group=None, device=None):
    """Initialise SHMEM over a torch.distributed group (collective; default WORLD).

    Rank 0 of `group` creates the unique id and broadcasts its bytes over the group; PE i is
    group rank i. `device` (default: the current CUDA device) is the GPU this rank uses.
    Calling again with the same layout is a no-op. Raises RuntimeError on every rank, naming the
    cause and the fallback (TURBO_DIST_SHMEM=torch), when SHMEM cannot come up.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shmem.init() bootstraps over torch.distributed: call init_process_group() first "
                           "(or use shmem.init_mpi())")
    group = group if group is not None else dist.group.WORLD
    rank, nranks = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the group passed to shmem.init()")
    native = _native_module()
    device = _check_device(device)
    with _LOCK:
        if _already(rank, nranks):
            return
        _bind_device(device)
        made = {}

        def make_id():
            made["id"], made["error"] = _make_unique_id(native, rank, nranks, device)
            return made["id"]

        uid = _broadcast_unique_id(group, device, make_id, native.UNIQUE_ID_BYTES)
        if made.get("error") is not None:
            raise made["error"]
        if uid is None:
            raise _init_failed(native, "rank 0 could not create the unique id (its error says why)", rank, nranks,
                               device, "no id received")
        _init_native(native, uid, rank, nranks, device, "torch.distributed")
        _STATE["members"] = tuple(dist.get_process_group_ranks(group))  # which processes the PEs are


def members():
    """The global torch.distributed ranks of PEs 0..n-1 when SHMEM came up over a torch.distributed group
    (init()); None when it came up another way (init_mpi) or is not up."""
    return _STATE.get("members")


def _broadcast_unique_id(group, device, make_id, nbytes):
    """Rank 0 of `group` calls make_id() (-> `nbytes` bytes, or None on failure); every rank returns those bytes.

    A failure on rank 0 is broadcast too (every rank returns None), so no rank is left waiting.
    """
    import torch.distributed as dist

    where = device if "nccl" in str(dist.get_backend(group)).lower() else torch.device("cpu")
    buf = torch.zeros(nbytes + 1, dtype=torch.uint8, device=where)  # [ok flag, id bytes...]
    if dist.get_rank(group) == 0:
        raw = make_id()
        if raw is not None:
            raw = bytes(raw)
            if len(raw) != nbytes:
                raise RuntimeError(f"SHMEM unique id has {len(raw)} bytes, expected {nbytes}")
            buf[1:].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            buf[0] = 1
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    host = bytes(buf.cpu().tolist())
    return host[1:] if host[0] == 1 else None


def init_mpi(comm=None, device=None):
    """Initialise SHMEM over an MPI communicator with mpi4py (collective; default COMM_WORLD).

    The unique id travels with comm.bcast; PE i is MPI rank i. `device` defaults to GPU
    (node-local rank % GPUs per node).
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"shmem.init_mpi() needs mpi4py ({exc}): pip install mpi4py, or use shmem.init()") from exc
    native = _native_module()
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank, nranks = comm.Get_rank(), comm.Get_size()
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("SHMEM needs a GPU, and CUDA is not available. " + _FALLBACK_HINT)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        device = torch.device("cuda", local.Get_rank() % torch.cuda.device_count())
        local.Free()
    device = _check_device(device)
    with _LOCK:
        if _already(rank, nranks):
            return
        _bind_device(device)
        uid, error = _make_unique_id(native, rank, nranks, device) if rank == 0 else (None, None)
        uid = comm.bcast(uid, root=0)
        if error is not None:
            raise error
        if uid is None:
            raise _init_failed(native, "rank 0 could not create the unique id (its error says why)", rank, nranks,
                               device, "no id received")
        _init_native(native, uid, rank, nranks, device, "MPI")


def finalize():
    """Collective: tear SHMEM down; every allocation is released (tensors viewing them dangle)."""
    if not is_initialized():
        return
    with _LOCK:
        torch.cuda.synchronize(_STATE["device"])
        for team in _NODE_TEAMS.values():
            if team is not None and team != _native.team_shared():
                _native.team_destroy(team)
        _NODE_TEAMS.clear()
        for alloc in _ALLOCS.values():
            alloc.freed = True
        _ALLOCS.clear()
        _ALLOC_ADDRS.clear()
        _native.finalize()
        _STATE.update(device=None, rank=None, nranks=None, via=None, members=None)


def _require_init(what):
    if not is_initialized():
        raise RuntimeError(f"shmem.{what}: SHMEM is not initialised; call shmem.init() (or init_mpi()) first")
    return _native


def my_pe():
    return _require_init("my_pe").my_pe()


def n_pes():
    return _require_init("n_pes").n_pes()


def device():
    """The GPU this process gave SHMEM at init."""
    _require_init("device")
    return _STATE["device"]


# ---------------------------------------------------------------------------------------------
# symmetric memory


def _wrap(addr, nbytes, owner):
    """A uint8 tensor [nbytes] at `addr` on our GPU (also for peer addresses mapped into it)."""
    return torch.from_dlpack(_native.as_dlpack(addr, nbytes, _STATE["device"].index, owner))


def malloc(nbytes):
    """Collective: `nbytes` of symmetric memory, as a uint8 CUDA tensor [nbytes] (uninitialised)."""
    native = _require_init("malloc")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ValueError(f"shmem.malloc: nbytes must be a positive int, got {nbytes!r}")
    addr = native.malloc(nbytes)
    alloc = _Allocation(addr, nbytes, _STATE["device"])
    _ALLOCS[addr] = alloc
    bisect.insort(_ALLOC_ADDRS, addr)
    return _wrap(addr, nbytes, alloc)


def empty(shape, dtype=torch.uint8):
    """Collective: an uninitialised symmetric tensor of `shape` and `dtype` (same on every PE)."""
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shmem.empty: negative dimension in shape {shape}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"shmem.empty: dtype must be a torch.dtype, got {dtype!r}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = malloc(max(numel * itemsize, 1))
    return raw[: numel * itemsize].view(dtype).view(shape)


def _allocation_of(t, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"shmem.{what}: expected a tensor from shmem.malloc/empty, got {type(t).__name__}")
    return _allocation_at(t.data_ptr(), t.numel() * t.element_size(), what)


def _allocation_at(addr, nbytes, what):
    """The live allocation holding bytes [addr, addr + nbytes), else ValueError."""
    i = bisect.bisect_right(_ALLOC_ADDRS, addr) - 1
    if i >= 0:
        alloc = _ALLOCS[_ALLOC_ADDRS[i]]
        if addr + nbytes <= alloc.addr + alloc.nbytes:
            return alloc
    raise ValueError(f"shmem.{what}: address {addr:#x} is not inside a live symmetric allocation "
                     "(allocate it with shmem.malloc/empty)")


def free(t):
    """Collective: free the allocation `t` is the start of (every PE, same order). Syncs the GPU first."""
    native = _require_init("free")
    alloc = _allocation_of(t, "free")
    if t.data_ptr() != alloc.addr:
        raise ValueError("shmem.free: pass the tensor malloc/empty returned (or a view starting at its base)")
    torch.cuda.synchronize(_STATE["device"])
    native.free(alloc.addr)
    alloc.freed = True
    del _ALLOCS[alloc.addr]
    _ALLOC_ADDRS.remove(alloc.addr)


def ptr(t, pe):
    """The address (int) at which this GPU loads/stores PE `pe`'s copy of `t`; None if not reachable.

    `t` is a symmetric tensor or an int address inside the symmetric heap.
    """
    native = _require_init("ptr")
    # nvshmem_ptr of an address outside the symmetric heap is undefined
    if isinstance(t, int):
        _allocation_at(t, 1, "ptr")
        addr = t
    else:
        _allocation_of(t, "ptr")
        addr = t.data_ptr()
    if not isinstance(pe, int) or not 0 <= pe < _STATE["nranks"]:
        raise ValueError(f"shmem.ptr: pe must be an int in [0, {_STATE['nranks']}), got {pe!r}")
    out = native.ptr(addr, pe)
    return out or None


def peer_tensor(t, pe):
    """PE `pe`'s copy of symmetric tensor `t` (same shape/dtype), or None when it is not P2P-reachable."""
    _require_init("peer_tensor")
    if not t.is_contiguous():
        raise ValueError("shmem.peer_tensor: `t` must be contiguous")
    alloc = _allocation_of(t, "peer_tensor")
    if pe == _STATE["rank"]:
        return t
    addr = ptr(t.data_ptr(), pe)
    if addr is None:
        return None
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t.new_empty(t.shape)
    return _wrap(addr, nbytes, alloc).view(t.dtype).view(t.shape)


def _stream_handle(stream):
    stream = torch.cuda.current_stream(_STATE["device"]) if stream is None else stream
    return int(stream.cuda_stream)


def barrier_all():
    """Host barrier of all PEs, after this GPU's queued work: writes made before it are visible after."""
    native = _require_init("barrier_all")
    torch.cuda.synchronize(_STATE["device"])
    native.barrier_all()


def barrier_all_on_stream(stream=None):
    """The barrier enqueued on `stream` (default: current); the host does not wait."""
    _require_init("barrier_all_on_stream").barrier_all_on_stream(_stream_handle(stream))


def quiet(stream=None):
    """Complete this PE's outstanding SHMEM operations (host-issued; on `stream` when given)."""
    native = _require_init("quiet")
    if stream is None:
        native.quiet()
    else:
        native.quiet_on_stream(_stream_handle(stream))


def fence():
    """Order this PE's SHMEM puts to each peer (host-issued operations)."""
    _require_init("fence").fence()


# ---------------------------------------------------------------------------------------------
# teams


def team_world():
    return _require_init("team_world").team_world()


def team_shared():
    """The predefined team of PEs sharing a node (NVSHMEM_TEAM_SHARED); None where the library has none."""
    team = _require_init("team_shared").team_shared()
    return None if team == _native.team_invalid() else team


def team_my_pe(team):
    return _require_init("team_my_pe").team_my_pe(team)


def team_n_pes(team):
    return _require_init("team_n_pes").team_n_pes(team)


def team_translate_pe(src_team, pe, dest_team):
    """`pe` of `src_team` as a PE of `dest_team` (-1 when it is not in both)."""
    return _require_init("team_translate_pe").team_translate_pe(src_team, pe, dest_team)


def team_split_strided(parent, start, stride, size):
    """Collective over `parent`: PEs start, start+stride, ... (size of them); None where we are not in it."""
    native = _require_init("team_split_strided")
    if size < 1 or stride < 1 or start < 0:
        raise ValueError(f"shmem.team_split_strided: bad start={start}, stride={stride}, size={size}")
    team = native.team_split_strided(parent, start, stride, size)
    return None if team == native.team_invalid() else team


def team_destroy(team):
    """Collective over `team`."""
    _require_init("team_destroy").team_destroy(team)


def node_team(ranks_per_node=None):
    """The team of this PE's node: PEs [n*k, (n+1)*k) for k ranks per node (cached; collective on first use).

    `ranks_per_node` defaults to TURBO_DIST_RANKS_PER_NODE, then to the library's shared-memory
    team (NVSHMEM_TEAM_SHARED). A forced k lets one host act as several nodes.
    """
    native = _require_init("node_team")
    if ranks_per_node is None:
        from .runtime.config import env_int

        ranks_per_node = env_int("TURBO_DIST_RANKS_PER_NODE", 0) or None
    if ranks_per_node is None:
        shared = team_shared()
        if shared is not None:
            return shared
        ranks_per_node = native.n_pes()
    k, n = int(ranks_per_node), native.n_pes()
    if k < 1 or n % k:
        raise ValueError(f"shmem.node_team: {k} ranks per node does not divide {n} PEs")
    if k not in _NODE_TEAMS:
        mine = None
        for node in range(n // k):  # every PE takes part in every split
            team = team_split_strided(team_world(), node * k, 1, k)
            if team is not None:
                mine = team
        _NODE_TEAMS[k] = mine
    return _NODE_TEAMS[k]
