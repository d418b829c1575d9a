"""Drop-in kernels for torch's async-TP fused ops: torch.ops.symm_mem.fused_* run turbo_dist.tp.

    import turbo_dist.tp.torch_ops as tp_ops
    dist.init_process_group("nccl")
    tp_ops.install()                          # the ops' CUDA kernels are now ours, until tp_ops.uninstall()
    model = torch.compile(model)              # TorchTitan async TP: inductor's micro-pipeline-TP pass emits the ops
    with tp_ops.use_turbo_dist_ops(devices=("cpu",)):   # scoped (CPU: gloo jobs, CI); restores the previous state
        ...

Inductor's pass fuses only for groups with symmetric memory enabled (`is_symm_mem_enabled_for_group`: in torch 2.13
still set by `enable_symm_mem_for_group(group_name)`, deprecated but called by older TorchTitan, not by newer).

The four functions below take exactly torch's schemas and return what torch's Meta kernels describe (sizes and
strides: inductor takes the output layout from Meta and its generated code asserts it). The kernels are
registered through one `torch.library.Library("symm_mem", "IMPL")`; torch's Meta kernels stay, and torch's own
CUDA kernels come back on `uninstall()`.

What turbo_dist.tp cannot do raises NotImplementedError before anything is communicated (never a silent fall
back to torch's implementation): A not fp16/bf16/fp32 (unscaled ops), an empty `Bs`, a bias or a result scale
(scaled ops), an output dtype that is None (torch._scaled_mm would return FP8), FP8 or other than
fp16/bf16/fp32, `out_dtypes` / `use_fast_accum` that differ between the Bs, and what turbo_dist.tp itself
refuses (all_gather_scaled_matmul gathering the last dim, float8_e5m2 x float8_e5m2).
"""
import contextlib
import importlib
import inspect
import logging
import math
import threading
import warnings

import torch

from . import _common as C
from .ag_matmul import all_gather_matmul, all_gather_scaled_matmul
from .matmul_rs import matmul_reduce_scatter, scaled_matmul_reduce_scatter

log = logging.getLogger("turbo_dist")

# c10::ScalarType values (c10/core/ScalarType.h): a `ScalarType?[]` argument reaches a Python kernel as these ints.
# (torch 2.13's own _maybe_convert_scalar_types_to_dtypes maps 16/17 to float8; c10 has them at 23/24.)
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
                 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}
_SCALAR_TYPES.update({i: getattr(torch, n) for i, n in ((23, "float8_e5m2"), (24, "float8_e4m3fn"),
                                                        (25, "float8_e5m2fnuz"), (26, "float8_e4m3fnuz"))
                      if hasattr(torch, n)})


