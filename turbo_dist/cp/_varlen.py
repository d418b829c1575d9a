"""Packed-sequence attention calls inside the CP modes: the inputs were validated once at the entry
(cp.context_parallel_attention) and the local cu_seqlens are built by the modes, so these go straight to
the dispatcher (the public functions would read cu_seqlens back to the host on every ring step). Also the
local call's plan and its keys, shared by the ring and all-gather modes."""
import torch

from turbo_dist.ops import dispatcher
from turbo_dist.ops._host import device_ints


def varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """o [Tq, Hq, D], lse [Hq, Tq]."""
    return dispatcher.dispatch("attention_varlen_fwd", q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """dq, dk, dv."""
    do = do if do.dtype == q.dtype else do.to(q.dtype)
    return dispatcher.dispatch("attention_varlen_bwd", do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal,
                               scale)


def local_plan(cq, ck, keys, dev):
    """(cu_q, cu_k, max_q, max_k, keys) of one local varlen call: host cu lists -> int32 on `dev`, their
    maxima, and `keys`: the rows of the K/V source it attends, a (start, end) slice or an int64 index tensor.
    Made once per packed batch (cp._packed_attention keeps it per cu_seqlens tensor), copied from pinned memory."""
    return (device_ints(cq, torch.int32, dev), device_ints(ck, torch.int32, dev),
            max((b - a for a, b in zip(cq, cq[1:])), default=0), max((b - a for a, b in zip(ck, ck[1:])), default=0),
            keys)


def take_keys(t, keys):
    """The rows `keys` (slice or index tensor, see local_plan) of t [rows, ...], contiguous."""
    return t[keys[0]:keys[1]].contiguous() if isinstance(keys, tuple) else t.index_select(0, keys)


def add_keys(acc, keys, grad):
    """acc[keys] += grad (rows used twice by an index tensor are summed)."""
    if isinstance(keys, tuple):
        acc[keys[0]:keys[1]] += grad
    else:
        acc.index_add_(0, keys, grad.to(acc.dtype))
