"""Candidate tile configs that benchmarks/tune_ops.py times beyond the kernels' own config lists (data only: what
wins moves into kernels/gemm.py, kernels/grouped_gemm.py or kernels/grouped_wgrad.py, with the figures)."""

# Candidates beyond the module lists: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
EXTRA_16 = [
    (128, 256, 64, 4, 8, 3),
    (128, 256, 64, 16, 8, 3),
    (256, 128, 64, 16, 8, 4),
    (128, 128, 64, 16, 8, 4),
    (128, 128, 64, 8, 4, 5),
    (64, 128, 64, 8, 4, 5),
    (256, 64, 64, 16, 8, 3),
    (64, 256, 64, 8, 8, 3),
    # persistent (7th entry 1): one program per SM walking the tiles (kernels/gemm_persistent.py)
    (128, 256, 64, 8, 8, 3, 1),
    (128, 256, 64, 8, 8, 4, 1),
    (128, 128, 64, 8, 8, 4, 1),
    (128, 128, 64, 8, 4, 4, 1),
    # split tail wave (7th entry 8, persistent): the last partial wave's tiles cut along K
    (256, 128, 64, 16, 8, 4, 8),
    (128, 256, 64, 8, 8, 4, 8),
    (128, 256, 64, 8, 8, 3, 8),
    (128, 128, 64, 8, 8, 4, 8),
]
# more narrow-edge candidates (7th entry 32; only where N % BLOCK_N <= BLOCK_N / 2, e.g. dsv3_qkv_a)
EXTRA_EDGE_16 = [
    (128, 256, 64, 8, 8, 4),
    (256, 128, 64, 4, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
]
EXTRA_BLOCK = [
    (128, 128, 128, 16, 8, 4),
    (128, 128, 128, 4, 8, 4),
    (64, 128, 128, 16, 4, 4),
    (128, 64, 128, 8, 4, 5),
    (256, 128, 128, 8, 8, 3),
    (128, 256, 128, 8, 8, 3),  # BLOCK_N 256: two scale_b blocks per tile (the vector path)
    (128, 128, 128, 8, 8, 4, 1),  # persistent
    (64, 128, 128, 8, 4, 4, 1),
    # 7th entry 2: warp-specialized K loop (Triton's Hopper auto-WS); 3: persistent and warp-specialized
    (128, 128, 128, 8, 8, 4, 2),
    (128, 128, 128, 8, 4, 4, 2),
    (128, 256, 128, 8, 8, 3, 2),
    (128, 128, 128, 8, 8, 4, 3),
    # 7th entry 4: RESCALE_ACC (accumulate in place in units of the current scale: one fp32 tile, so 128 x 256 fits)
    (128, 128, 128, 8, 8, 4, 4),
    (128, 256, 128, 8, 8, 3, 4),
    (128, 256, 128, 8, 8, 4, 4),
    (256, 128, 128, 8, 8, 3, 4),
    (128, 256, 128, 8, 8, 3, 5),  # persistent + RESCALE_ACC
]
# grouped: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
EXTRA_GROUPED_BLOCK = [
    (128, 64, 128, 4, 4),
    (64, 128, 128, 8, 4),
    (128, 256, 128, 8, 3),
    # 6th entry 1: warp-specialized K loop (H200, Triton 3.6: 128x128x128x8x4x1 ties the plain config,
    # 128x256x128x8x3x1 is 3.5x slower, the 4-warp ones fail in the NVGPUWarpSpecialization pass)
    (128, 128, 128, 8, 4, 1),
    (128, 256, 128, 8, 3, 1),
    # 6th entry 2: RESCALE_ACC (see kernels/gemm.py _tma_tile)
    (128, 128, 128, 8, 4, 2),
    (128, 256, 128, 8, 3, 2),
    (128, 256, 128, 8, 4, 2),
    (256, 128, 128, 8, 3, 2),
    # 6th entry 4: TWO_PER_SM (two programs per SM; where two tiles fit, one's promotion overlaps the other's MMAs)
    (64, 128, 128, 4, 4, 4),
    (64, 128, 128, 4, 3, 4),
    (128, 64, 128, 4, 4, 4),
    (128, 128, 128, 8, 3, 4),
    (64, 128, 128, 4, 4, 6),
    # 6th entry 6: TWO_PER_SM + RESCALE_ACC: 128 x 128 tiles, two per SM under the 128-register cap (one fp32 tile
    # live; ptxas -v for sm_90: 186 registers uncapped, 128 with 112 bytes spilled, against 448 without RESCALE)
    (128, 128, 128, 8, 3, 6),
    (128, 128, 128, 8, 2, 6),
    (128, 128, 128, 8, 2, 4),
]



# bf16 grouped candidates beyond CONFIGS_16 (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): at ~256 tokens per
# expert fc1 streams each expert's 58 MB weight about once (near the memory roofline), so taller tiles that
# read it once per expert and deeper pipelines are worth timing
EXTRA_GROUPED_16 = [
    (256, 128, 64, 8, 3),
    (256, 128, 64, 8, 4),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 5),
]


# weight-gradient candidates beyond CONFIGS_WGRAD_TMA (BLOCK_M of P, BLOCK_N of Q, BLOCK_K rows, warps, stages):
# with ~128-256 rows per expert the K loop is short (2-4 steps), so the output write and the tile's setup count:
# shallow pipelines and 4-warp tiles small enough for two programs per SM (one's epilogue under the other's loop)
EXTRA_WGRAD = [
    (128, 128, 64, 4, 3),
    (128, 128, 64, 4, 2),
    (128, 128, 64, 8, 2),
    (128, 256, 64, 8, 2),
    # BLOCK_K 32 (H200: 128x128x32x4x4 the best of the first round at 128 / 256 / 1024 tokens per expert)
    (128, 128, 32, 4, 3),
    (128, 128, 32, 4, 5),
    (128, 128, 32, 4, 6),
    (128, 128, 32, 8, 4),
    (128, 256, 32, 8, 3),
    (128, 256, 32, 8, 4),
    (256, 128, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 256, 32, 4, 4),
    (128, 128, 16, 4, 6),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 5),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 256, 64, 8, 3),
]
# (A TMA_TAIL flag, the last partial step from boxes masked in registers, was 5-10% slower than the masked loads in
# every final round, H200: benchmarks/results/tune_wgrad_tail_h200.json; removed.)