# ---------------------------------------------------------------------------------------------- helpers
def _resolve_group(group_name):
    """The ProcessGroup registered under `group_name` (torch's `group.group_name`)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not isinstance(group_name, str):
        raise TypeError(f"group_name must be a str (a process group's group_name), got {type(group_name).__name__}")
    try:
        return _resolve_process_group(group_name)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"group_name {group_name!r} does not name a process group of this process (expected the "
                         f"group_name of a live group, e.g. dist.group.WORLD.group_name): {exc}") from exc


def _refuse(op, what):
    raise NotImplementedError(f"turbo_dist.tp.torch_ops.{op}: {what} is not supported by turbo_dist.tp "
                              "(turbo_dist.tp.torch_ops.uninstall() gives torch's own kernel back)")


def _check_float_a(op, a):
    if isinstance(a, torch.Tensor) and a.dtype not in C.FLOAT_DTYPES:
        _refuse(op, f"A of dtype {a.dtype} (turbo_dist.tp takes fp16, bf16 or fp32)")


def _check_bs(op, bs):
    if isinstance(bs, torch.Tensor):
        raise TypeError(f"{op}: Bs must be a list of 2-D tensors, got a single tensor")
    bs = list(bs)
    if not bs:
        _refuse(op, "an empty Bs")
    return bs


def _out_dtype(op, dtype, name):
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        dtype = _SCALAR_TYPES.get(dtype, f"ScalarType {dtype}")
    if dtype is None:
        _refuse(op, f"{name}=None (torch._scaled_mm would return A's float8 dtype; pass fp16, bf16 or fp32)")
    if dtype not in C.FLOAT_DTYPES:
        _refuse(op, f"{name}={dtype} (turbo_dist.tp writes fp16, bf16 or fp32)")
    return dtype


def _check_same_length(op, bs, **lists):
    for name, values in lists.items():
        if len(values) != len(bs):
            raise ValueError(f"{op}: len({name}) is {len(values)}, expected one per B ({len(bs)})")


# -------------------------------------------------------------------------------------------- the ops
def fused_all_gather_matmul(A, Bs, gather_dim, group_name, *, return_A=True):
    """torch.ops.symm_mem.fused_all_gather_matmul on `turbo_dist.tp.all_gather_matmul`.

    A: [..., K] fp16/bf16/fp32 shard (>= 2-D; gather_dim = last dim: [..., K/W]). Bs: list of [K, N_i], A's dtype.
    Returns (A gathered along gather_dim or None, [A_gathered @ B_i]), laid out as torch's Meta kernel says.
    """
    op = "fused_all_gather_matmul"
    _check_float_a(op, A)
    Bs = _check_bs(op, Bs)
    group = _resolve_group(group_name)
    a_out, outs = all_gather_matmul(A, Bs, gather_dim, group, return_a=return_A)
    return a_out, list(outs)


def fused_matmul_reduce_scatter(A, B, reduce_op, scatter_dim, group_name):
    """torch.ops.symm_mem.fused_matmul_reduce_scatter on `turbo_dist.tp.matmul_reduce_scatter`.

    A: [..., K] fp16/bf16/fp32, B: [K, N]; reduce_op 'sum' or 'avg'. Returns the contiguous [..., N] reduced
    product with scatter_dim divided by the group size.
    """
    _check_float_a("fused_matmul_reduce_scatter", A)
    group = _resolve_group(group_name)
    return matmul_reduce_scatter(A, B, scatter_dim, reduce_op, group)


def fused_all_gather_scaled_matmul(A, Bs, A_scale, B_scales, gather_dim, group_name, biases, result_scales,
                                   out_dtypes, use_fast_accum):
    """torch.ops.symm_mem.fused_all_gather_scaled_matmul on `turbo_dist.tp.all_gather_scaled_matmul`.

    A: [..., K] float8 shard; Bs: list of [K, N_i] float8; A_scale fp32: one element, row-wise sharded [..., 1]
    like A or row-wise replicated like the gathered A; B_scales: per B, one element or [1, N_i].
    biases / result_scales: all None. out_dtypes: one fp16/bf16/fp32 dtype for every B; use_fast_accum: one
    value for every B. Returns (A gathered along gather_dim, [out_i]).
    """
    op = "fused_all_gather_scaled_matmul"
    Bs = _check_bs(op, Bs)
    biases, result_scales, out_dtypes, use_fast_accum = (list(v) for v in (biases, result_scales, out_dtypes,
                                                                             use_fast_accum))
    _check_same_length(op, Bs, biases=biases, result_scales=result_scales, out_dtypes=out_dtypes,
                       use_fast_accum=use_fast_accum)
    if any(b is not None for b in biases):
        _refuse(op, "a bias")
    if any(s is not None for s in result_scales):
        _refuse(op, "a result scale (FP8 output)")
    dtypes = [_out_dtype(op, d, f"out_dtypes[{i}]") for i, d in enumerate(out_dtypes)]
    if len(set(dtypes)) > 1:
        _refuse(op, f"out_dtypes that differ between the Bs ({dtypes})")
    if len({bool(f) for f in use_fast_accum}) > 1:
        _refuse(op, f"use_fast_accum that differs between the Bs ({use_fast_accum})")
    group = _resolve_group(group_name)
    a_out, outs = all_gather_scaled_matmul(A, Bs, A_scale, B_scales, gather_dim, group, out_dtype=dtypes[0],
                                           return_a=True, use_fast_accum=bool(use_fast_accum[0]))
    return a_out, list(outs)


def fused_scaled_matmul_reduce_scatter(A, B, A_scale, B_scale, reduce_op, orig_scatter_dim,
                                       scatter_dim_after_maybe_reshape, group_name, output_shape, bias=None,
                                       result_scale=None, out_dtype=None, use_fast_accum=False):
    """torch.ops.symm_mem.fused_scaled_matmul_reduce_scatter on `turbo_dist.tp.scaled_matmul_reduce_scatter`.

    A: [M, K] float8 (or any [..., K] with M rows), B: [K, N] float8, A_scale fp32: one element or row-wise with
    A's leading dims ([M, 1]), B_scale: one element or [1, N]. output_shape: [..., N] with M rows in all; the
    product, viewed as output_shape, is reduced and scattered along orig_scatter_dim (torch's Meta kernel:
    scatter_dim_after_maybe_reshape does not change the result and is not used). bias / result_scale: None;
    out_dtype: fp16/bf16/fp32. Returns a contiguous output_shape with orig_scatter_dim divided by the group size.
    """
    op = "fused_scaled_matmul_reduce_scatter"
    if bias is not None:
        _refuse(op, "a bias")
    if result_scale is not None:
        _refuse(op, "a result scale (FP8 output)")
    out_dtype = _out_dtype(op, out_dtype, "out_dtype")
    C.check_tensor(A, "A", ndim_min=2)
    C.check_tensor(B, "B", ndim=2)
    C.check_tensor(A_scale, "A_scale")
    if output_shape is None:
        raise ValueError(f"{op}: output_shape is required (the [..., N] shape the product is scattered in)")
    output_shape = [int(s) for s in output_shape]
    lead, rows = output_shape[:-1], A.numel() // max(A.shape[-1], 1)
    if len(output_shape) < 2 or output_shape[-1] != B.shape[1] or math.prod(lead) != rows:
        raise ValueError(f"{op}: output_shape {output_shape} does not hold A {tuple(A.shape)} @ B {tuple(B.shape)} "
                         f"(expected [..., {B.shape[1]}] with {rows} rows in all)")
    if A_scale.numel() > 1:
        if A_scale.shape[:-1] != A.shape[:-1]:
            raise ValueError(f"{op}: a row-wise A_scale must have A's leading dims (A {tuple(A.shape)}, A_scale "
                             f"{tuple(A_scale.shape)})")
        A_scale = A_scale.reshape(*lead, A_scale.shape[-1])
    group = _resolve_group(group_name)
    return scaled_matmul_reduce_scatter(A.reshape(*lead, A.shape[-1]), B, A_scale, B_scale, orig_scatter_dim,
                                        reduce_op, group, out_dtype=out_dtype, use_fast_accum=bool(use_fast_accum))


_OPS = {f.__name__: f for f in (fused_all_gather_matmul, fused_matmul_reduce_scatter,
                                fused_all_gather_scaled_matmul, fused_scaled_matmul_reduce_scatter)}

# ------------------------------------------------------------------------------------------ install
_DISPATCH_KEYS = {"cuda": "CUDA", "cpu": "CPU"}
_LOCK = threading.RLock()
_LIB = None          # the torch.library.Library("symm_mem", "IMPL") holding our kernels while installed
_DEVICES = ()        # the devices whose kernels _LIB holds
_TORCH_IMPLS = ()    # torch.library._impls keys of torch's own kernels (CUDA), which uninstall() must keep


@contextlib.contextmanager
def _quiet_override():
    # torch warns (once per process) that a registration overrides its CUDA kernel: that is what install() is for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        yield


def _torch_ops():
    """torch.ops.symm_mem's OpOverloads of the four ops, checked against our signatures."""
    try:  # defines the ops (import_module: an `import torch.x` here would make `torch` a local name)
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        raise RuntimeError(f"turbo_dist.tp.torch_ops: this torch ({torch.__version__}) has no "
                           f"torch.distributed._symmetric_memory: {exc}") from exc
    ops = {}
    for name, fn in _OPS.items():
        try:
            overload = getattr(torch.ops.symm_mem, name).default
        except (AttributeError, RuntimeError):
            raise RuntimeError(f"turbo_dist.tp.torch_ops: torch {torch.__version__} defines no "
                               f"torch.ops.symm_mem.{name}") from None
        theirs = [a.name for a in overload._schema.arguments]
        ours = list(inspect.signature(fn).parameters)
        if theirs != ours:
            raise RuntimeError(f"turbo_dist.tp.torch_ops: torch {torch.__version__}'s symm_mem::{name} takes "
                               f"{theirs}, turbo_dist implements {ours}")
        ops[name] = overload
    return ops


