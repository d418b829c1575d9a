"""Tile math shared by every Triton GEMM kernel (dense kernels/gemm.py, persistent kernels/gemm_persistent.py,
grouped kernels/grouped_gemm.py): the tile order, one output tile's K loop over TMA descriptors with its FP8
scales (tensorwise / rowwise in the epilogue, blockwise per K step), the masked store.

SCALE_MODE values (kernels/gemm.py's SCALE_*): 0 none, 1 tensorwise, 2 rowwise, 3 blockwise.
"""
import triton
import triton.language as tl


@triton.jit
def _block_scales(sa_ptr, sb_ptr, kb, offs_m, mask_m, off_n, offs_n, mask_n,
                  stride_sam, stride_sak, stride_sbk, stride_sbn, SB_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """Blockwise FP8: the factor one 128-wide K step's partial product is promoted with, from scale_a
    [rows, kb] and scale_b [kb, column block]. Loaded before that step's dot so the loads overlap it. When the
    tile's columns sit in one scale_b block (SB_N a multiple of BLOCK_N, e.g. 128x128 weight blocks and
    BLOCK_N 128) that is one scalar load and the factor is one per-row vector [BLOCK_M, 1]; otherwise
    [BLOCK_M, BLOCK_N]."""
    # rows / columns outside the matrix are never stored; 1.0 keeps them finite under RESCALE's division
    sa = tl.load(sa_ptr + offs_m * stride_sam + kb * stride_sak, mask=mask_m, other=1.0)
    if SB_N % BLOCK_N == 0:
        sb = tl.load(sb_ptr + kb * stride_sbk + (off_n // SB_N) * stride_sbn)
        return (sa * sb)[:, None]
    else:
        sb = tl.load(sb_ptr + kb * stride_sbk + (offs_n // SB_N) * stride_sbn, mask=mask_n, other=1.0)
        return sa[:, None] * sb[None, :]


@triton.jit
def _mma_step(acc, f_prev, a, b, sa_ptr, sb_ptr, kb, offs_m, mask_m, off_n, offs_n, mask_n,
              stride_sam, stride_sak, stride_sbk, stride_sbn,
              SCALE_MODE: tl.constexpr, SB_N: tl.constexpr, BLOCK_N: tl.constexpr, RESCALE: tl.constexpr):
    """One K step of a TMA tile: acc += a @ b, blockwise-scaled per step for SCALE_MODE 3 (RESCALE: in units of
    this step's factor, see _tma_tile). Returns (acc, f_prev), f_prev the factor the accumulator is in."""
    if SCALE_MODE == 3:
        f = _block_scales(sa_ptr, sb_ptr, kb, offs_m, mask_m, off_n, offs_n, mask_n,
                          stride_sam, stride_sak, stride_sbk, stride_sbn, SB_N, BLOCK_N)
        if RESCALE:
            acc = tl.dot(a, b, acc * (f_prev / f))
            f_prev = f
        else:
            acc += tl.dot(a, b) * f
    else:
        acc = tl.dot(a, b, acc)
    return acc, f_prev


@triton.jit
def _swizzle(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n) in grouped order: GROUP_M row-blocks share B column-blocks while they
    sit in L2."""
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + ((tile % width) % group_size), (tile % width) // group_size


@triton.jit
def _scale_epilogue(acc, sa_ptr, sb_ptr, offs_m, mask_m, offs_n, mask_n, stride_sam, stride_sbn,
                    SCALE_MODE: tl.constexpr):
    """Tensorwise (1) or rowwise (2) FP8 scales applied to the finished fp32 tile; other modes pass through
    (none, or blockwise, promoted per K step with _block_scales)."""
    if SCALE_MODE == 1:
        acc = acc * (tl.load(sa_ptr) * tl.load(sb_ptr))
    if SCALE_MODE == 2:
        sa = tl.load(sa_ptr + offs_m * stride_sam, mask=mask_m, other=0.0)
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _store_tile(c_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_cm, stride_cn):
    """The fp32 tile, cast to C's dtype, into C (64-bit row offsets, masked to the valid rows/columns)."""
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _tma_tile(a_desc, b_desc, sa_ptr, sb_ptr, kb_lo, kb_hi, off_m, off_n, offs_m, mask_m, offs_n, mask_n,
              stride_sam, stride_sak, stride_sbk, stride_sbn,
              A_T: tl.constexpr, B_T: tl.constexpr, SCALE_MODE: tl.constexpr, SB_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr = False,
              RESCALE: tl.constexpr = False):
    """One output tile's fp32 accumulator over K steps [kb_lo, kb_hi) (of BLOCK_K; all of K is 0, cdiv(K,
    BLOCK_K)) from TMA descriptors (A [M, K] or [K, M] with A_T; B [K, N] or [N, K] with B_T), tensorwise /
    rowwise / blockwise scales applied. Out-of-bounds parts of a tile read as zeros, so the K tail needs no
    mask.
    WS: ask Triton to warp-specialize the K loop (TMA producer warps, MMA consumer warps).
    RESCALE (blockwise only): keep the accumulator in units of the current K step's scale factor f_k and
    let the MMA accumulate in place, acc = dot(a_k, b_k, acc * f_{k-1} / f_k), scaled by the last f once at
    the end: one fp32 tile live instead of two (room for wider tiles), no separate partial product. Needs
    nonzero scales (the quantizers never produce zero)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    f_prev = 1.0  # the scale factor acc is in (RESCALE only)
    if SCALE_MODE == 3 and RESCALE:
        f_prev = _block_scales(sa_ptr, sb_ptr, kb_lo, offs_m, mask_m, off_n, offs_n, mask_n,
                               stride_sam, stride_sak, stride_sbk, stride_sbn, SB_N, BLOCK_N)
    for kb in tl.range(kb_lo, kb_hi, warp_specialize=WS):
        k0 = kb * BLOCK_K
        if A_T:
            a = a_desc.load([k0, off_m]).T
        else:
            a = a_desc.load([off_m, k0])
        if B_T:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        acc, f_prev = _mma_step(acc, f_prev, a, b, sa_ptr, sb_ptr, kb, offs_m, mask_m, off_n, offs_n, mask_n,
                                stride_sam, stride_sak, stride_sbk, stride_sbn, SCALE_MODE, SB_N, BLOCK_N, RESCALE)
    if SCALE_MODE == 3 and RESCALE:
        acc = acc * f_prev
    return _scale_epilogue(acc, sa_ptr, sb_ptr, offs_m, mask_m, offs_n, mask_n, stride_sam, stride_sbn, SCALE_MODE)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    return off_m, off_n, offs_m, offs_m < M, offs_n, offs_n < N
