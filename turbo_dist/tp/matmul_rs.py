"""Fused GEMM + reduce-scatter: `matmul_reduce_scatter` and its FP8 form `scaled_matmul_reduce_scatter`.

Semantics follow torch.ops.symm_mem.fused_matmul_reduce_scatter: C = A @ B is reduced over the
group and scattered along `scatter_dim` (any dim of the >= 2-D output; the last dim scatters N).
"""
import torch

from turbo_dist.ops.fp8 import check_fp8_operands
from turbo_dist.runtime import get_runtime
from turbo_dist.runtime.consistency import check_same_on_ranks, tensor_sig

from . import _common as C
from . import collective, pipeline


def _prepare(a, b, scatter_dim, reduce_op, group, fp8=False):
    C.check_tensor(a, "a", ndim_min=2)
    C.check_tensor(b, "b", ndim=2)
    C.check_reduce_op(reduce_op)
    rt = get_runtime(group)
    rt.check_tensor(a, "a")
    rt.check_tensor(b, "b")
    if fp8:
        C.check_fp8(a, "a")
        C.check_fp8(b, "b")
    else:
        if a.dtype not in C.FLOAT_DTYPES:
            raise TypeError(f"a must be fp16, bf16 or fp32, got {a.dtype} (FP8: scaled_matmul_reduce_scatter)")
        if b.dtype != a.dtype:
            raise TypeError(f"b is {b.dtype} but a is {a.dtype}")
    if b.shape[0] != a.shape[-1]:
        raise ValueError(f"b has shape {tuple(b.shape)}; expected [{a.shape[-1]}, N] to match a {tuple(a.shape)}")
    scatter_dim = C.normalize_dim(scatter_dim, a.dim(), "scatter_dim")
    w = rt.world_size
    size = b.shape[1] if scatter_dim == a.dim() - 1 else a.shape[scatter_dim]
    if size % w:
        raise ValueError(f"the output's scatter dim {scatter_dim} has size {size}, not divisible by the group "
                         f"size {w} (a {tuple(a.shape)}, b {tuple(b.shape)})")
    return rt, scatter_dim


def _run(rt, a, b, scatter_dim, reduce_op, algo, mm, out_dtype):
    """Shared driver. `mm(x, rows, cols)` computes x @ b[:, cols] where x = A_rows[rows] (A flattened
    with the scatter dim first; `rows`/`cols` are slices, for per-row / per-column scales).
    Returns the reduced output in a's layout."""
    w = rt.world_size
    n = b.shape[1]
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    all_cols = slice(0, n)
    if scatter_dim == a.dim() - 1:
        lead = list(a.shape[:-1])
        a_rows = a.reshape(-1, a.shape[-1])
        rows = a_rows.shape[0]
        all_rows = slice(0, rows)
        ns = n // w

        def produce_all():  # [rows, N] -> rank-major [W * rows, N / W]
            return mm(a_rows, all_rows, all_cols).view(rows, w, ns).transpose(0, 1).reshape(w * rows, ns)

        path = C.choose_algo(rt, algo, rows * ns * itemsize, rows)
        if path == "collective":
            red = collective.reduce_scatter_rows(rt, produce_all(), reduce_op, out_dtype)
        else:
            red = pipeline.produce_reduce_scatter(
                rt, lambda dst: mm(a_rows, all_rows, slice(dst * ns, (dst + 1) * ns)), rows, ns, out_dtype,
                reduce_op, out_dtype, order=path, produce_all=produce_all)
        return red.view(*lead, ns)

    a_rows, leading = C.to_rows(a, scatter_dim)
    rows = a_rows.shape[0]
    m = rows // w
    leading[0] //= w

    def produce(dst):
        return mm(a_rows[dst * m:(dst + 1) * m], slice(dst * m, (dst + 1) * m), all_cols)

    def produce_all():
        return mm(a_rows, slice(0, rows), all_cols)

    path = C.choose_algo(rt, algo, m * n * itemsize, m)
    if path == "collective":
        red = collective.reduce_scatter_rows(rt, produce_all(), reduce_op, out_dtype)
    else:
        red = pipeline.produce_reduce_scatter(rt, produce, m, n, out_dtype, reduce_op, out_dtype, order=path,
                                              produce_all=produce_all)
    return C.from_rows(red, leading, scatter_dim).contiguous()


