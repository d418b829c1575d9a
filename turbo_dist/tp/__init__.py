"""Async tensor parallelism: fused all-gather + GEMM and GEMM + reduce-scatter that hide the communication.

    a_full, outs = turbo_dist.tp.all_gather_matmul(a_shard, [b0, b1], gather_dim=0, group=g)
    c_shard = turbo_dist.tp.matmul_reduce_scatter(a, b, scatter_dim=0, reduce_op="sum", group=g)
    # FP8: all_gather_scaled_matmul(...), scaled_matmul_reduce_scatter(...)
    # modules: ColumnParallelLinear / RowParallelLinear (sequence_parallel=True by default)
    # drop-in for torch.ops.symm_mem's fused ops (TorchTitan async TP): turbo_dist.tp.torch_ops.install()

Semantics match torch.ops.symm_mem.fused_all_gather_matmul / fused_matmul_reduce_scatter.
Implementations (`algo=` argument or TURBO_DIST_TP_ALGO, default 'auto'):
- 'ring': symmetric-memory pipeline, one chunk per peer in ring order; every chunk's GEMM starts
  as soon as its rows land (copy-engine pulls for AG, pushes for RS, fp32 reduction). CUDA with
  peer access (TURBO_DIST_SHMEM=torch, one node).
- 'direct': same transport, all peer copies at once then one GEMM (small, latency-bound sizes).
- 'collective': all_gather_into_tensor / reduce_scatter_tensor + GEMM (gloo/NCCL; CPU, no peer access).
'auto' takes 'collective' without peer access, else 'direct' for shards under
TURBO_DIST_TP_DIRECT_BYTES (default 2 MiB) or of fewer than 128 rows, and 'ring' above.
Waits on peers are bounded by TURBO_DIST_TIMEOUT_S; a timeout raises RuntimeError once, at a later call
(or at `check_errors(group)`, which waits for the device): the output of the call whose wait timed out
is invalid, and the record is cleared once raised.
"""
from turbo_dist.runtime import get_runtime

from ._common import last_algo
from .ag_matmul import all_gather_matmul, all_gather_scaled_matmul
from .linear import ColumnParallelLinear, RowParallelLinear
from .matmul_rs import matmul_reduce_scatter, scaled_matmul_reduce_scatter
from . import torch_ops


def check_errors(group=None, block=True):
    """Raise RuntimeError if a GPU wait of an earlier async-TP call on `group` timed out.

    block=True synchronizes with the last call's communication stream first.
    """
    from . import pipeline

    pipeline.check_errors(get_runtime(group), block=block)


__all__ = [
    "last_algo",
    "all_gather_matmul", "matmul_reduce_scatter", "all_gather_scaled_matmul", "scaled_matmul_reduce_scatter",
    "ColumnParallelLinear", "RowParallelLinear", "check_errors", "torch_ops",
]
