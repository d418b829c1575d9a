"""Multi-process test harness: run a function on N ranks (gloo on CPU, NCCL one GPU per rank).

    from turbo_dist.testing import run_distributed
    def body(rank, world_size, n):          # module level, so it pickles
        ...
    results = run_distributed(body, world_size=4, args=(n,))

Ranks live in a pool of spawned processes that is kept between calls with the same world size,
backend and environment (starting torch in a process costs seconds). An exception on any rank
is re-raised here with that rank's traceback; a call that does not finish within `timeout`
seconds kills the pool and raises TimeoutError instead of hanging. After any failure the pool
is discarded, so a rank left stuck in a collective never leaks into the next test.

Shared-GPU test mode (TURBO_DIST_TEST_SHARE_GPU=1, or `share_gpu=True`): with fewer GPUs than
ranks, the ranks run over gloo on CUDA device `rank % num_gpus` (cuda:0 on a one-GPU machine) and
the runtime gives them torch symmetric memory over CUDA IPC, so the peer-pointer kernels, streams
and bounded peer waits run for real; kernels of different processes progress by GPU time-slicing.
gloo stages CUDA tensors through host memory for all_reduce, broadcast, all_gather(_into_tensor),
reduce_scatter_tensor and all_to_all_single; its send/recv (P2P, batch_isend_irecv) take raw data
pointers and do not support CUDA tensors, so code that uses them (CP's ring shift) cannot run there.
"""
import atexit
import datetime
import multiprocessing as mp
import os
import socket
import time
import traceback

from .runtime.config import SAFETY_ENV, SHARE_GPU_RANK_ENV, SHARE_GPU_VAR, share_gpu_mode