def matmul_reduce_scatter(a, b, scatter_dim=0, reduce_op="sum", group=None, *, algo=None):
    """(a @ b) reduced ('sum' or 'avg') over `group` and scattered along `scatter_dim`.

    a: [..., K] fp16/bf16/fp32, >= 2-D (this rank's partial input, e.g. a row-parallel activation).
    b: [K, N] same dtype (a weight's transpose `w.t()` is fine, no copy).
    scatter_dim: dim of the [..., N] product to scatter (negative allowed); its size must be
    divisible by the group size. Returns a contiguous [..., N] tensor with that dim divided by W.
    Partials are reduced in fp32 on the symmetric-memory path.
    algo: 'auto' (default, or TURBO_DIST_TP_ALGO), 'ring', 'direct' or 'collective'.
    """
    check_same_on_ranks(group, "matmul_reduce_scatter", a=tensor_sig(a), b=tensor_sig(b), scatter_dim=scatter_dim,
                        reduce_op=reduce_op, algo=algo)
    rt, scatter_dim = _prepare(a, b, scatter_dim, reduce_op, group)
    return _run(rt, a, b, scatter_dim, reduce_op, algo, lambda x, rows, cols: C.gemm(x, b[:, cols]), a.dtype)


def scaled_matmul_reduce_scatter(a, b, a_scale, b_scale, scatter_dim=0, reduce_op="sum", group=None, *,
                                 out_dtype=torch.bfloat16, use_fast_accum=False, algo=None):
    """FP8 GEMM + reduce-scatter: ((a * a_scale) @ (b * b_scale)) reduced over `group`, scattered.

    a: [..., K] float8, >= 2-D. b: [K, N] float8 (column-major preferred on CUDA).
    a_scale: fp32, tensor-wise (1 element) or row-wise [..., 1] (a's leading dims).
    b_scale: fp32, tensor-wise (1 element) or per output column [1, N].
    Partials are `out_dtype`; returns [..., N] `out_dtype` with scatter_dim divided by W.
    GEMMs: torch._scaled_mm on CUDA; on CPU a dequantize-then-fp32-matmul reference.
    """
    check_same_on_ranks(group, "scaled_matmul_reduce_scatter", a=tensor_sig(a), b=tensor_sig(b),
                        a_scale=tensor_sig(a_scale), b_scale=tensor_sig(b_scale), scatter_dim=scatter_dim,
                        reduce_op=reduce_op, out_dtype=out_dtype, use_fast_accum=use_fast_accum, algo=algo)
    rt, scatter_dim = _prepare(a, b, scatter_dim, reduce_op, group, fp8=True)
    C.check_fp8_pair(a, b, "scaled_matmul_reduce_scatter")
    check_fp8_operands("scaled_matmul_reduce_scatter", out_dtype)
    C.check_scale(a_scale, "a_scale")
    rt.check_tensor(a_scale, "a_scale")
    rt.check_tensor(b_scale, "b_scale")
    b_scale = C.check_b_scale(b_scale, b.shape[1], "b_scale")
    row_scale = tensor_scale = None
    if a_scale.numel() == 1:  # tensor-wise (also the row-wise scale of a one-row a: the same thing)
        tensor_scale = a_scale.float().reshape(1, 1)
    elif a_scale.dim() == a.dim() and a_scale.shape[:-1] == a.shape[:-1] and a_scale.shape[-1] == 1:
        row_scale = (a_scale.float().reshape(-1, 1) if scatter_dim == a.dim() - 1
                     else C.to_rows(a_scale.float(), scatter_dim)[0])
    else:
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; expected one element (tensor-wise) or "
                         f"{tuple(a.shape[:-1]) + (1,)} (row-wise)")

    def mm(x, rows, cols):
        s_a = tensor_scale if row_scale is None else row_scale[rows]
        s_b = b_scale if b_scale.numel() == 1 else b_scale[:, cols]
        return C.scaled_mm(x, b[:, cols], s_a, s_b, out_dtype, use_fast_accum)

    return _run(rt, a, b, scatter_dim, reduce_op, algo, mm, out_dtype)
