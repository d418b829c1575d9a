"""FP8 scaled GEMM and grouped GEMM launchers (the tile kernels live in kernels/gemm.py and
kernels/grouped_gemm.py; scales are applied in the epilogue or, blockwise, per 128-wide K step)."""
import torch

from . import gemm as _gemm
from . import grouped_gemm as _grouped
from .gemm import SCALE_BLOCK, SCALE_ROW, SCALE_TENSOR  # noqa: F401  (re-exported for callers)


def scaled_mm(a_q, b_q, scale_a, scale_b, mode, out_dtype=torch.bfloat16, sb_n=128, config=None):
    """C [M, N] = (a_q * scale_a) @ (b_q * scale_b): a_q [M, K], b_q [K, N] (any strides, e.g. [N, K].t()).
    mode SCALE_TENSOR: scales [1]; SCALE_ROW: scale_a [M] / [M, 1], scale_b [N] / [1, N];
    SCALE_BLOCK: scale_a [M, cdiv(K,128)], scale_b [cdiv(K,128), cdiv(N, sb_n)] (sb_n 128 or 1)."""
    if mode == SCALE_ROW:
        scale_a, scale_b = scale_a.reshape(-1), scale_b.reshape(-1)
    return _gemm.scaled_gemm(a_q, b_q, scale_a, scale_b, mode, out_dtype=out_dtype, block_n=sb_n, config=config)


def grouped_scaled_mm(a_q, b_q, scale_a, scale_b, group_offs, mode, out_dtype=torch.bfloat16, sb_n=128, config=None):
    """out [M, N] = per group (a_q * scale_a)[rows] @ (b_q[g] * scale_b[g]); a_q [M, K], b_q [G, K, N] view.
    mode SCALE_TENSOR: scale_a [1], scale_b [G]; SCALE_ROW: scale_a [M], scale_b [G, N];
    SCALE_BLOCK: scale_a [M, cdiv(K,128)], scale_b [G, cdiv(K,128), cdiv(N, sb_n)]."""
    if mode == SCALE_ROW:
        scale_a = scale_a.reshape(-1)
        scale_b = scale_b.reshape(scale_b.shape[0], -1)
    if mode == SCALE_TENSOR:
        scale_a, scale_b = scale_a.reshape(1), scale_b.reshape(-1)
    return _grouped.grouped_gemm(a_q, b_q, group_offs, scale_a=scale_a, scale_b=scale_b, scale_mode=mode,
                                 sb_n=sb_n, out_dtype=out_dtype, config=config)