DEFAULT_TIMEOUT_S = float(os.environ.get("TURBO_DIST_TEST_TIMEOUT_S", "300"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _num_gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def saved_activations(fn, params=()):
    """(fn()'s result, elements, bytes) of the tensors autograd saves for fn's backward, parameters excluded: the
    activation memory a layer's backward holds (tests and benches compare it with the input shard's)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    numel = nbytes = 0

    def pack(t):
        nonlocal numel, nbytes
        if t.untyped_storage().data_ptr() not in skip:
            numel += t.numel()
            nbytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, numel, nbytes


def default_backend(world_size):
    """NCCL when there is a GPU for every rank, gloo otherwise."""
    return "nccl" if _num_gpus() >= world_size else "gloo"


def resolve_launch(world_size, backend=None, share_gpu=None):
    """(backend, share_gpu) that run_distributed uses for `world_size` ranks.

    share_gpu None: the shared-GPU mode when TURBO_DIST_TEST_SHARE_GPU=1, no backend was asked for
    and there is at least one GPU but fewer than `world_size` (no GPU: plain gloo on CPU; a GPU per
    rank: NCCL). share_gpu True: that mode whatever the GPU count (needs CUDA and gloo). An explicit
    backend="gloo" without share_gpu=True is gloo on CPU.
    """
    if share_gpu is None:
        share_gpu = backend is None and share_gpu_mode() and 0 < _num_gpus() < world_size
    elif share_gpu:
        if backend not in (None, "gloo"):
            raise ValueError(f"share_gpu=True runs the ranks over gloo; got backend={backend!r}")
        if _num_gpus() == 0:
            raise RuntimeError(f"share_gpu=True ({SHARE_GPU_VAR}) needs a CUDA device; none is visible")
    if share_gpu:
        return "gloo", True
    return backend or default_backend(world_size), False


def _worker(rank, world_size, port, backend, share_gpu, env, conn):
    os.environ.update(env)
    os.environ.update(SAFETY_ENV)  # after the caller's env: a test cannot switch NVLink multicast back on
    if share_gpu:
        os.environ.update(SHARE_GPU_RANK_ENV)
    else:
        os.environ.pop(SHARE_GPU_VAR, None)  # the mode is chosen here, not inherited from the parent
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(world_size)),
    )
    import torch
    import torch.distributed as dist

    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        elif share_gpu:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S), **kwargs
        )
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            task = conn.recv()
        except EOFError:
            break
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = fn(rank, world_size, *args, **kwargs)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    try:
        from .runtime import destroy_all

        destroy_all()
        dist.destroy_process_group()
    except Exception:
        pass


# Starting a pool (spawn, import torch, rendezvous) takes seconds, 10+ on a loaded 2-core machine: its own bound,
# never shorter than this, so a short task timeout times the task, not the start.
START_TIMEOUT_S = 120.0


class _Pool:
    def __init__(self, world_size, backend, share_gpu, env, timeout):
        self.world_size = world_size
        for attempt in range(3):
            self._spawn(world_size, backend, share_gpu, env)
            try:
                self._collect(max(timeout, START_TIMEOUT_S), what="process-group start")
                return
            except BaseException as exc:
                self.close(kill=True)  # no rank outlives a failed start
                # the free port was taken by another process before rank 0 bound it: another port
                port_taken = "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower()
                if attempt < 2 and port_taken:
                    continue
                raise

    def _spawn(self, world_size, backend, share_gpu, env):
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        port = free_port()
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world_size, port, backend, share_gpu, env, child),
                            daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    def _collect(self, timeout, what):
        deadline = time.monotonic() + timeout
        results, errors, order = [None] * self.world_size, {}, []
        pending = set(range(self.world_size))
        grace_deadline = None
        while pending:
            now = time.monotonic()
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            if now >= limit:
                break
            for rank in list(pending):
                conn = self.conns[rank]
                if conn.poll(0.01):
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        self.procs[rank].join(timeout=2)  # its pipe closed: reap it, so the exit code is known
                        kind, payload = "error", f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                    pending.discard(rank)
                    if kind == "error":
                        errors[rank] = payload
                        order.append(rank)
                        # Peers of a failed rank are usually stuck in a collective: give them a moment.
                        grace_deadline = grace_deadline or time.monotonic() + 5.0
                    else:
                        results[rank] = payload
                elif not self.procs[rank].is_alive():
                    pending.discard(rank)
                    errors[rank] = f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                    order.append(rank)
                    grace_deadline = grace_deadline or time.monotonic() + 5.0
        if errors:
            # the cause first: a rank that died, else the first to report (its peers then fail in a collective)
            died = [r for r in order if errors[r].startswith(f"rank {r} died")]
            first = (died or order)[0]
            others = "".join(f"\n  rank {r}: {errors[r].strip().splitlines()[-1]}" for r in order if r != first)
            others = f" (ranks {sorted(errors)} failed; the others' last lines:{others})" if len(errors) > 1 else ""
            raise RuntimeError(f"{what} failed on rank {first}{others}:\n{errors[first]}")
        if pending:
            raise TimeoutError(f"{what} timed out after {timeout:.0f}s; ranks {sorted(pending)} did not finish")
        return results

    def run(self, fn, args, kwargs, timeout):
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout, what=getattr(fn, "__name__", "task"))

    def close(self, kill=False):
        for conn, p in zip(self.conns, self.procs):
            if not kill:
                try:
                    conn.send(None)
                except Exception:
                    pass
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS = {}


def run_distributed(fn, world_size, args=(), kwargs=None, backend=None, env=None, timeout=None, share_gpu=None):
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` ranks; return the per-rank results.

    backend: "gloo" or "nccl" (default: NCCL if there is a GPU per rank, else gloo).
    env: extra environment variables for the ranks (part of the pool's identity).
    share_gpu: run the ranks over gloo on shared GPUs (see the module docstring and resolve_launch;
    default: when TURBO_DIST_TEST_SHARE_GPU=1 and there are fewer GPUs than ranks).
    """
    backend, share_gpu = resolve_launch(world_size, backend, share_gpu)
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    env = dict(env or {})
    key = (world_size, backend, share_gpu, tuple(sorted(env.items())))
    pool = _POOLS.get(key)
    if pool is None:
        while len(_POOLS) >= 2:  # bound the processes (and GPU contexts) kept alive
            _POOLS.pop(next(iter(_POOLS))).close()
        pool = _Pool(world_size, backend, share_gpu, env, timeout)
        _POOLS[key] = pool
    try:
        return pool.run(fn, tuple(args), dict(kwargs or {}), timeout)
    except BaseException:
        _POOLS.pop(key, None)
        pool.close(kill=True)
        raise


def shutdown_pools():
    for key in list(_POOLS):
        _POOLS.pop(key).close()


atexit.register(shutdown_pools)


def under_launcher():
    """True when this process was started by torchrun or launch/mpirun.sh (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_script(fn, args, nproc, backend="gloo"):
    """Entry point of the example scripts: `fn(rank, world_size, args)` on every rank; returns every rank's
    result (rank order).

    Under a launcher (torchrun, launch/mpirun.sh): initialise the default group (NCCL with one GPU per rank
    when CUDA is present, else gloo), run `fn`, gather the results to every rank, release the runtimes and
    destroy the group. Otherwise: spawn `nproc` ranks on this machine with run_distributed (`backend`:
    "gloo", or None for NCCL when there is a GPU per rank).
    """
    import torch
    import torch.distributed as dist

    from turbo_dist.runtime import apply_safety_env, destroy_all

    apply_safety_env()
    if not under_launcher():
        try:
            return run_distributed(fn, nproc, args=(args,), backend=backend)
        finally:
            shutdown_pools()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    try:
        result = fn(dist.get_rank(), dist.get_world_size(), args)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        return gathered
    finally:
        destroy_all()
        dist.destroy_process_group()
