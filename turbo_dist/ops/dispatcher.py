"""One backend dispatcher for every shared op.

Order of choice for an op: `set_backend(op, name)` > TURBO_DIST_<OP>_BACKEND > autotune cache
(TURBO_DIST_AUTOTUNE=1: time each candidate once per input signature, keep the fastest) >
the op's default order, taking the first backend whose `can_handle` accepts the inputs. An op may
register a measured, input-dependent preference (`set_preference`): a backend it names moves to the
front of the default order for those inputs (only among backends that accept them).
A backend chosen explicitly (setter or env var) that cannot handle the inputs raises: we never
run something other than what was asked for without saying so. `last_backend(op)` tells what
ran, for benches and logs.

The automatic choice is remembered per input signature (shapes, strides, dtypes, devices, 16-byte
alignment of the tensors; values of the scalar arguments): every `can_handle` and preference rule judges
exactly those, so a repeated call skips them (they cost ~10-30 us of Python per call, 3-5% of a 1 ms GEMM
when the GPU waits on the host); an op whose predicates read values adds them with `set_choice_key`.
Registering a backend or changing a setter/preference clears it;
`clear_cache()` does by hand (e.g. after monkeypatching what a `can_handle` reads).
"""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..runtime.config import getenv

log = logging.getLogger("turbo_dist")


@dataclass
class Backend:
    name: str
    fn: Callable
    can_handle: Callable  # (*args, **kwargs) -> bool or str (reason it cannot); True means yes
    priority: int = 0     # lower runs first in the default order


@dataclass
class Op:
    name: str
    backends: Dict[str, Backend] = field(default_factory=dict)
    forced: Optional[str] = None
    last: Optional[str] = None
    autotune_cache: Dict[tuple, str] = field(default_factory=dict)
    signature: Optional[Callable] = None  # (*args, **kwargs) -> hashable key for autotuning
    preference: Optional[Callable] = None  # (*args, **kwargs) -> backend name to try first, or None
    choice_key: Optional[Callable] = None  # (*args, **kwargs) -> what else (values) can_handle reads
    env_var: str = ""  # TURBO_DIST_<OP>_BACKEND

    def __post_init__(self):
        self.env_var = f"TURBO_DIST_{self.name.upper()}_BACKEND"

    def ordered(self) -> List[Backend]:
        return sorted(self.backends.values(), key=lambda b: (b.priority, b.name))


_OPS: Dict[str, Op] = {}
_CHOICE_CACHE: Dict[tuple, str] = {}
_CHOICE_CACHE_MAX = 4096


def clear_cache():
    """Forget every remembered automatic choice (see the module docstring)."""
    _CHOICE_CACHE.clear()


def _op(name) -> Op:
    if name not in _OPS:
        _OPS[name] = Op(name)
    return _OPS[name]


def register_backend(op, name, fn, can_handle=None, priority=0):
    """Register `fn` as backend `name` of `op`. `can_handle(*args, **kwargs)` returns True or a reason str."""
    _op(op).backends[name] = Backend(name, fn, can_handle or (lambda *a, **k: True), priority)
    clear_cache()


def set_signature(op, fn):
    """How autotuning keys an op's inputs (default: shapes, dtypes and devices of tensor args)."""
    _op(op).signature = fn


def set_preference(op, fn):
    """`fn(*args, **kwargs)` names the backend to try first for these inputs (None: the default order)."""
    _op(op).preference = fn
    clear_cache()


def set_choice_key(op, fn):
    """`fn(*args, **kwargs)` -> hashable: what the op's `can_handle`s / preference read beyond the signature
    the choice cache keys on (shapes, strides, dtypes, devices, scalars), e.g. values of a small host tensor.
    It is added to the key, so a cached choice is reused only for inputs that agree on it too."""
    _op(op).choice_key = fn
    clear_cache()


def set_backend(op, name):
    """Force `op` to use backend `name` (None: back to automatic choice)."""
    o = _op(op)
    if name is not None and name not in o.backends:
        raise ValueError(f"op {op!r} has no backend {name!r}; available: {sorted(o.backends)}")
    if o.forced != name:
        o.forced = name
        clear_cache()


def get_backend(op):
    return _op(op).forced


def asked_for(op, name):
    """True when `name` was chosen explicitly for `op`: set_backend or TURBO_DIST_<OP>_BACKEND."""
    o = _op(op)
    return o.forced == name or getenv(o.env_var) == name


def backends(op):
    return [b.name for b in _op(op).ordered()]


def last_backend(op):
    """The backend that ran the last call of `op` (None before any call)."""
    return _op(op).last


def _accepts(backend, args, kwargs):
    try:
        ok = backend.can_handle(*args, **kwargs)
    except Exception as exc:  # a predicate that cannot judge the inputs rejects them
        ok = f"can_handle raised {exc!r}"
    return ok


