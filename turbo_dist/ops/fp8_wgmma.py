"""Backend "wgmma" of grouped_scaled_mm: FP8 BLOCKWISE grouped GEMM on Hopper in one persistent launch of our
CUDA kernel (turbo_dist._fp8_wgmma, csrc/fp8_wgmma/; setup.py builds it where nvcc is found and torch is a CUDA
build). It reads the group boundaries on the GPU, so unlike "cublaslt" / "torch_loop" it takes token counts that
live on the device and any row counts, with no host sync (CUDA-graph safe); unlike "triton" its consumers
promote each 128-deep partial product while the other warpgroup's WGMMA runs (README, "Benchmarks").

Takes grouped_scaled_mm's block mode: a_q [M, K] row-major e4m3/e5m2 with scale_a [M, cdiv(K, 128)] fp32,
b_q [G, K, N] as a view of w [G, N, K] (K contiguous) e4m3/e5m2 with scale_b [G, cdiv(K, 128), cdiv(N, 128)]
fp32 (any strides), bf16 out; SM90 only.
"""
import contextlib

import torch

from . import dispatcher
from .fp8 import E4M3, E5M2, _sb_n
from .fp8_grouped import load_optional_module, warn_missing_once
from .grouped_gemm import group_offsets

_MOD = {}


def wgmma_module():
    """turbo_dist._fp8_wgmma, or None when it was not built here (the reason: _MOD["why"])."""
    return load_optional_module(_MOD, "_fp8_wgmma", "nvcc is found and torch is a CUDA build")


