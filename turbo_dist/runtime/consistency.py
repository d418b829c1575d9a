"""Cross-rank argument checks (opt-in): every rank of a group must pass the same shapes, dtypes and options to a
collective entry point. A rank that does not leaves the others in a collective of another size: gloo aborts the
process ("Received data size doesn't match"), NCCL may hang or read garbage, and an option that differs (a
gather_dim, a cu_seqlens) can return wrong results with no error. Checking costs one small all-reduce and a host
sync per call, so it is off by default; TURBO_DIST_CHECK_RANKS=1 (or torch's own TORCH_DISTRIBUTED_DEBUG=DETAIL)
turns it on for every entry point that calls check_same_on_ranks: TP's fused ops, CP attention, MoE dispatch /
combine (normal and low-latency). A mismatch raises ValueError on every rank, naming the arguments that differ
and each rank's value, before any collective of the call.
"""
import hashlib
import os

import torch
import torch.distributed as dist

from .symm import group_min_max


def enabled():
    """TURBO_DIST_CHECK_RANKS (1 / true / yes / on), else torch's TORCH_DISTRIBUTED_DEBUG=DETAIL."""
    v = os.environ.get("TURBO_DIST_CHECK_RANKS")
    if v is not None and v != "":
        return v.strip().lower() in ("1", "true", "yes", "on")
    return os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL"


def tensor_sig(t):
    """What must agree across ranks about a tensor argument: its shape and dtype (None for None)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), str(t.dtype).replace("torch.", ""))
    if isinstance(t, (list, tuple)):
        return tuple(tensor_sig(x) for x in t)
    return repr(t)


def row_sig(t, dim=None):
    """What must agree across ranks about a tensor whose row count may differ (tokens per rank): its shape past
    dim 0 and dtype; with `dim`, that dim's size alone; tuples / lists element-wise; anything else its repr."""
    if isinstance(t, (list, tuple)):
        return tuple(row_sig(x, dim) for x in t)
    if isinstance(t, torch.Tensor):
        if dim is not None:
            return t.shape[dim] if t.dim() > dim else None
        return (tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""))
    return None if t is None else repr(t)


def check_same_on_ranks(rt, what, **fields):
    """ValueError on every rank of the group when `fields` (name -> a repr-able value: tensor_sig(...), ints,
    strings) differ between ranks; nothing when the check is off (enabled()), the group has one rank, or a CUDA
    graph is being captured. rt: a Runtime, or a process group (None: the default one) resolved only when the
    check is on. Entry points call it first, before their own checks, so that a rank whose arguments another rank
    would refuse does not raise alone and leave the others in this check's all-reduce."""
    if not enabled():
        return
    if not hasattr(rt, "world_size"):
        from . import get_runtime

        rt = get_runtime(rt)
    if rt.world_size <= 1:
        return
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return  # no host sync inside a CUDA-graph capture (the eager calls before it were checked)
    fields = {"call": what, **{k: repr(v) for k, v in fields.items()}}
    digest = int.from_bytes(hashlib.sha1(repr(sorted(fields.items())).encode()).digest()[:7], "little")
    lo, hi = group_min_max(digest, rt.group, rt.device)  # < 2**56: fits the int64 all-reduce
    if lo == hi:
        return
    every = [None] * rt.world_size
    dist.all_gather_object(every, fields, group=rt.group)
    keys = list(dict.fromkeys(k for e in every for k in e))
    differ = [k for k in keys if len({e.get(k) for e in every}) > 1]
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {e.get(k, '(not passed)')}" for r, e in enumerate(every))
                       for k in differ)
    raise ValueError(f"{what}: the ranks of the group passed different arguments ({detail}); every rank must pass "
                     "the same shapes, dtypes and options (checked because TURBO_DIST_CHECK_RANKS / "
                     "TORCH_DISTRIBUTED_DEBUG=DETAIL is set)")


def raise_together(rt, err, what, waiting_in):
    """A refusal of per-rank arguments raised on every rank of the group together: err (this rank's error, or None)
    is raised here after a one-int all-reduce of who failed; a rank that found nothing wrong raises ValueError
    naming `what` instead of going on alone into `waiting_in`, where the failed ranks would never join it. A host
    sync; callers use it where their checks sync anyway (cu_seqlens read on the host) or must be rank-consistent,
    and the packed CP / llama3 paths once per plan (ops._host.memo: every rank must then call alike, as SPMD code
    does; a rank reusing a plan another rank makes anew would meet that rank's all-reduce in the attention)."""
    failed = 1 if err is not None else 0
    worst = group_min_max(failed, rt.group, rt.device)[1] if rt.world_size > 1 else failed
    if err is not None:
        raise err
    if worst:
        raise ValueError(f"{what}: another rank of the group refused its arguments (its error says why); rank "
                         f"{rt.rank} raises too instead of waiting in {waiting_in}")
