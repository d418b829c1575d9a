"""Dense Triton GEMM: C[M, N] = scale(A[M, K] @ B[K, N]) with arbitrary strides (transposes are views).

One kernel serves plain fp16/bf16/fp32 GEMM and FP8 scaled GEMM (see kernels/fp8_gemm.py):
SCALE_MODE 0 = none, 1 = tensorwise (one fp32 scale per operand), 2 = rowwise (scale_a [M],
scale_b [N], applied in the epilogue), 3 = blockwise (scale_a [M, cdiv(K, 128)] for 1x128 blocks of A,
scale_b [cdiv(K, 128), cdiv(N, SB_N)] for B blocks of 128 x SB_N, applied per K step, so BLOCK_K = 128).

Two kernels, same math (the tile math in kernels/gemm_tiles.py): `_gemm_tma_kernel` loads tiles through TMA
tensor descriptors (Hopper+, and the interpreter), used whenever both operands are 16-byte aligned with one unit
stride (a transpose is a descriptor over the stored layout plus an in-register `.T`); `_gemm_kernel` uses plain
pointer loads and takes any strides (odd shapes, fp32, sliced views, pre-Hopper GPUs).

Configs are data (`CONFIGS_*`): both kernels' config is picked by `_tuner` on first use per shape, timing the
candidates interleaved (triton.autotune's one-after-another timing drifts with the clock of a power-capped
GPU) and taking the first untimed during CUDA graph capture; under TRITON_INTERPRET=1 one small config runs. A forced config
(`config=`, tests and benchmarks/tune_ops.py) may add a 7th entry of flags (see _unpack) for the kernels of
kernels/gemm_persistent.py: persistent (one program per SM walking the tiles), and its split-tail modes that
cut the partial last wave's tiles along K so no SM idles through it; the tuner times those beside the plain
configs for shapes whose last wave is at most half full (`split_tail_pays`, e.g. 8192 x 2112). Where N leaves a
narrow last tile column (0 < N % BLOCK_N <= BLOCK_N / 2) the NARROW_EDGE configs join the candidates: the
plain kernel with that column in narrower tiles, several per program (`edge_n`).
"""
import collections
import os

import torch
import triton
import triton.language as tl

from . import _tuner
from ._device import interpreting
from .gemm_tiles import _block_scales, _scale_epilogue, _store_tile, _swizzle, _tile_coords, _tma_tile

try:  # triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

SCALE_NONE, SCALE_TENSOR, SCALE_ROW, SCALE_BLOCK = 0, 1, 2, 3


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) -- Hopper-oriented; 16-bit inputs.
# benchmarks/tune_ops.py times each of these (and more candidates) on its own: put the winners first.
CONFIGS_16 = [
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (128, 256, 64, 8, 8, 4),
    (128, 128, 64, 8, 8, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    # added for the shapes the list above leaves below 0.9x cuBLAS on H200 (4096^3, 8192x2112x7168):
    (128, 256, 64, 16, 8, 4),  # wider L2 swizzle
    (128, 128, 64, 8, 8, 5),
    (64, 256, 64, 8, 4, 4),
    (256, 64, 64, 8, 8, 4),    # N = 2112 = 33 x 64: 32 x 33 tiles = 8 full waves on 132 SMs
    (128, 64, 64, 8, 4, 5),
    (256, 128, 64, 16, 8, 4),  # best forced config for 8192x2112x7168 in tune_ops (H200): 0.394 ms vs 0.432 autotuned
]
# FP8 inputs: half the bytes per element, so twice the K per stage.
CONFIGS_8 = [
    (128, 256, 128, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 4, 4),
    (128, 128, 128, 8, 8, 4),
    (64, 128, 128, 8, 4, 4),
]
# Blockwise FP8: BLOCK_K = 128 (one scale step per K tile); BLOCK_N <= 128 keeps one scale_b scalar per tile
# and the second (per-step) fp32 tile in registers: 8 warps for 128 x 128, 4 for 64 x 128.
CONFIGS_BLOCK = [
    (128, 128, 128, 8, 8, 4),
    (128, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 5),
    (64, 128, 128, 8, 4, 4),
    (64, 128, 128, 8, 4, 5),
    (128, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4),
]
# NARROW_EDGE candidates (the plain TMA kernel with its last, narrow tile column in BLOCK_M x edge_n tiles),
# timed beside the lists above where edge_n(N, BLOCK_N) > 0, e.g. N = 2112 = 16 x 128 + 64.
CONFIGS_EDGE_16 = [
    (256, 128, 64, 16, 8, 4),   # 8192x2112x7168 on H200: 0.380 ms against 0.408 plain (timed interleaved)
    (256, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 5),    # 1024 tiles + 32 programs of two 128 x 64 edge tiles: 8 waves on 132 SMs
    (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 16, 8, 4),
]
CONFIGS_EDGE_8 = [
    (256, 128, 128, 8, 8, 3),
    (128, 256, 128, 8, 8, 3),
]
CONFIGS_EDGE_BLOCK = [
    (128, 128, 128, 8, 8, 4),
]
INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1)

