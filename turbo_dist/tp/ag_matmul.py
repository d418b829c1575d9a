"""Fused all-gather + GEMM: `all_gather_matmul` and its FP8 form `all_gather_scaled_matmul`.

Semantics follow torch.ops.symm_mem.fused_all_gather_matmul: A is gathered along `gather_dim`
(any dim of a >= 2-D input) and multiplied by each B; gathering the last dim gathers the
contraction dim (out = sum over ranks of A_r @ B[rows of r]). The implementation is picked by
`algo` / TURBO_DIST_TP_ALGO (see turbo_dist.tp docstring).
"""
import torch

from turbo_dist.ops.fp8 import check_fp8_operands
from turbo_dist.runtime import get_runtime
from turbo_dist.runtime.consistency import check_same_on_ranks, tensor_sig

from . import _common as C
from . import collective, pipeline


def _check_bs(bs, k_full, a, name="bs", fp8=False):
    if isinstance(bs, torch.Tensor):
        raise TypeError(f"{name} must be a list of 2-D tensors (got a single tensor: wrap it as [b])")
    bs = list(bs)
    if not bs:
        raise ValueError(f"{name} must hold at least one matrix")
    for i, b in enumerate(bs):
        C.check_tensor(b, f"{name}[{i}]", ndim=2)
        if b.shape[0] != k_full:
            raise ValueError(f"{name}[{i}] has shape {tuple(b.shape)}; expected [{k_full}, N] to match the gathered "
                             f"A's last dim {k_full}")
        if fp8:
            C.check_fp8(b, f"{name}[{i}]")
        elif b.dtype != a.dtype:
            raise TypeError(f"{name}[{i}] is {b.dtype} but a_shard is {a.dtype}")
        if b.device != a.device:
            raise ValueError(f"{name}[{i}] is on {b.device} but a_shard is on {a.device}")
    return bs


def _prepare(a_shard, gather_dim, group, name="a_shard"):
    C.check_tensor(a_shard, name, ndim_min=2)
    rt = get_runtime(group)
    rt.check_tensor(a_shard, name)
    gather_dim = C.normalize_dim(gather_dim, a_shard.dim(), "gather_dim")
    return rt, gather_dim


def all_gather_matmul(a_shard, bs, gather_dim=0, group=None, *, return_a=True, algo=None, out_dtype=None):
    """All-gather `a_shard` along `gather_dim` over `group` and multiply by every matrix of `bs`.

    a_shard: [..., K] fp16/bf16/fp32, >= 2-D, this rank's shard (same shape on every rank).
    bs: list of [K, N_i] matrices, same dtype/device (a weight's transpose `w.t()` is fine, no copy).
        With gather_dim = last dim, a_shard is [..., K/W] and each b is [K, N_i].
    gather_dim: the dim of a_shard that is sharded (negative allowed).
    Returns (a_gathered or None, [a_gathered @ b for b in bs]): a_gathered has a_shard's shape with
    gather_dim multiplied by the group size (a view; not contiguous unless gather_dim == 0);
    outputs are [..., N_i] in the same layout.
    algo: 'auto' (default, or TURBO_DIST_TP_ALGO), 'ring', 'direct' (symmetric memory) or 'collective'.
    out_dtype: the outputs' dtype (default a_shard's; fp32 keeps the fp32 accumulation, e.g. for a weight
    gradient added into an fp32 main_grad).
    """
    check_same_on_ranks(group, "all_gather_matmul", a_shard=tensor_sig(a_shard), bs=tensor_sig(bs),
                        gather_dim=gather_dim, return_a=return_a, algo=algo, out_dtype=out_dtype)
    rt, gather_dim = _prepare(a_shard, gather_dim, group)
    if a_shard.dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"a_shard must be fp16, bf16 or fp32, got {a_shard.dtype} (FP8: all_gather_scaled_matmul)")
    if out_dtype is None:
        out_dtype = a_shard.dtype
    elif out_dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    w = rt.world_size
    last = gather_dim == a_shard.dim() - 1
    k_full = a_shard.shape[-1] * (w if last else 1)
    bs = _check_bs(bs, k_full, a_shard)
    if last:
        return _ag_matmul_last_dim(rt, a_shard, bs, return_a, algo, out_dtype)

    a_rows, leading = C.to_rows(a_shard, gather_dim)
    m = a_rows.shape[0]
    path = C.choose_algo(rt, algo, a_rows.numel() * a_rows.element_size(), m)
    if path == "collective":
        gathered = collective.all_gather_rows(rt, a_rows)
        outs = [C.gemm(gathered, b, out_dtype) for b in bs]
    else:
        outs = [a_rows.new_empty(w * m, b.shape[1], dtype=out_dtype) for b in bs]

        def consume(chunks, src):
            for b, o in zip(bs, outs):
                C.gemm_into(chunks[0], b, o[src * m:(src + 1) * m])

        def consume_all(full):
            for b, o in zip(bs, outs):
                C.gemm_into(full[0], b, o)

        (gathered,) = pipeline.all_gather_consume(rt, [a_rows], consume, consume_all, order=path)
    outs = [C.gathered_from_rows(o, w, leading, gather_dim) for o in outs]
    a_out = C.gathered_from_rows(gathered, w, leading, gather_dim) if return_a else None
    return a_out, outs


