"""What the host derives from small tensors (cu_seqlens and the plans made from them), made once per tensor
state instead of once per call.

A packed batch's cu_seqlens tensor is passed to every attention layer of the model; reading it back (a device
sync) and re-deriving the same plan on every layer stalls the CPU each time. `memo(owner, key, make)` keeps
make()'s result per (owner tensor, key) for as long as the owner, and every tensor in `deps`, is the same object
at the same version counter: an in-place write (copy_, add_, ..., anything autograd tracks) starts over. Writes
the version counter does not see (through `.data`, a raw kernel or NCCL into the storage) are not seen here
either: pass a new tensor, or a fresh clone, for new values. Inference tensors (torch.inference_mode) have no
version counter and are never cached.

Nothing is stored on the tensor itself (it stays picklable); entries go when their tensor does.
"""
import weakref

import torch

_TABLE = {}       # id(owner) -> (weakref to owner, {key: (owner version, ((weakref, version) of deps), value)})
# Tensors tracked at once (the oldest dropped; a batch uses a handful). Every rank must track the same tensors in
# the same order (the packed CP plan skips its cross-rank check on a hit): only tensors every rank's call passes
# (cu_seqlens) or makes alike (the plan's cu tensors) are owners, never per-rank ones (index tensors of a plan).
_MAX_OWNERS = 64
_MAX_KEYS = 16     # entries per tensor


def _version(t):
    """t's version counter, or None where t has none (inference tensors, non-tensors)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return None if t.is_inference() else t._version
    except (RuntimeError, AttributeError):
        return None


def _forget(ref, i):
    rec = _TABLE.get(i)
    if rec is not None and rec[0] is ref:
        del _TABLE[i]


def memo(owner, key, make, deps=()):
    """make(), once per state of `owner` (a tensor) and `deps` (tensors) under `key` (hashable: everything else
    make() depends on). An exception from make() caches nothing. Unhashable keys and untrackable tensors call
    make() every time."""
    version = _version(owner)
    dep_state = tuple((d, _version(d)) for d in deps)
    try:
        hash(key)
    except TypeError:
        return make()
    if version is None or any(v is None for _, v in dep_state):
        return make()
    rec = _TABLE.get(id(owner))
    if rec is not None and rec[0]() is not owner:  # an id reused before the callback ran
        rec = None
    if rec is not None:
        hit = rec[1].get(key)
        if hit is not None and hit[0] == version and len(hit[1]) == len(dep_state) and \
                all(r() is d and v == dv for (r, v), (d, dv) in zip(hit[1], dep_state)):
            return hit[2]
    value = make()
    if rec is None:
        i = id(owner)
        rec = (weakref.ref(owner, lambda r, i=i: _forget(r, i)), {})
        _TABLE[i] = rec
        while len(_TABLE) > _MAX_OWNERS:
            del _TABLE[next(iter(_TABLE))]
    entries = rec[1]
    entries.pop(key, None)
    entries[key] = (version, tuple((weakref.ref(d), v) for d, v in dep_state), value)
    while len(entries) > _MAX_KEYS:
        del entries[next(iter(entries))]
    return value


_VALUES = "host_values"  # memo key of a tensor's host values (host_values, device_ints)


def tensors_key(*tensors):
    """The part of a memo key that says which shapes, strides, dtypes and devices a call's tensor arguments had
    (None where one is not a tensor: the caller's checks refuse it, nothing is cached)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def host_values(t):
    """t's values as a list of Python ints (1-D integer tensor), read back once per state of t."""
    return memo(t, _VALUES, lambda: [int(x) for x in t.tolist()])


def device_ints(vals, dtype, device, remember=False):
    """A tensor of `vals` (ints) on `device`, copied from pinned memory (from pageable memory the copy waits for
    the stream: a host sync). remember: keep vals as its host values (host_values then reads nothing back; only
    for tensors every rank makes alike, see _MAX_OWNERS)."""
    t = vals.to(dtype) if isinstance(vals, torch.Tensor) else torch.tensor(vals, dtype=dtype)  # (host values)
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # a replay would copy from a reused staging buffer
            raise RuntimeError("a host-side plan (cu_seqlens) cannot be made during CUDA-graph capture: run the "
                               "call once before capturing (the plan is kept per cu_seqlens tensor)")
        t = t.pin_memory().to(device, non_blocking=True)
    elif device != t.device:
        t = t.to(device)
    if remember and t.dim() == 1:
        held = [int(x) for x in (vals.tolist() if isinstance(vals, torch.Tensor) else vals)]
        memo(t, _VALUES, lambda: held)
    return t


def cache_info():
    """(tensors tracked, entries): for tests and debugging."""
    return len(_TABLE), sum(len(rec[1]) for rec in _TABLE.values())