def _dispatch_keys(devices):
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    for d in devices:
        if d not in _DISPATCH_KEYS:
            raise ValueError(f"devices must name {tuple(_DISPATCH_KEYS)}, got {d!r}")
    return tuple(dict.fromkeys(devices))


def install(devices=("cuda",)):
    """Make torch.ops.symm_mem's four async-TP fused ops run turbo_dist.tp on `devices` ('cuda', 'cpu').

    Call after init_process_group and before the compiled model's first step. Idempotent; a later call with
    more devices adds them; they stay until uninstall(). 'cpu': torch has no CPU kernel, so gloo jobs (and CI)
    can call the ops too.
    """
    devices = _dispatch_keys(devices)
    with _LOCK:
        _PINNED.update(devices)
        _sync()


def uninstall():
    """Remove our kernels, also those of open use_turbo_dist_ops blocks: torch's own become active again (CUDA),
    the CPU kernels are gone. No-op if not installed."""
    with _LOCK:
        _PINNED.clear()
        _SCOPES.clear()
        _sync()


def installed():
    """Whether our kernels are registered (on any device)."""
    return _LIB is not None


def installed_devices():
    """The devices whose kernels are ours (() when not installed)."""
    return _DEVICES


@contextlib.contextmanager
def use_turbo_dist_ops(devices=("cuda",)):
    """Our kernels on `devices` for the block. Blocks may overlap (threads) or nest: a device's kernels stay while
    any open block or an install() holds them, and go when the last block holding them exits."""
    devices = _dispatch_keys(devices)
    with _LOCK:
        for d in devices:
            _SCOPES[d] = _SCOPES.get(d, 0) + 1
        _sync()
    try:
        yield
    finally:
        with _LOCK:
            for d in devices:
                if _SCOPES.get(d, 0) > 1:
                    _SCOPES[d] -= 1
                else:
                    _SCOPES.pop(d, None)
            _sync()