def _default_signature(args, kwargs):
    key = []
    for v in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if isinstance(v, torch.Tensor):
            key.append((tuple(v.shape), v.dtype, v.device.type, v.is_contiguous()))
        elif isinstance(v, (int, float, bool, str, type(None), torch.dtype)):  # dtypes by value (out_dtype)
            key.append(v)
        else:
            key.append(type(v).__name__)
    return tuple(key)


def _autotune(o, candidates, args, kwargs):
    key = (o.signature or (lambda *a, **k: _default_signature(a, k)))(*args, **kwargs)
    name = o.autotune_cache.get(key)
    if name is not None and name in {b.name for b in candidates}:
        return o.backends[name]
    timings = {}
    for b in candidates:
        try:
            b.fn(*args, **kwargs)  # warm-up / compile
            if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                b.fn(*args, **kwargs)
            if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                torch.cuda.synchronize()
            timings[b.name] = time.perf_counter() - t0
        except Exception as exc:
            log.info("dispatcher: autotune of %s/%s failed: %s", o.name, b.name, exc)
    if not timings:
        return candidates[0]
    best = min(timings, key=timings.get)
    o.autotune_cache[key] = best
    log.info("dispatcher: autotuned %s -> %s (%s)", o.name, best, {k: f"{v*1e3:.3f}ms" for k, v in timings.items()})
    return o.backends[best]


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _choice_key(o, args, kwargs):
    """The input signature the automatic choice of op `o` depends on, or None when an argument is not
    describable (then nothing is cached for the call)."""
    key = [o.name, getenv("TRITON_INTERPRET")]
    for v in (*args, *(kwargs[k] for k in sorted(kwargs))) if kwargs else args:
        if isinstance(v, torch.Tensor):
            key.append((v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16))
        elif isinstance(v, _SCALARS):
            key.append((type(v), v))
        else:
            return None
    if kwargs:
        key.extend(sorted(kwargs))
    extra = o.choice_key
    if extra is not None:
        try:
            key.append(extra(*args, **kwargs))
        except Exception:  # cannot describe the inputs: do not cache this call
            return None
    return tuple(key)


def _capturing():
    """A CUDA graph is being captured on the current stream (checked on a cache miss only; never initializes
    CUDA: without a context there is no capture)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def choose(op, *args, **kwargs) -> Backend:
    """The backend `dispatch` would run for these inputs (see the module docstring for the order)."""
    return _choose(_op(op), args, kwargs)


_ENV_CHECKED = []


def _check_backend_env():
    """Once per process: a TURBO_DIST_*_BACKEND variable that names no op (a typo, a guessed name) is logged,
    not silently ignored."""
    _ENV_CHECKED.append(True)
    known = {o.env_var for o in _OPS.values()}
    for key in sorted(os.environ):
        if key.startswith("TURBO_DIST_") and key.endswith("_BACKEND") and key not in known:
            log.warning("dispatcher: %s names no op and is ignored; the ops' variables: %s", key, sorted(known))


def _choose(o, args, kwargs) -> Backend:
    op = o.name
    if not _ENV_CHECKED:
        _check_backend_env()
    explicit = o.forced or getenv(o.env_var) or None
    if explicit:
        source = "set_backend" if o.forced else o.env_var
        b = o.backends.get(explicit)
        if b is None:
            raise ValueError(f"{source} asks for backend {explicit!r} of {op}; available: {sorted(o.backends)}")
        ok = _accepts(b, args, kwargs)
        if ok is not True:
            raise ValueError(f"backend {explicit!r} (from {source}) cannot run {op} on these inputs: {ok}")
        return b
    autotune = getenv("TURBO_DIST_AUTOTUNE") == "1"
    key = None if autotune else _choice_key(o, args, kwargs)
    if key is not None:
        chosen = _CHOICE_CACHE.get(key)
        if chosen is not None:
            return chosen
    candidates, reasons = [], {}
    for b in o.ordered():
        ok = _accepts(b, args, kwargs)
        if ok is True:
            candidates.append(b)
        else:
            reasons[b.name] = ok
    if not candidates:
        raise ValueError(f"no backend of {op} can run these inputs: {reasons}")
    if o.preference is not None and len(candidates) > 1:
        try:
            first = o.preference(*args, **kwargs)
        except Exception as exc:  # a rule that cannot judge the inputs leaves the default order
            log.debug("dispatcher: preference of %s raised %r", op, exc)
            first = None
        candidates.sort(key=lambda b: b.name != first)
    if len(candidates) > 1 and autotune:
        return _autotune(o, candidates, args, kwargs)
    if key is not None and not _capturing():  # predicates decline some backends only while a graph is captured
        if len(_CHOICE_CACHE) >= _CHOICE_CACHE_MAX:
            _CHOICE_CACHE.clear()
        _CHOICE_CACHE[key] = candidates[0]  # the Backend: registering one clears the cache
    return candidates[0]


def dispatch(op, *args, **kwargs):
    """Run `op` on the chosen backend."""
    o = _OPS.get(op) or _op(op)
    b = _choose(o, args, kwargs)
    if o.last != b.name:
        log.debug("dispatcher: %s -> %s", op, b.name)
    o.last = b.name
    return b.fn(*args, **kwargs)
