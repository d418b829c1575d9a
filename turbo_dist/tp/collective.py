"""Collective fallback: plain all_gather_into_tensor / reduce_scatter_tensor (NCCL or gloo).

Used on CPU (gloo), without peer access, or when asked for (algo='collective'). It is also the
reference the symmetric-memory pipelines are tested against. Works on rank-major 2-D matrices.
"""
import torch
import torch.distributed as dist


def _comm_view(t):
    # FP8 and other odd dtypes travel as bytes (gloo and older NCCL lack them); the bits are unchanged.
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
                   torch.uint8, torch.int8):
        return t
    return t.view(torch.uint8)


def _all_gather(out, inp, group):
    # torch >= 2.12 renamed all_gather_into_tensor / reduce_scatter_tensor (now deprecated) to *_single.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter(out, inp, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


def all_gather_rows(rt, shard):
    """shard [m, k] -> [W * m, k], rank r's rows at r*m (exact copy)."""
    shard = shard.contiguous()
    out = shard.new_empty(rt.world_size * shard.shape[0], *shard.shape[1:])
    if rt.world_size == 1:
        out.copy_(shard)
        return out
    _all_gather(_comm_view(out), _comm_view(shard), rt.group)
    return out


def reduce_scatter_rows(rt, full, reduce_op, out_dtype):
    """full [W * m, n] (rank-major blocks of rows) -> this rank's block summed (or averaged) over ranks.

    The reduction runs in fp32 on gloo (which lacks bf16/fp16 reductions) and in the input dtype on
    NCCL (what the sequential baseline does); the result is cast to `out_dtype`.
    """
    w = rt.world_size
    if full.shape[0] % w:
        raise ValueError(f"reduce-scatter of {full.shape[0]} rows over {w} ranks")
    if w == 1:
        out = full.float() if reduce_op == "avg" else full
        return out.to(out_dtype) if out.dtype != out_dtype else out.clone()
    gloo = "gloo" in rt.backend
    send = full.float() if (gloo or full.dtype not in (torch.float16, torch.bfloat16, torch.float32)) else full
    send = send.contiguous()
    out = send.new_empty(full.shape[0] // w, *full.shape[1:])
    _reduce_scatter(out, send, rt.group)
    if reduce_op == "avg":
        out = out.float() / w
    return out.to(out_dtype)
