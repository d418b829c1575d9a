"""Triton weight gradient of the grouped GEMM (MoE experts): out[g] = X[rows of g]^T @ Y[rows of g], X [M, P],
Y [M, Q] -> out [G, P, Q] (zeros for an empty group); dB = A^T dC (or dC^T A when trans_b). Rows of group g are
`group_offs[g-1]:group_offs[g]` (cumulative ends on the device, unread by the host). One program per output tile
of one group, reducing over the group's rows.

Two variants: TMA descriptors for each group's whole BLOCK_K-row steps (x, y row-major 16-bit; `wgrad_tma_ok`),
the last partial step by masked loads, and plain pointer loads (any strides, fp32). Configs (`CONFIGS_WGRAD*`)
are chosen by kernels/_tuner per shape and rows-per-group bucket, as the forward's (kernels/grouped_gemm.py).
"""
import torch
import triton
import triton.language as tl

from . import _tuner
from . import gemm as _gemm
from . import grouped_gemm as _gg
from .gemm import SCALE_NONE, TensorDescriptor
from .gemm_tiles import _store_tile

# (BLOCK_M of P, BLOCK_N of Q, BLOCK_K rows, num_warps, num_stages)
CONFIGS_WGRAD = [
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# the TMA weight-gradient kernel (x, y row-major 16-bit). H200, DeepSeek-V3 fc1 (tune_ops grouped_wgrad_*,
# benchmarks/results/tune_grouped_bwd_h200.json, fc2 alike): 128x128 by 32 (or 16) rows with 4 warps first at 128,
# 256 and 1024 tokens per expert (0.85 / 1.12-1.16 / 0.72-0.76 ms; the pointer kernel 1.14 / 1.51 / 0.93-0.98; every
# BLOCK_K 64 config 1.04+ / 1.36+ / 0.77+): small tiles that fit several programs per SM, so one's epilogue (the
# [P, Q] output write is as large as the inputs read with short groups) can run under another's K loop
CONFIGS_WGRAD_TMA = [
    (128, 128, 32, 4, 4),
    (128, 128, 32, 4, 3),
    (128, 128, 16, 4, 6),
    (256, 128, 32, 8, 4),
]


@triton.jit
def _wgrad_tile(offs_ptr, P, Q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile, one grid of (P tiles x Q tiles) per group: (group, first P index, first Q
    index, the group's rows row0:row1 from the cumulative ends)."""
    pid = tl.program_id(0)
    num_p = tl.cdiv(P, BLOCK_M)
    num_q = tl.cdiv(Q, BLOCK_N)
    g = pid // (num_p * num_q)
    local = pid % (num_p * num_q)
    row0 = tl.load(offs_ptr + g - 1, mask=g > 0, other=0).to(tl.int32)
    row1 = tl.load(offs_ptr + g).to(tl.int32)
    return g, (local // num_q) * BLOCK_M, (local % num_q) * BLOCK_N, row0, row1


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, y_ptr, c_ptr, offs_ptr,
    G, P, Q,
    stride_xm, stride_xp, stride_ym, stride_yq, stride_cg, stride_cp, stride_cq,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[g] tile (BLOCK_M of P) x (BLOCK_N of Q), reducing over the group's rows in steps of BLOCK_K.
    g, off_p, off_q, row0, row1 = _wgrad_tile(offs_ptr, P, Q, BLOCK_M, BLOCK_N)
    offs_p = off_p + tl.arange(0, BLOCK_M)
    offs_q = off_q + tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    rm = row0 + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + offs_p[:, None] * stride_xp
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + offs_q[None, :] * stride_yq
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for mb in range(0, tl.cdiv(row1 - row0, BLOCK_K)):
        m_left = row1 - row0 - mb * BLOCK_K
        rr = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptrs, mask=mask_p[:, None] & (rr[None, :] < m_left), other=0.0)
        y = tl.load(y_ptrs, mask=(rr[:, None] < m_left) & mask_q[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
        x_ptrs += BLOCK_K * stride_xm
        y_ptrs += BLOCK_K * stride_ym
    _store_tile(c_ptr + g.to(tl.int64) * stride_cg, acc, offs_p, mask_p, offs_q, mask_q, stride_cp, stride_cq)


@triton.jit
def _grouped_wgrad_tma_kernel(
    x_desc, y_desc, x_ptr, y_ptr, c_ptr, offs_ptr,
    G, P, Q,
    stride_xm, stride_ym, stride_cg, stride_cp, stride_cq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # As _grouped_wgrad_kernel, the whole BLOCK_K-row steps of a group from TMA descriptors (x [M, P] and
    # y [M, Q] row-major; x's tile [BLOCK_K, BLOCK_M] enters the MMA transposed, as the GEMM kernels' A_T), the
    # group's last partial step (rows that a box would take from the next group) with masked pointer loads.
    # (Boxes masked in registers instead, sm_90 166-199 registers against 204-250, were 5-10% slower on H200:
    # benchmarks/results/tune_wgrad_tail_h200.json.)
    g, off_p, off_q, row0, row1 = _wgrad_tile(offs_ptr, P, Q, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    full = (row1 - row0) // BLOCK_K
    for kb in tl.range(0, full):
        r = row0 + kb * BLOCK_K
        acc = tl.dot(x_desc.load([r, off_p]).T, y_desc.load([r, off_q]), acc)
    offs_p = off_p + tl.arange(0, BLOCK_M)
    offs_q = off_q + tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    r = row0 + full * BLOCK_K
    if r < row1:
        rr = r + tl.arange(0, BLOCK_K)
        mask_r = rr < row1
        x = tl.load(x_ptr + rr[:, None].to(tl.int64) * stride_xm + offs_p[None, :],
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0)
        y = tl.load(y_ptr + rr[:, None].to(tl.int64) * stride_ym + offs_q[None, :],
                    mask=mask_r[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(x.T, y, acc)
    _store_tile(c_ptr + g.to(tl.int64) * stride_cg, acc, offs_p, mask_p, offs_q, mask_q, stride_cp, stride_cq)


def _unpack(config):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), checked."""
    if len(config) != 5:
        raise ValueError(f"a weight-gradient config is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), "
                         f"got {config}")
    return tuple(config)


def _set_wgrad_blocks(nargs):
    nargs["x_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_M"]]
    nargs["y_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def wgrad_tma_ok(x, y):
    """Whether the TMA weight-gradient kernel takes x [M, P], y [M, Q]: 2-byte dtypes (the transposed x tile is
    an MN-major MMA operand, which Hopper's tensor cores take for 16-bit types only), both row-major with
    16-byte aligned rows and bases; Hopper+ or the interpreter."""
    if not _gemm.tma_device_ok(x, y):
        return False
    return all(t.element_size() == 2 and t.stride(1) == 1 and (t.stride(0) * 2) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (x, y))


def grouped_wgrad(x, y, group_offs, G, out=None, out_dtype=None, config=None):
    """out [G, P, Q] = per-group x[rows]^T @ y[rows]; x [M, P], y [M, Q]; `out` may be a strided view
    (e.g. a [G, Q, P] tensor transposed) so dB lands in B's layout."""
    M, P = x.shape
    Q = y.shape[1]
    group_offs = group_offs.contiguous()  # read as a dense [G] array
    if out is None:
        out = torch.empty((G, P, Q), dtype=out_dtype or x.dtype, device=x.device)
    if G == 0 or P == 0 or Q == 0:
        return out
    if M == 0:
        return out.zero_()
    tma = wgrad_tma_ok(x, y)
    if tma:
        x_desc = TensorDescriptor.from_tensor(x, [16, 16])  # block shapes: set per config at launch
        y_desc = TensorDescriptor.from_tensor(y, [16, 16])
        args = (x_desc, y_desc, x, y, out, group_offs, G, P, Q, x.stride(0), y.stride(0),
                out.stride(0), out.stride(1), out.stride(2))
    else:
        args = (x, y, out, group_offs, G, P, Q, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                out.stride(0), out.stride(1), out.stride(2), _gg._ieee(x))
    if config is None:
        config = _gg.interpreter_config(SCALE_NONE)

    def launcher(cfg):
        bm, bn, bk, w, s = _unpack(cfg)
        grid = (G * triton.cdiv(P, bm) * triton.cdiv(Q, bn),)
        if not tma:
            return lambda: _grouped_wgrad_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                                                       num_stages=s)

        def launch():
            _set_wgrad_blocks(dict(x_desc=x_desc, y_desc=y_desc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
            _grouped_wgrad_tma_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                                            num_stages=s)
        return launch

    if config is not None:
        launcher(config)()
        return out
    rows = _gemm.tune_rows(CONFIGS_WGRAD_TMA if tma else CONFIGS_WGRAD)
    key = ("grouped_wgrad_tma" if tma else "grouped_wgrad", P, Q, G, x.dtype, y.dtype, out.dtype, out.stride(),
           _gg.rows_bucket(M, G), str(x.device), tuple(rows))
    _tuner.launch_best(key, rows, launcher, x.device)
    return out