def on_device(device):
    """The launchers call cudaSetDevice(device): make `device` current for the launch and restore the caller's
    afterwards (otherwise later `device="cuda"` allocations land on the tensors' GPU, not the caller's)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():  # (CPU: the tests' fake module)
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# CTAs per cluster: 2 = two row tiles of a group share each weight tile by TMA multicast (half the weight
# traffic from L2), 1 = one CTA per 128 x 256 tile. Measured on an H200 (benchmarks/probe_fp8_wgmma.py, labels
# fp8_wgmma_c1 / _c2, and probe_fp8_wgmma_cluster.py): 2 is 1-8% faster at ~1024 rows per expert, 3-13% slower at
# ~256 (a group's odd last row tile idles one CTA of the pair), even at ~512, so 2 from CLUSTER_MIN_ROWS rows per
# group on average (M / G, known on the host).
CLUSTER_MIN_ROWS = 768


def pick_cluster(M, G):
    return 2 if M >= CLUSTER_MIN_ROWS * max(G, 1) else 1


# The stream-K tail (csrc/fp8_wgmma/common.h, "the stream-K tail"): when the launch's tiles leave a last wave at
# most TAIL_PCT % full, the last waves are cut into equal runs of K steps, one per CTA (TAIL_WAVES 2: the last full
# wave and the partial one, a tile in at most two pieces; 1: the partial wave alone), the pieces' fp32 partial sums
# handed to the CTA holding the tile's head through a workspace. One CTA per tile only (cluster 1). 0 turns it off:
# the default, measured mixed (README, "Benchmarks").
TAIL_PCT = 0
TAIL_WAVES = 2
FIXUP_FLOATS_PER_CTA = 128 * 256  # one 128 x 256 fp32 tile of partial sums per CTA


def stream_k_args(device, num_sms, cluster, tail_pct, tail_waves, default_pct):
    """(keyword arguments of the kernels' stream-K tail, the buffers to keep alive until the launch): a
    [num_sms, 128 x 256] fp32 workspace and num_sms zeroed flags, fresh per call from the caching allocator (stream
    ordered, so they may be freed once launched); ({}, ()) when the tail is off. tail_pct None: the caller's
    default_pct with one CTA per tile, off with clusters."""
    if tail_pct is None:
        tail_pct = default_pct if cluster == 1 else 0
    if not tail_pct:
        return {}, ()
    from ..runtime.config import peer_timeout_s

    ws = torch.empty(num_sms * FIXUP_FLOATS_PER_CTA, dtype=torch.float32, device=device)
    flags = torch.zeros(num_sms, dtype=torch.int32, device=device)
    return dict(ws=ws.data_ptr(), flags=flags.data_ptr(), ws_ctas=num_sms, tail_pct=int(tail_pct),
                tail_waves=TAIL_WAVES if tail_waves is None else int(tail_waves),
                timeout_s=peer_timeout_s()), (ws, flags)


def tile_counter(device):
    """The dynamic tile order's counter (common.h, dynamic tiles): a zeroed int32, fresh per call from the caching
    allocator, so it is zero in stream order and a CUDA graph captures the zeroing with the launch."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def half_tile_args(device, half_tiles, asked, cluster, sk, keep):
    """(kernel arguments, buffers to keep alive) with the dynamic tile order's counter (tile_counter) added where
    half tiles run: they need one CTA per tile and no stream-K tail (`sk` empty);
    asked for (`asked`) where they cannot run: ValueError, otherwise they are left out."""
    if not half_tiles:
        return sk, keep
    if cluster != 1 or sk:
        if asked:
            raise ValueError("half_tiles needs cluster=1 and no stream-K tail (tail_pct=0)")
        return sk, keep
    counter = tile_counter(device)
    return dict(sk, counter=counter.data_ptr()), (*keep, counter)


def tail_split(tiles, stride, k_steps, tail_pct, waves):
    """(dp, run) of common.h's TailSplit: whole tiles below dp, then runs of `run` K steps; run 0: no tail."""
    full, rest = divmod(tiles, stride)
    if tail_pct > 0 and full >= waves - 1 and rest > 0 and rest * 100 <= tail_pct * stride:
        dp = (full - (waves - 1)) * stride
        return dp, -(-(tiles - dp) * k_steps // stride)
    return 0, 0


def work_pieces(tiles, first, stride, k_steps, tail_pct, waves=2):
    """The host mirror of common.h's work_piece: the pieces (tile, kb0, kb1) CTA `first` of `stride` runs over
    `tiles` tiles of k_steps K steps (tests check it covers each step once and who merges whose partials)."""
    dp, run = tail_split(tiles, stride, k_steps, tail_pct, waves)
    if not run:
        return [(t, 0, k_steps) for t in range(first, tiles, stride)]
    pieces = [(t, 0, k_steps) for t in range(first, dp, stride)]
    pos = dp * k_steps + first * run
    end = min(tiles * k_steps, pos + run)
    while pos < end:
        t, kb0 = divmod(pos, k_steps)
        kb1 = min(k_steps, kb0 + end - pos)
        pieces.append((t, kb0, kb1))
        pos += kb1 - kb0
    return pieces


# Dynamic tiles with half tiles (grouped_blockwise.cu's DYN, as the bf16 kernel's default): a group's last <= 64
# rows take half a tile's WGMMA and promotion work, tiles handed out by an atomic counter. Correct on the GPU but
# mixed: 0.89-1.07x whole tiles over two runs (+5-7% at G=32 x 256 fc2, -2% / -11% at G=32 x 128 fc1;
# benchmarks/results/probe_fp8_wgmma_half_h200.json, _half2_h200.json), so off.
HALF_TILES = False


def wgmma_grouped_scaled(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype, cluster=None, tail_pct=None,
                         num_sms=None, tail_waves=None, half_tiles=None):
    """out [M, N] bf16: per group (a_q * scale_a)[rows] @ (b_q[g] * scale_b[g]); the inputs checked first by the
    predicate below (ValueError with its reason). cluster: CTAs per cluster (1 or 2; default pick_cluster(M, G));
    tail_pct: the stream-K tail (default TAIL_PCT with one CTA per tile, off with clusters), tail_waves (default
    TAIL_WAVES); half_tiles: dynamic half tiles (default HALF_TILES where one CTA per tile and no tail run; asked
    for with either: ValueError); num_sms: CTAs at most (default: the GPU's SMs; tests use fewer)."""
    ok = _wgmma_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype)
    if ok is not True:
        raise ValueError(f"wgmma_grouped_scaled: {ok}")
    return _grouped_blockwise(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype, cluster, tail_pct, num_sms,
                              tail_waves, half_tiles)


def _grouped_blockwise(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype, cluster=None, tail_pct=None,
                       num_sms=None, tail_waves=None, half_tiles=None):
    """wgmma_grouped_scaled past its checks (the dispatcher's backend: it ran the predicate when it chose it)."""
    from turbo_dist.kernels import gemm as gemm_kernels  # its cached SM count

    M, K = a_q.shape
    G, _, N = b_q.shape
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum (the launcher refuses K <= 0)
        return out.zero_()
    offs = group_offsets(group_lens, a_q.device)  # int64 cumulative ends, read by the kernel
    num_sms = gemm_kernels._num_sms(a_q.device) if num_sms is None else num_sms
    cluster = pick_cluster(M, G) if cluster is None else cluster
    sk, _keep = stream_k_args(a_q.device, num_sms, cluster, tail_pct, tail_waves, TAIL_PCT)
    sk, _keep = half_tile_args(a_q.device, HALF_TILES if half_tiles is None else half_tiles, half_tiles is not None,
                               cluster, sk, _keep)
    with on_device(a_q.device):
        _launch_blockwise(a_q, b_q, scale_a, scale_b, out, offs, M, N, K, G, num_sms, cluster, sk)
    return out


def _launch_blockwise(a_q, b_q, scale_a, scale_b, out, offs, M, N, K, G, num_sms, cluster, sk):
    wgmma_module().grouped_blockwise(
        device=a_q.device.index, stream=torch.cuda.current_stream(a_q.device).cuda_stream, a=a_q.data_ptr(),
        w=b_q.data_ptr(), out=out.data_ptr(), offs=offs.data_ptr(), scale_a=scale_a.data_ptr(),
        sa_row=scale_a.stride(0), sa_k=scale_a.stride(1), scale_w=scale_b.data_ptr(), sw_g=scale_b.stride(0),
        sw_k=scale_b.stride(1), sw_n=scale_b.stride(2), M=M, N=N, K=K, G=G, lda=a_q.stride(0), ldw=b_q.stride(2),
        w_group=b_q.stride(0) if G > 1 else N * b_q.stride(2), ldo=out.stride(0), a_e5m2=a_q.dtype == E5M2,
        w_e5m2=b_q.dtype == E5M2, num_sms=num_sms, cluster=cluster, **sk)


def _wgmma_grouped_scaled_can(a_q, b_q, scale_a, scale_b, group_lens, mode, out_dtype):
    if mode != "block":
        return f"wgmma runs BLOCKWISE only, not {mode}"
    if wgmma_module() is None:
        warn_missing_once(_MOD, a_q.device, "wgmma")
        return _MOD["why"]
    if not (a_q.is_cuda and b_q.is_cuda and scale_a.is_cuda and scale_b.is_cuda):
        return "wgmma needs CUDA tensors"
    if torch.cuda.get_device_capability(a_q.device) != (9, 0):
        return "wgmma runs on SM90 (Hopper) only"
    if a_q.dtype not in (E4M3, E5M2) or b_q.dtype not in (E4M3, E5M2) or out_dtype != torch.bfloat16:
        return "wgmma needs e4m3/e5m2 operands and a bf16 output"
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        return "wgmma needs fp32 scales"
    M, K = a_q.shape
    G, _, N = b_q.shape
    if _sb_n(b_q, scale_b) != 128:
        return "wgmma needs 128x128 weight blocks"
    if a_q.stride(1) != 1 or b_q.stride(1) != 1:
        return "wgmma needs a row-major and each b[g] column-major (w [G, N, K] with K contiguous)"
    if K % 16 or N % 8:
        return f"wgmma needs K a multiple of 16 and N of 8, got K={K}, N={N}"
    if (a_q.data_ptr() % 16 or b_q.data_ptr() % 16 or a_q.stride(0) % 16 or b_q.stride(2) % 16
            or (G > 1 and b_q.stride(0) % 16)):
        return "wgmma needs 16-byte aligned operands and row / group strides (TMA)"
    if max(M, N, K, G) >= 2 ** 31:
        return "wgmma needs M, N, K and G below 2**31"
    return True


# First in the default order (it takes BLOCKWISE only; "triton" runs the other modes). Measured (H200, DeepSeek-V3
# fc1 / fc2, skewed counts on the GPU; benchmarks/results/probe_fp8_wgmma_h200.json): faster than our Triton
# kernel in every case, 128 to 1024 rows per expert. With host counts aligned to 128 and >= 1024 rows per group
# on average, fp8_grouped's preference still moves "cublaslt" (cuBLASLt per group) ahead of it
# (WGMMA_NATIVE_MIN_GROUP_FLOP there); "torch_loop" never.
dispatcher.register_backend("grouped_scaled_mm", "wgmma", _grouped_blockwise, _wgmma_grouped_scaled_can,
                            priority=5)
