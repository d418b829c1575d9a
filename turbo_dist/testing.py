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
"""
import atexit
import datetime
import multiprocessing as mp
import os
import socket
import time
import traceback

from .runtime.config import SAFETY_ENV

DEFAULT_TIMEOUT_S = float(os.environ.get("TURBO_DIST_TEST_TIMEOUT_S", "300"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size):
    """NCCL when there is a GPU for every rank, gloo otherwise."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _worker(rank, world_size, port, backend, env, conn):
    os.environ.update(SAFETY_ENV)
    os.environ.update(env)
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


class _Pool:
    def __init__(self, world_size, backend, env, timeout):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.procs, self.conns = [], []
        port = free_port()
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world_size, port, backend, env, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._collect(timeout, what="process-group start")

    def _collect(self, timeout, what):
        deadline = time.monotonic() + timeout
        results, errors = [None] * self.world_size, {}
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
                        kind, payload = "error", f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                    pending.discard(rank)
                    if kind == "error":
                        errors[rank] = payload
                        # Peers of a failed rank are usually stuck in a collective: give them a moment.
                        grace_deadline = grace_deadline or time.monotonic() + 5.0
                    else:
                        results[rank] = payload
                elif not self.procs[rank].is_alive():
                    pending.discard(rank)
                    errors[rank] = f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                    grace_deadline = grace_deadline or time.monotonic() + 5.0
        if errors:
            first = min(errors)
            others = f" (ranks {sorted(errors)} failed)" if len(errors) > 1 else ""
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


def run_distributed(fn, world_size, args=(), kwargs=None, backend=None, env=None, timeout=None):
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` ranks; return the per-rank results.

    backend: "gloo" or "nccl" (default: NCCL if there is a GPU per rank, else gloo).
    env: extra environment variables for the ranks (part of the pool's identity).
    """
    backend = backend or default_backend(world_size)
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    env = dict(env or {})
    key = (world_size, backend, tuple(sorted(env.items())))
    pool = _POOLS.get(key)
    if pool is None:
        while len(_POOLS) >= 2:  # bound the processes (and GPU contexts) kept alive
            _POOLS.pop(next(iter(_POOLS))).close()
        pool = _Pool(world_size, backend, env, timeout)
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
