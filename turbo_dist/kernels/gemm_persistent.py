"""The persistent TMA GEMM kernel (one program per SM walking the tiles) and its split-tail-wave mode.

Same tile math as kernels/gemm.py's `_gemm_tma_kernel` (`_tma_tile`, any scale mode). SPLIT_TAIL cuts the
partial last wave's tiles along K so every SM works through it, e.g. 544 tiles of 256 x 128 on 132 SMs as
4 waves + 16 tiles x 8 pieces instead of 5 waves; TAIL_ONLY runs just that tail, after a plain launch of the
full waves (gemm.py's TAIL_LAUNCH flag). kernels/gemm.py's `_launch_tma` launches these (forced configs, or
as candidates of its tuner where `split_tail_pays`).
"""
import os

import torch
import triton
import triton.language as tl

from .gemm_tiles import _store_tile, _tile_coords, _tma_tile

# Split-tail candidates, tried beside gemm.py's lists where split_tail_pays: the large tiles those lists pick
# for such shapes (16-bit inputs: BLOCK_K 64; FP8: 128).
CONFIGS_TAIL_16 = [
    (256, 128, 64, 16, 8, 4),
    (128, 256, 64, 8, 8, 4),
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
]
CONFIGS_TAIL_8 = [
    (128, 256, 128, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
]
# TURBO_DIST_GEMM_SPLIT_TAIL=0: the default path never considers the split-tail kernels (A/B comparisons;
# forced configs and split_tail=True still run them)
SPLIT_TAIL_AUTO = os.environ.get("TURBO_DIST_GEMM_SPLIT_TAIL", "1") != "0"


@triton.jit
def _gemm_tma_persistent_kernel(
    a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn,
    A_T: tl.constexpr, B_T: tl.constexpr,
    SCALE_MODE: tl.constexpr, SB_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr, WS: tl.constexpr = False, RESCALE: tl.constexpr = False,
    SPLIT_TAIL: tl.constexpr = False, MAX_SPLIT: tl.constexpr = 16, MIN_SPLIT_STEPS: tl.constexpr = 4,
    TAIL_ONLY: tl.constexpr = False,
):
    # _gemm_tma_kernel's tile (_tma_tile), walked by a fixed grid of NUM_PROGS programs (one per SM): the
    # (tile, K) loop nest is flattened so the next tile's loads start while this tile's epilogue runs.
    # SPLIT_TAIL: only the full waves (tiles // NUM_PROGS * NUM_PROGS) run whole; the last, partial wave's
    # `tail` tiles are cut along K into SPLIT pieces (SPLIT = NUM_PROGS // tail, at most MAX_SPLIT, each at
    # least MIN_SPLIT_STEPS K steps) so every SM has work in it: e.g. 544 tiles on 132 SMs run as 4 waves +
    # 16 x 8 pieces of 1/8 tile, not 5 waves. A piece stores its fp32 partial in ws [tail * SPLIT, BLOCK_M,
    # BLOCK_N] and counts itself in cnt[tail tile] (int32, zero before the launch, zero again after it); the
    # last piece to arrive sums the partials in piece order (deterministic) and stores the tile.
    # TAIL_ONLY: the full waves were left to a plain (non-persistent) launch before this one.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_k = tl.cdiv(K, BLOCK_K)
    full = num_tiles
    if SPLIT_TAIL:
        full = num_tiles - num_tiles % NUM_PROGS
    for tile in tl.range(tl.program_id(0), 0 if TAIL_ONLY else full, NUM_PROGS, flatten=True):
        off_m, off_n, offs_m, mask_m, offs_n, mask_n = _tile_coords(tile, num_pid_m, num_pid_n, M, N, BLOCK_M,
                                                                    BLOCK_N, GROUP_M)
        acc = _tma_tile(a_desc, b_desc, sa_ptr, sb_ptr, 0, num_k, off_m, off_n, offs_m, mask_m, offs_n, mask_n,
                        stride_sam, stride_sak, stride_sbk, stride_sbn, A_T, B_T, SCALE_MODE, SB_N,
                        BLOCK_M, BLOCK_N, BLOCK_K, WS, RESCALE)
        _store_tile(c_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_cm, stride_cn)
    if SPLIT_TAIL:
        tail = num_tiles - full
        split = tl.minimum(tl.minimum(NUM_PROGS // tl.maximum(tail, 1), MAX_SPLIT),
                           tl.maximum(num_k // MIN_SPLIT_STEPS, 1))
        rows = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        for unit in range(tl.program_id(0), tail * split, NUM_PROGS):
            t = unit // split
            piece = unit % split
            off_m, off_n, offs_m, mask_m, offs_n, mask_n = _tile_coords(full + t, num_pid_m, num_pid_n, M, N,
                                                                        BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tma_tile(a_desc, b_desc, sa_ptr, sb_ptr, piece * num_k // split, (piece + 1) * num_k // split,
                            off_m, off_n, offs_m, mask_m, offs_n, mask_n, stride_sam, stride_sak, stride_sbk,
                            stride_sbn, A_T, B_T, SCALE_MODE, SB_N, BLOCK_M, BLOCK_N, BLOCK_K, WS, RESCALE)
            if split == 1:
                _store_tile(c_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_cm, stride_cn)
            else:
                tl.store(ws_ptr + unit * (BLOCK_M * BLOCK_N) + rows, acc)  # units <= NUM_PROGS: int32 offsets
                tl.debug_barrier()  # every thread's partial is written before this program's release below
                arrived = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
                if arrived == split - 1:  # the last piece: the others' partials are visible (acquire)
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for p in range(0, split):
                        total += tl.load(ws_ptr + (t * split + p) * (BLOCK_M * BLOCK_N) + rows,
                                         cache_modifier=".cg")
                    _store_tile(c_ptr, total, offs_m, mask_m, offs_n, mask_n, stride_cm, stride_cn)
                    tl.store(cnt_ptr + t, 0)  # ready for the next launch


def split_tail_pays(M, N, sms, tiles=((128, 256), (256, 128)), max_waves=8):
    """True when the usual large tiles leave the last wave at most half full on `sms` SMs in a short
    schedule (<= max_waves waves), where cutting that wave's tiles along K (SPLIT_TAIL) saves up to a wave:
    e.g. 8192 x 2112 (DeepSeek-V3 q/kv down-projection): 544 tiles of 256 x 128 = 4 waves + 16 tiles."""
    for bm, bn in tiles:
        n = -(-M // bm) * -(-N // bn)
        rest = n % sms
        if not (0 < rest * 2 <= sms and n <= max_waves * sms):
            return False
    return True


def tail_buffers(device, nprog, max_tile_elems):
    """Per-launch partial-tile workspace and arrival counters of SPLIT_TAIL (the caching allocator makes these
    cheap; per launch, so kernels on concurrent streams never share them)."""
    return (torch.empty(nprog * max_tile_elems, dtype=torch.float32, device=device),
            torch.zeros(nprog, dtype=torch.int32, device=device))
