"""Asynchronous collectives for CP, launched on the runtime's communication stream.

Each call returns a `Pending`: `wait()` makes the caller's current stream wait for the transfer
(CUDA) or blocks until it is done (gloo) and returns the received tensor. On CUDA the launch
first makes the comm stream wait for the current stream, so inputs produced just before are ready.

Shared-GPU test mode (gloo on CUDA tensors, `Runtime.shares_gpu`): gloo has no all-to-all,
reduce-scatter or P2P on CUDA tensors, so each call stages through host memory and completes before
it returns (correctness only; the GPU kernels of the modes still run on the GPU).

A group of one rank needs no communication: the calls return their input. Tests set
`EXERCISE_SINGLE_RANK = True` to run the real collectives anyway (all-to-all/all-gather/reduce-scatter
on the comm stream), so that one GPU checks their stream handling; ring shifts never happen at cp=1.
"""
import contextlib

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

EXERCISE_SINGLE_RANK = False


def _skip(rt):
    return rt.world_size == 1 and not EXERCISE_SINGLE_RANK


class Pending:
    __slots__ = ("works", "result")

    def __init__(self, works, result):
        self.works = works
        self.result = result

    def wait(self):
        for w in self.works:
            w.wait()
        self.works = []
        return self.result


@contextlib.contextmanager
def on_comm_stream(rt):
    if rt.comm_stream is None:
        yield
        return
    rt.comm_stream.wait_stream(torch.cuda.current_stream(rt.device))
    with torch.cuda.stream(rt.comm_stream):
        yield


def _works(w):
    if w is None:
        return []
    return list(w) if isinstance(w, (list, tuple)) else [w]


def _staged(fn, x, rt):
    """Shared-GPU test mode: run `fn` (a collective taking and returning host tensors) on a host copy of the
    CUDA tensor x, synchronously, and hand back the result on x's device; None outside that mode."""
    if not (getattr(rt, "shares_gpu", False) and x.is_cuda):
        return None
    return Pending([], fn(x.detach().cpu()).to(x.device))


def all_gather(x, rt):
    """x: [*shape] -> Pending of [cp, *shape] (rank-major)."""
    if _skip(rt):
        return Pending([], x.unsqueeze(0))
    staged = _staged(lambda h: all_gather(h, rt).wait(), x, rt)
    if staged is not None:
        return staged
    x = x.contiguous()
    # Flat [cp * n, ...] output: what every backend accepts (gloo rejects a stacked shape).
    out = torch.empty((rt.world_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with on_comm_stream(rt):
        w = _all_gather(out, x, group=rt.group, async_op=True)
    return Pending(_works(w), out.view((rt.world_size,) + tuple(x.shape)))


def reduce_scatter(x, rt):
    """x: [cp, *shape] (slice i goes to rank i) -> Pending of [*shape], summed over ranks."""
    if _skip(rt):
        return Pending([], x[0])
    staged = _staged(lambda h: reduce_scatter(h, rt).wait(), x, rt)
    if staged is not None:
        return staged
    x = x.contiguous()
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with on_comm_stream(rt):
        w = _reduce_scatter(out, x.flatten(0, 1), group=rt.group, async_op=True)
    return Pending(_works(w), out)


def all_to_all(x, rt):
    """x: [cp, ...] (slice i goes to rank i) -> Pending of [cp, ...] (slice i came from rank i)."""
    if _skip(rt):
        return Pending([], x)
    staged = _staged(lambda h: all_to_all(h, rt).wait(), x, rt)
    if staged is not None:
        return staged
    x = x.contiguous()
    out = torch.empty_like(x)
    with on_comm_stream(rt):
        w = dist.all_to_all_single(out, x, group=rt.group, async_op=True)
    return Pending(_works(w), out)


def _global_rank(rt, group_rank):
    if rt.group is None or rt.group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(rt.group, group_rank)


def ring_shift(x, rt):
    """Send x to the next rank of the ring, receive the previous rank's x: Pending of the received tensor."""
    if rt.world_size == 1:  # torch rejects P2P to self; the ring never shifts at cp=1 anyway
        return Pending([], x)
    staged = _staged(lambda h: ring_shift(h, rt).wait(), x, rt)
    if staged is not None:
        return staged
    x = x.contiguous()
    recv = torch.empty_like(x)
    nxt = _global_rank(rt, (rt.rank + 1) % rt.world_size)
    prv = _global_rank(rt, (rt.rank - 1) % rt.world_size)
    ops = [dist.P2POp(dist.isend, x, nxt, group=rt.group), dist.P2POp(dist.irecv, recv, prv, group=rt.group)]
    with on_comm_stream(rt):
        works = dist.batch_isend_irecv(ops)
    return Pending(_works(works), recv)