def _ag_matmul_last_dim(rt, a_shard, bs, return_a, algo, out_dtype):
    # The contraction dim is sharded: out = sum_r A_r @ B[r*Ks:(r+1)*Ks], accumulated in fp32.
    w = rt.world_size
    lead = list(a_shard.shape[:-1])
    a_rows = a_shard.reshape(-1, a_shard.shape[-1]).contiguous()
    m, ks = a_rows.shape
    path = C.choose_algo(rt, algo, a_rows.numel() * a_rows.element_size(), m)
    if path == "collective":
        gathered = collective.all_gather_rows(rt, a_rows)
        full = gathered.view(w, m, ks).permute(1, 0, 2).reshape(m, w * ks)
        outs = [C.gemm(full, b, out_dtype) for b in bs]
    else:
        accs = [torch.zeros(m, b.shape[1], dtype=torch.float32, device=a_rows.device) for b in bs]

        def consume(chunks, src):
            for b, acc in zip(bs, accs):
                acc.add_(C.gemm(chunks[0], b[src * ks:(src + 1) * ks], out_dtype=torch.float32))

        (gathered,) = pipeline.all_gather_consume(rt, [a_rows], consume, None, order=path)
        outs = [acc.to(out_dtype) for acc in accs]
        full = gathered.view(w, m, ks).permute(1, 0, 2).reshape(m, w * ks) if return_a else None
    outs = [o.view(*lead, o.shape[-1]) for o in outs]
    return (full.view(*lead, w * ks) if return_a else None), outs


def _a_scale_mode(a_shard, a_scale, gather_dim, w):
    """'tensor' (one element), 'row_sharded' ([..., 1] like a_shard) or 'row_replicated' ([..., 1] like
    the gathered A); rows are A's leading dims (the last dim, K, is never scaled per element)."""
    C.check_tensor(a_scale, "a_scale")
    full = list(a_shard.shape)
    full[gather_dim] *= w
    if a_scale.dim() == a_shard.dim() and a_scale.shape[-1] == 1:
        if tuple(a_scale.shape[:-1]) == tuple(a_shard.shape[:-1]):
            return "row_sharded"  # ambiguous with row_replicated only when W == 1, where they agree
        if list(a_scale.shape[:-1]) == full[:-1]:
            return "row_replicated"
    if a_scale.numel() == 1:
        return "tensor"
    raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; expected one element (tensor-wise), "
                     f"{tuple(a_shard.shape[:-1]) + (1,)} (row-wise, sharded like a_shard) or "
                     f"{tuple(full[:-1]) + (1,)} (row-wise, replicated)")


