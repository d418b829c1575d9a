"""The input a column-parallel layer keeps for its weight gradient, at the memory of one shard.

Under sequence parallelism a column layer computes y = all_gather(x) @ W^T, and its weight gradient
dW = dy^T @ all_gather(x) needs the gathered input again in backward. Keeping the gathered input costs W times
the shard per layer (Megatron keeps the shard and all-gathers it again in backward, overlapped with dgrad).

Here the forward keeps this rank's 1/W slice of the gathered input's *feature* columns, transposed: [K/W, M],
the shard's number of elements. The backward gathers those slices along K on the async-TP pipeline (ring or
direct, like `all_gather_matmul`): rank r's slice is x_full's columns r*K/W.., so its GEMM dy^T @ slice^T makes
dW's column block r. The gather hides under the weight-gradient GEMMs, nothing is summed across chunks, and dW
comes out contiguous in the weight's layout.

When K does not divide by W the sequence shard itself is kept and all-gathered again before one GEMM (logged
once). A group of one keeps the input as is.
"""
import logging

import torch

from turbo_dist.runtime import get_runtime

from . import _common as C
from . import collective, pipeline

log = logging.getLogger("turbo_dist")

FULL, K_SHARD, SEQ_SHARD = "full", "k_shard", "seq_shard"
_LOGGED = set()


def needed(*weights):
    """Whether this call's backward can ask for a weight gradient: grad mode on and a weight requiring grad. Call
    it before `Function.apply` (grad mode is always off inside a forward): under no_grad (inference, the first pass
    of reentrant checkpointing) nothing is kept, no slice is copied."""
    return torch.is_grad_enabled() and any(w is not None and w.requires_grad for w in weights)


def keep_input(group, x_shard, x_full, seq_dim):
    """What to save for the weight gradient: (tensor, how).

    x_shard: this rank's input (sharded along `seq_dim`); x_full: the gathered input the forward made
    ([..., K], `seq_dim` W times larger). The tensor is [K/W, M] (M tokens of x_full in its logical order)
    for how=K_SHARD, the shard itself for SEQ_SHARD, x_full for FULL (a group of one).
    """
    rt = get_runtime(group)
    w, k = rt.world_size, x_full.shape[-1]
    if w == 1:
        return x_full, FULL
    if k % w == 0:
        ks = k // w
        cols = x_full[..., rt.rank * ks:(rt.rank + 1) * ks]
        return cols.reshape(-1, ks).t().contiguous(), K_SHARD
    if k not in _LOGGED:
        _LOGGED.add(k)
        log.info("turbo_dist.tp: a column layer's in_features %d is not divisible by the TP size %d: its backward "
                 "all-gathers the saved sequence shard again before the weight-gradient GEMM (not overlapped)", k, w)
    return x_shard, SEQ_SHARD


def _from_k_shards(rt, xt, dys, algo, out_dtype):
    """dW_i [N_i, K] = dy_i^T @ x_full, x_full^T gathered from every rank's [K/W, M] slice: the chunk of rank r is
    x_full's columns r*K/W.., so its GEMM dy^T @ chunk^T writes dW's column block r (a row-major view with the
    row stride K, which cuBLAS writes in place): dW comes out contiguous, with nothing summed across chunks."""
    w = rt.world_size
    ks, m = xt.shape
    path = C.choose_algo(rt, algo, xt.numel() * xt.element_size(), ks)
    if path == "collective":
        gathered = collective.all_gather_rows(rt, xt)  # x_full^T [K, M]
        return [C.gemm(dy.t(), gathered.t(), out_dtype) for dy in dys]
    outs = [torch.empty(dy.shape[1], w * ks, dtype=out_dtype, device=xt.device) for dy in dys]

    def consume(chunks, src):
        for dy, o in zip(dys, outs):
            C.gemm_into(dy.t(), chunks[0].t(), o[:, src * ks:(src + 1) * ks])

    def consume_all(full):
        for dy, o in zip(dys, outs):
            C.gemm_into(dy.t(), full[0].t(), o)

    pipeline.all_gather_consume(rt, [xt], consume, consume_all, order=path)
    return outs


def weight_grads(group, saved, how, dys, seq_dim=0, algo=None, out_dtype=None):
    """dW_i = dy_i^T @ x_full for every dy_i [M, N_i] (rows = x_full's tokens in its logical order).

    saved, how: from `keep_input`. Returns contiguous [N_i, K] tensors of `out_dtype` (default the input's
    dtype; fp32 for an fp32 main_grad).
    """
    if how == K_SHARD:
        return _from_k_shards(get_runtime(group), saved, list(dys), algo, out_dtype or saved.dtype)
    if how == SEQ_SHARD:
        rt = get_runtime(group)
        rows, leading = C.to_rows(saved, seq_dim)
        gathered = collective.all_gather_rows(rt, rows)
        x_rows = C.gathered_from_rows(gathered, rt.world_size, leading, seq_dim).reshape(-1, saved.shape[-1])
    elif how == FULL:
        x_rows = saved.reshape(-1, saved.shape[-1])
    else:
        raise ValueError(f"unknown saved-input kind {how!r}")
    return [C.gemm(dy.t(), x_rows, out_dtype) for dy in dys]