_PINNED = set()  # devices install() registered (until uninstall())
_SCOPES = {}     # device -> use_turbo_dist_ops blocks open on it


def _sync():
    """Register exactly the devices an install() or an open block holds (under _LOCK)."""
    global _LIB, _DEVICES, _TORCH_IMPLS
    wanted = tuple(d for d in _DISPATCH_KEYS if d in _PINNED or d in _SCOPES)
    if set(wanted) == set(_DEVICES):
        return
    removed = tuple(d for d in _DEVICES if d not in wanted)
    if removed:  # a Library drops all its registrations at once: rebuild it with those that stay
        # _destroy() (and the Library's finalizer, later) drop its keys from torch.library._impls: not torch's own
        op_impls = getattr(_LIB, "_op_impls", None)
        if op_impls is not None:
            op_impls.difference_update(_TORCH_IMPLS)
        _LIB._destroy()
        _LIB, _DEVICES, _TORCH_IMPLS = None, (), ()
        log.info("turbo_dist.tp.torch_ops: torch.ops.symm_mem's fused ops no longer run turbo_dist.tp on %s",
                 ", ".join(removed))
    new = [d for d in wanted if d not in _DEVICES]
    if not new:
        return
    ops = _torch_ops()
    if _LIB is None:
        impls = getattr(torch.library, "_impls", set())
        _TORCH_IMPLS = tuple(k for k in (f"symm_mem/{n}/{key}" for n in ops for key in _DISPATCH_KEYS.values())
                             if k in impls)
        _LIB = torch.library.Library("symm_mem", "IMPL")
    impls = getattr(torch.library, "_impls", set())
    with _quiet_override():
        for d in new:
            for name, fn in _OPS.items():
                # torch < 2.13 refuses to override a kernel registered from Python (torch's own CUDA ones) while
                # its key is in torch.library._impls (2.13: allow_override); impl() adds the key back
                impls.discard(f"symm_mem/{name}/{_DISPATCH_KEYS[d]}")
                _LIB.impl(name, fn, _DISPATCH_KEYS[d])
    _DEVICES = _DEVICES + tuple(new)
    log.info("turbo_dist.tp.torch_ops: torch.ops.symm_mem.{%s} run turbo_dist.tp on %s", ", ".join(_OPS),
             ", ".join(new))