def all_gather_scaled_matmul(a_shard, bs, a_scale, b_scales, gather_dim=0, group=None, *,
                             out_dtype=torch.bfloat16, return_a=True, use_fast_accum=False, algo=None):
    """FP8 all-gather + scaled GEMM: out_i = (A * a_scale) @ (b_i * b_scales[i]), A gathered along gather_dim.

    a_shard: [..., K] float8 (e4m3fn or e5m2), >= 2-D. bs: list of [K, N_i] float8 (column-major,
    e.g. `w.t()` of a row-major [N, K] weight, avoids a transpose on CUDA).
    a_scale: fp32 dequantization scale: tensor-wise (1 element) or row-wise [..., 1], either sharded
    like a_shard (gathered alongside A) or replicated like the gathered A.
    b_scales: per b, tensor-wise (1 element) or per output column ([1, N_i]).
    gather_dim: any dim but the last (gathering the contraction dim of FP8 is not supported).
    Returns (a_gathered fp8 or None, [out_i of shape [..., N_i], out_dtype]).
    GEMMs: torch._scaled_mm on CUDA; on CPU a dequantize-then-fp32-matmul reference.
    """
    check_same_on_ranks(group, "all_gather_scaled_matmul", a_shard=tensor_sig(a_shard), bs=tensor_sig(bs),
                        a_scale=tensor_sig(a_scale), b_scales=tensor_sig(b_scales), gather_dim=gather_dim,
                        return_a=return_a, out_dtype=out_dtype, use_fast_accum=use_fast_accum, algo=algo)
    rt, gather_dim = _prepare(a_shard, gather_dim, group)
    C.check_fp8(a_shard, "a_shard")
    check_fp8_operands("all_gather_scaled_matmul", out_dtype)
    if gather_dim == a_shard.dim() - 1:
        raise NotImplementedError("all_gather_scaled_matmul: gathering the last (contraction) dim is not supported")
    w = rt.world_size
    bs = _check_bs(bs, a_shard.shape[-1], a_shard, fp8=True)
    b_scales = list(b_scales) if not isinstance(b_scales, torch.Tensor) else [b_scales]
    if len(b_scales) != len(bs):
        raise ValueError(f"got {len(bs)} matrices in bs but {len(b_scales)} b_scales")
    for i, (s, b) in enumerate(zip(b_scales, bs)):  # all before anything is gathered
        C.check_fp8_pair(a_shard, b, f"all_gather_scaled_matmul (a_shard, bs[{i}])")
    b_scales = [C.check_b_scale(s, b.shape[1], f"b_scales[{i}]") for i, (s, b) in enumerate(zip(b_scales, bs))]
    C.check_scale(a_scale, "a_scale")
    mode = _a_scale_mode(a_shard, a_scale, gather_dim, w)
    for name, t in [("a_scale", a_scale)] + [(f"bs[{i}]", b) for i, b in enumerate(bs)] + \
            [(f"b_scales[{i}]", s) for i, s in enumerate(b_scales)]:
        rt.check_tensor(t, name)

    a_rows, leading = C.to_rows(a_shard, gather_dim)
    m = a_rows.shape[0]
    shards = [a_rows]
    if mode == "row_sharded":
        shards.append(C.to_rows(a_scale.float(), gather_dim)[0])
    elif mode == "row_replicated":
        scale_rows_full = C.to_rows(a_scale.float(), gather_dim)[0]  # rank-major like the gathered rows
    else:
        tensor_scale = a_scale.float().reshape(1, 1)

    def scale_of(chunks, src):
        if mode == "row_sharded":
            return chunks[1]
        if mode == "row_replicated":
            return scale_rows_full[src * m:(src + 1) * m]
        return tensor_scale

    def mm(a2, s2, b, bsc):
        return C.scaled_mm(a2, b, s2, bsc, out_dtype, use_fast_accum)

    path = C.choose_algo(rt, algo, a_rows.numel() * a_rows.element_size(), m)
    if path == "collective":
        gathered = [collective.all_gather_rows(rt, s) for s in shards]
        if mode == "row_sharded":
            full_scale = gathered[1]
        elif mode == "row_replicated":
            full_scale = scale_rows_full
        else:
            full_scale = tensor_scale
        outs = [mm(gathered[0], full_scale, b, bsc) for b, bsc in zip(bs, b_scales)]
    else:
        outs = [torch.empty(w * m, b.shape[1], dtype=out_dtype, device=a_rows.device) for b in bs]

        def consume(chunks, src):
            for b, bsc, o in zip(bs, b_scales, outs):
                o[src * m:(src + 1) * m].copy_(mm(chunks[0], scale_of(chunks, src), b, bsc))

        gathered = pipeline.all_gather_consume(rt, shards, consume, None, order=path)
    outs = [C.gathered_from_rows(o, w, leading, gather_dim) for o in outs]
    a_out = C.gathered_from_rows(gathered[0], w, leading, gather_dim) if return_a else None
    return a_out, outs