# TURBO_DIST_TRITON_TUNE=first: tune over the first config of each list only (GPU tests, quick checks)
TUNE_FIRST_ONLY = os.environ.get("TURBO_DIST_TRITON_TUNE", "full") == "first"


def tune_rows(rows):
    return list(rows[:1]) if TUNE_FIRST_ONLY else list(rows)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    SCALE_MODE: tl.constexpr, SB_N: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rk = tl.arange(0, BLOCK_K)
    # 64-bit row / column offsets: past 2**31 elements (an fp32 8192 x 262144 operand, a transposed b) the 32-bit
    # products wrap (as _store_tile and the grouped kernels do)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    for kb in range(0, num_k):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        if SCALE_MODE == 3:
            f = _block_scales(sa_ptr, sb_ptr, kb, offs_m, mask_m, pid_n * BLOCK_N, offs_n, mask_n,
                              stride_sam, stride_sak, stride_sbk, stride_sbn, SB_N, BLOCK_N)
            acc += tl.dot(a, b) * f
        else:
            if ALLOW_TF32:
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = _scale_epilogue(acc, sa_ptr, sb_ptr, offs_m, mask_m, offs_n, mask_n, stride_sam, stride_sbn, SCALE_MODE)
    c = acc.to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, c, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemm_tma_kernel(
    a_desc, b_desc, c_ptr, sa_ptr, sb_ptr,
    M, N, K,
    stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn,
    A_T: tl.constexpr, B_T: tl.constexpr,
    SCALE_MODE: tl.constexpr, SB_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WS: tl.constexpr = False, RESCALE: tl.constexpr = False, EDGE_N: tl.constexpr = 0, be_desc=None,
):
    # a_desc covers A as stored: [M, K] (A_T=False) or [K, M] (A_T=True); b_desc: [K, N] or [N, K] (B_T=True).
    # EDGE_N > 0 (NARROW_EDGE; 0 < N % BLOCK_N <= EDGE_N <= BLOCK_N // 2): the last, narrow column of tiles is
    # cut into BLOCK_M x EDGE_N tiles (be_desc: b_desc with that block), BLOCK_N // EDGE_N of them per program
    # after the full-width tiles, so it costs what its columns need instead of full tiles: 8192 x 2112 with
    # 256 x 128 tiles is 512 full tiles + 16 programs of two 256 x 64 tiles = 4 waves on 132 SMs, not 4 + 16.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(N, BLOCK_N)
    if EDGE_N > 0:
        n_cols = N // BLOCK_N
    # the two kinds of program in helpers: Triton wants a name set in both branches of an `if` to have one type
    if pid < num_pid_m * n_cols:
        off_m, off_n, offs_m, mask_m, offs_n, mask_n = _tile_coords(pid, num_pid_m, n_cols, M, N, BLOCK_M,
                                                                    BLOCK_N, GROUP_M)
        _tma_tile_store(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, K, off_m, off_n, offs_m, mask_m, offs_n, mask_n,
                        stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn, A_T, B_T, SCALE_MODE,
                        SB_N, BLOCK_M, BLOCK_N, BLOCK_K, WS, RESCALE)
    elif EDGE_N > 0:
        _edge_tiles(a_desc, be_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, (pid - num_pid_m * n_cols) * (BLOCK_N // EDGE_N),
                    n_cols * BLOCK_N, num_pid_m, stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn,
                    A_T, B_T, SCALE_MODE, SB_N, BLOCK_M, BLOCK_N // EDGE_N, EDGE_N, BLOCK_K, WS, RESCALE)


@triton.jit
def _tma_tile_store(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, K, off_m, off_n, offs_m, mask_m, offs_n, mask_n,
                    stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn,
                    A_T: tl.constexpr, B_T: tl.constexpr, SCALE_MODE: tl.constexpr, SB_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr,
                    RESCALE: tl.constexpr):
    acc = _tma_tile(a_desc, b_desc, sa_ptr, sb_ptr, 0, tl.cdiv(K, BLOCK_K), off_m, off_n, offs_m, mask_m, offs_n,
                    mask_n, stride_sam, stride_sak, stride_sbk, stride_sbn, A_T, B_T, SCALE_MODE, SB_N, BLOCK_M,
                    BLOCK_N, BLOCK_K, WS, RESCALE)
    _store_tile(c_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_cm, stride_cn)


@triton.jit
def _edge_tiles(a_desc, be_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, first_m, off_n, num_pid_m,
                stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn,
                A_T: tl.constexpr, B_T: tl.constexpr, SCALE_MODE: tl.constexpr, SB_N: tl.constexpr,
                BLOCK_M: tl.constexpr, PER: tl.constexpr, EDGE_N: tl.constexpr, BLOCK_K: tl.constexpr,
                WS: tl.constexpr, RESCALE: tl.constexpr):
    """NARROW_EDGE: row blocks [first_m, first_m + PER) of the last tile column (from off_n, EDGE_N wide)."""
    offs_n = off_n + tl.arange(0, EDGE_N)
    mask_n = offs_n < N
    for pid_m in range(first_m, tl.minimum(first_m + PER, num_pid_m)):
        off_m = pid_m * BLOCK_M
        offs_m = off_m + tl.arange(0, BLOCK_M)
        _tma_tile_store(a_desc, be_desc, c_ptr, sa_ptr, sb_ptr, K, off_m, off_n, offs_m, offs_m < M, offs_n, mask_n,
                        stride_cm, stride_cn, stride_sam, stride_sak, stride_sbk, stride_sbn, A_T, B_T, SCALE_MODE,
                        SB_N, BLOCK_M, EDGE_N, BLOCK_K, WS, RESCALE)


def edge_n(N, bn):
    """NARROW_EDGE's edge tile width for N columns in tiles bn wide: the power of two (>= 16) covering N % bn
    when that is at most bn // 2, else 0 (no narrow edge)."""
    rem = N % bn
    if rem == 0:
        return 0
    e = max(16, triton.next_power_of_2(rem))
    return e if e <= bn // 2 else 0


def _grid_tiles(M, N, bm, bn, edge):
    """Programs of a plain TMA launch: one per tile, or with a narrow edge the full-width tiles plus one per
    bn // edge edge tiles."""
    pm = -(-M // bm)
    if not edge:
        return pm * -(-N // bn)
    return pm * (N // bn) + -(-pm // (bn // edge))


def _set_tma_blocks(nargs):
    """The descriptors' block shapes follow the config about to run (be_desc: the narrow edge's B blocks)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]
    if nargs.get("EDGE_N"):
        en = nargs["EDGE_N"]
        nargs["be_desc"].block_shape = [en, bk] if nargs["B_T"] else [bk, en]


# configs are chosen by _tuner (interleaved timing, CUDA-graph-capture safe): see _launch and _launch_tma

USE_TMA = os.environ.get("TURBO_DIST_TRITON_TMA", "1") != "0"  # 0: pointer kernels only (A/B comparisons)


def _tma_layout(t):
    """For a 2-D operand view: (stored, transposed) if a TMA descriptor can cover it, else None.
    `stored` is t itself (row-major) or t.t() (t is a transpose of a row-major tensor)."""
    if t.element_size() not in (1, 2) or t.data_ptr() % 16:
        return None
    for stored, transposed in ((t, False), (t.t(), True)):
        if stored.stride(1) == 1 and (stored.stride(0) * t.element_size()) % 16 == 0 and stored.stride(0) >= 1:
            return stored, transposed
    return None


_MAJOR = {}


def sm_major(device):
    """The CUDA device's compute capability major, cached (~8 us per get_device_capability call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MAJOR:
        _MAJOR[idx] = torch.cuda.get_device_capability(idx)[0]
    return _MAJOR[idx]


def tma_device_ok(*tensors):
    """Whether the TMA kernels (GEMM, grouped GEMM, weight gradient) may run on these operands at all: TMA on
    (TURBO_DIST_TRITON_TMA), Triton's TensorDescriptor present, no empty operand, a Hopper+ GPU or the
    interpreter. Each caller checks its own layouts."""
    if not USE_TMA or TensorDescriptor is None or any(0 in t.shape for t in tensors):
        return False
    if tensors[0].is_cuda:
        return sm_major(tensors[0].device) >= 9
    return interpreting()


def tma_operands(a, b):
    """((a_stored, A_T), (b_stored, B_T)) when the TMA kernel can run C = a @ b, else None."""
    if not tma_device_ok(a, b):
        return None
    la, lb = _tma_layout(a), _tma_layout(b)
    if la is None or lb is None:
        return None
    if a.element_size() == 1 and (la[1] or not lb[1]):
        return None  # FP8 tensor cores take both operands K-major: a [M, K] row-major, b as [N, K] row-major
    return la, lb


PERSISTENT, WARP_SPECIALIZE, RESCALE_ACC, SPLIT_TAIL, TAIL_LAUNCH, NARROW_EDGE = 1, 2, 4, 8, 16, 32  # 7th entry
Cfg = collections.namedtuple("Cfg", "bm bn bk gm warps stages persistent ws rescale tail two_launch edge")


def _unpack(config):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, flags]) -> Cfg. Flags (bits, for the TMA
    kernels: tests / tune_ops force them, _launch_tma's candidates use SPLIT_TAIL and TAIL_LAUNCH):
    PERSISTENT one program per SM; WARP_SPECIALIZE; RESCALE_ACC (blockwise); SPLIT_TAIL the persistent kernel
    with the last partial wave cut along K; TAIL_LAUNCH the same split tail as a second launch after a plain
    launch of the full waves; NARROW_EDGE the plain kernel with the last, narrow tile column in narrower tiles
    (edge_n; not with the persistent / split-tail ones)."""
    if len(config) not in (6, 7) or (len(config) == 7 and not 0 <= int(config[6]) <= 63):
        raise ValueError(f"a gemm config is (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, flags 0-63]), "
                         f"got {config}")
    flags = int(config[6]) if len(config) == 7 else 0
    two = bool(flags & TAIL_LAUNCH)
    tail = bool(flags & SPLIT_TAIL) or two
    edge = bool(flags & NARROW_EDGE)
    if edge and (tail or flags & PERSISTENT):
        raise NotImplementedError(f"gemm config {config}: NARROW_EDGE (32) runs on the plain TMA kernel only, not "
                                  f"with PERSISTENT / SPLIT_TAIL / TAIL_LAUNCH")
    return Cfg(*config[:6], bool(flags & PERSISTENT) or (tail and not two), bool(flags & WARP_SPECIALIZE),
               bool(flags & RESCALE_ACC), tail, two, edge)


_SMS = {}


def _num_sms(device):
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _launch(a, b, c, sa, sb, mode, sb_n=128, config=None, split_tail=None):
    """a: [M, K] view, b: [K, N] view, c: [M, N] output; strides are taken as they are. split_tail (TMA operands
    only): None = the tuner also times the split-tail kernels where split_tail_pays, True / False = only them /
    never (see _candidates)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    dummy = c  # never dereferenced when the mode does not use it
    sa_t = sa if sa is not None else dummy
    sb_t = sb if sb is not None else dummy
    if sa is not None and sa.dim() == 2:
        s_am, s_ak = sa.stride(0), sa.stride(1)
    else:
        s_am, s_ak = (sa.stride(0) if sa is not None and sa.dim() == 1 else 0), 0
    if sb is not None and sb.dim() == 2:
        s_bk, s_bn = sb.stride(0), sb.stride(1)
    else:
        s_bk, s_bn = 0, (sb.stride(0) if sb is not None and sb.dim() == 1 else 0)
    if mode == SCALE_BLOCK and s_am != 1 and M > 1:
        # each K step reads one scale_a column for the tile's rows: M-contiguous makes that one coalesced load
        sa_t = sa.t().contiguous().t()
        s_am, s_ak = sa_t.stride()
    if config is None and interpreting():
        config = INTERPRET_CONFIG if mode != SCALE_BLOCK else (32, 32, 128, 4, 4, 1)
    if config is not None and mode == SCALE_BLOCK and _unpack(config).bk != 128:
        raise ValueError(f"blockwise scales step K by 128: BLOCK_K must be 128, got config {config}")
    tma = tma_operands(a, b)
    if tma is not None:
        return _launch_tma(a, b, c, sa_t, sb_t, tma, (s_am, s_ak, s_bk, s_bn), mode, sb_n, config, split_tail)
    if split_tail:
        raise NotImplementedError("split_tail=True runs on the TMA kernel only; these operands take the pointer "
                                  "kernel (see tma_operands)")
    allow_tf32 = a.dtype == torch.float32 and a.is_cuda and torch.backends.cuda.matmul.allow_tf32
    args = (a, b, c, sa_t, sb_t, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), s_am, s_ak, s_bk, s_bn)
    meta = dict(SCALE_MODE=mode, SB_N=sb_n, ALLOW_TF32=allow_tf32)

    def launcher(cfg):
        bm, bn, bk, gm, w, s, persistent, ws, rescale, tail, _, edge = _unpack(cfg)
        if persistent or ws or rescale or tail or edge:
            raise NotImplementedError(f"persistent / split-tail / narrow-edge / warp-specialized / rescaled config "
                                      f"{cfg} runs on the TMA kernel only; these operands take the pointer kernel "
                                      f"(see tma_operands)")
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        return lambda: _gemm_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                                          num_warps=w, num_stages=s)

    if config is not None:
        launcher(config)()
        return c
    rows = tune_rows(CONFIGS_BLOCK if mode == SCALE_BLOCK else (CONFIGS_8 if a.element_size() == 1 else CONFIGS_16))
    key = ("gemm_ptr", M, N, K, mode, sb_n, allow_tf32, a.dtype, b.dtype, c.dtype, a.stride(), b.stride(), c.stride(),
           str(a.device), tuple(rows))
    _tuner.launch_best(key, rows, launcher, a.device)
    return c


def _candidates(mode, es, c_es, M, N, nprog, split_tail):
    """The configs the tuner times for one TMA call: this operand type's list, the narrow-edge ones where N leaves
    a narrow last tile column, and, where the last wave is at most half full, the split-tail ones (both
    variants) beside them; split_tail=True: those only, False: never."""
    from . import gemm_persistent as gp

    cands = tuple(tune_rows(CONFIGS_BLOCK if mode == SCALE_BLOCK else (CONFIGS_8 if es == 1 else CONFIGS_16)))
    if not split_tail:
        edges = CONFIGS_EDGE_BLOCK if mode == SCALE_BLOCK else (CONFIGS_EDGE_8 if es == 1 else CONFIGS_EDGE_16)
        cands += tuple((*cfg, NARROW_EDGE) for cfg in tune_rows(edges) if edge_n(N, cfg[1]))
    if split_tail is False or (split_tail is None and not (gp.SPLIT_TAIL_AUTO and gp.split_tail_pays(M, N, nprog))):
        return cands
    if (mode == SCALE_BLOCK and es != 1) or c_es != 2:
        # the 16-bit tail configs step K by 64 (blockwise scales need 128); fp32 outputs need more shared memory
        # for the epilogue than these tiles leave (forced configs may still ask for either)
        if split_tail:
            raise NotImplementedError("split_tail=True: the split-tail candidates take 16-bit outputs, and blockwise "
                                      "scales only with FP8 operands; force a config (7th entry 8) otherwise")
        return cands
    tail = tuple((*cfg, flag) for cfg in tune_rows(gp.CONFIGS_TAIL_8 if es == 1 else gp.CONFIGS_TAIL_16)
                 for flag in (SPLIT_TAIL, TAIL_LAUNCH))
    return tail if split_tail else cands + tail


def _launch_tma(a, b, c, sa, sb, tma, s_strides, mode, sb_n, config, split_tail=None):
    from . import gemm_persistent as gp

    M, K = a.shape
    N = b.shape[1]
    (a_st, a_t), (b_st, b_t) = tma
    # block shapes are placeholders here: each launch sets its config's (_set_tma_blocks)
    a_desc = TensorDescriptor.from_tensor(a_st, [16, 16])
    b_desc = TensorDescriptor.from_tensor(b_st, [16, 16])
    be_desc = None  # NARROW_EDGE's B descriptor, made by the first config that asks for it
    args = (a_desc, b_desc, c, sa, sb, M, N, K, c.stride(0), c.stride(1), *s_strides)
    meta = dict(A_T=a_t, B_T=b_t, SCALE_MODE=mode, SB_N=sb_n)
    nprog = _num_sms(a.device)

    def launcher(config):
        nonlocal be_desc
        cf = _unpack(config)
        kw = dict(BLOCK_M=cf.bm, BLOCK_N=cf.bn, BLOCK_K=cf.bk, GROUP_M=cf.gm, WS=cf.ws, RESCALE=cf.rescale,
                  num_warps=cf.warps, num_stages=cf.stages)
        en = edge_n(N, cf.bn) if cf.edge else 0
        if cf.edge:
            if not en:
                raise ValueError(f"gemm config {config}: NARROW_EDGE needs 0 < N % BLOCK_N <= BLOCK_N // 2 (N = {N})")
            if be_desc is None:
                be_desc = TensorDescriptor.from_tensor(b_st, [16, 16])
            kw.update(EDGE_N=en, be_desc=be_desc)
        tiles = _grid_tiles(M, N, cf.bm, cf.bn, en)  # all tiles of the output when en == 0

        def launch():
            _set_tma_blocks(dict(a_desc=a_desc, b_desc=b_desc, be_desc=be_desc, A_T=a_t, B_T=b_t, BLOCK_M=cf.bm,
                                 BLOCK_N=cf.bn, BLOCK_K=cf.bk, EDGE_N=en))
            tb = gp.tail_buffers(a.device, nprog, cf.bm * cf.bn) if cf.tail else (c, c)
            if cf.two_launch:  # the full waves plain, then the partial wave cut along K
                if tiles >= nprog:
                    _gemm_tma_kernel[(tiles - tiles % nprog,)](*args, **meta, **kw)
                if tiles % nprog:
                    gp._gemm_tma_persistent_kernel[(nprog,)](*args[:5], *tb, *args[5:], **meta, **kw,
                                                             NUM_PROGS=nprog, SPLIT_TAIL=True, TAIL_ONLY=True)
            elif cf.persistent:
                n = nprog if cf.tail else min(tiles, nprog)
                gp._gemm_tma_persistent_kernel[(n,)](*args[:5], *tb, *args[5:], **meta, **kw, NUM_PROGS=n,
                                                     SPLIT_TAIL=cf.tail)
            else:
                _gemm_tma_kernel[(tiles,)](*args, **meta, **kw)
        return launch

    if config is not None:  # forced (tests, benches; under TRITON_INTERPRET=1 always, see _launch)
        if split_tail and not _unpack(config).tail:
            config = (*config[:6], (config[6] if len(config) == 7 else 0) | SPLIT_TAIL)
        launcher(config)()
        return c
    # tuned on first use per shape (_tuner.pick, interleaved timing); later calls build only the chosen launch
    cands = _candidates(mode, a.element_size(), c.element_size(), M, N, nprog, split_tail)
    key = ("gemm", M, N, K, mode, sb_n, a_t, b_t, a.dtype, b.dtype, c.dtype, c.stride(), str(a.device), cands)
    _tuner.launch_best(key, cands, launcher, a.device)
    return c


def gemm(a, b, out_dtype=None, config=None, split_tail=None):
    """C = a @ b for a [M, K], b [K, N] (any strides; pass `x.t()` for a transpose). fp16/bf16/fp32 in,
    fp32 accumulate, `out_dtype` (default a.dtype) out. `config` forces one tile config (tests/benches);
    `split_tail` (see _launch) picks or refuses the split-tail-wave kernel."""
    c = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype or a.dtype, device=a.device)
    return _launch(a, b, c, None, None, SCALE_NONE, config=config, split_tail=split_tail)


def scaled_gemm(a, b, scale_a, scale_b, mode, out_dtype=torch.bfloat16, block_n=128, config=None, split_tail=None):
    """C = dequant(a) @ dequant(b) for FP8 (or any float) a [M, K], b [K, N] with fp32 scales:
    mode SCALE_TENSOR: scale_a [1], scale_b [1]; SCALE_ROW: scale_a [M], scale_b [N];
    SCALE_BLOCK: scale_a [M, cdiv(K,128)] (1x128 blocks), scale_b [cdiv(K,128), cdiv(N, block_n)]."""
    c = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    return _launch(a, b, c, scale_a, scale_b, mode, sb_n=block_n, config=config, split_tail=split_tail)
