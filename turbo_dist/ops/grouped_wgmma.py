"""Backend "wgmma" of grouped_gemm: bf16 grouped GEMM on Hopper in one persistent launch of our CUDA kernel
(turbo_dist._fp8_wgmma's grouped_bf16, csrc/fp8_wgmma/grouped_bf16.cu: the FP8 blockwise kernel's TMA + WGMMA
pipeline without the scales; by default tiles handed out at run time with a group's last <= 64 rows as a half
tile; on request 2-CTA clusters sharing each weight tile by TMA multicast, which Triton 3.6 cannot express, or a
stream-K tail for the last wave). Reads the group boundaries on the GPU; b [G, K, N] (N contiguous, the forward)
or b [G, N, K] with trans_b (K contiguous, the dgrad); a row-major; bf16 in and out.

Chosen by grouped_gemm's rule (grouped_gemm._grouped_preference) where it would run our Triton kernel (except a
transposed b with K > N) and on a forward wider than deep up to 1024 rows per group, on SM90 with the extension
built (PREFERRED); last in the default order otherwise. benchmarks/probe_grouped_wgmma.py times it against
torch._grouped_mm, our Triton kernel and the per-expert loop.

Also backend "wgmma" of grouped_gemm_wgrad (csrc/fp8_wgmma/grouped_wgrad.cu, wgmma_wgrad): with its stmatrix
epilogue the default's choice on SM90 up to WGRAD_GROUP_ROWS rows per group (WGRAD_PREFERRED;
benchmarks/probe_grouped_wgrad.py).
"""
import torch

from . import dispatcher
from .fp8_wgmma import _MOD, half_tile_args, on_device, stream_k_args, tile_counter, wgmma_module
from .fp8_grouped import warn_missing_once
from .grouped_gemm import group_offsets


# bf16 defaults, measured apart from the FP8 kernel's (benchmarks/probe_grouped_wgmma.py): two CTAs sharing the
# weight tile were slower in 10 of 12 cases (G=8 fc2 at ~1024 rows per expert 2-4% faster), so one CTA per tile.
CLUSTER = 1
TAIL_PCT = 0
# Dynamic tiles with half tiles (csrc/fp8_wgmma/grouped_bf16.cu, DYN): a group's last <= 64 rows take half a tile's
# WGMMA work, tiles handed out by an atomic counter so that their two costs balance. One CTA per tile, no tail.
HALF_TILES = True
# Measured on an H200 (DeepSeek-V3 experts, skewed counts on the GPU; benchmarks/results/
# probe_grouped_wgmma_half_h200.json, _half2_h200.json, ops_grouped_wgmma_h200.json, _wgmma2_h200.json): half tiles
# 0.93-1.13x whole tiles (gains up to 13% at 128-256 rows per expert, mostly within the ~3% noise at 1024); against
# our Triton kernel, where grouped_gemm's rule runs ours, ahead or within 2% on the forward (fc1 1.00-1.03x, fc2
# 1.04-1.09x at 128-256 rows per expert) and the fc1 dgrad (1.01-1.04x), behind on the fc2 dgrad (a transposed b
# with K = 7168 > N = 2048: 0.91-0.98x in all four runs). So the rule runs this kernel where it would run Triton,
# except a transposed b with K > N.
PREFERRED = True
# Tall tiles (grouped_bf16.cu, grouped_bf16_tall_kernel): 256 x 128 tiles, cuBLAS's shape for these GEMMs (its
# batched GEMM ran 1.45x the per-expert loop on uniform 256-row groups where our 128 x 256 tiles ran 1.25x,
# benchmarks/results/probe_grouped_bounds_h100.json): a group of <= 256 rows reads each weight tile once. Dynamic
# tiles, a group's last <= 128 rows as a half tile. Measured on an H100 on 2026-12-06 (probe_grouped_wgmma_tall_h100
# and probe_grouped_bounds_tall_h100.json): equal bits to torch._grouped_mm, but slower than the default's half tiles
# on all six skewed-count passes (fc1 fwd at 256 tok/expert 1.088 vs 0.974 ms; the skew leaves 26.6% padded rows
# under 256/128-row tiles against 12.5% under 128/64); ahead only in the forward on uniform counts (0.803 vs 0.845
# ms at 256 rows per expert; their dgrad, K-major b, is behind there too). So opt-in: TALL_TILES = True (or tall=True)
# for capacity-padded routing, equal 256-aligned counts per expert; it applies to an N-major b only (the forward of
# [G, K, N] weights), the dgrad keeps the half tiles.
TALL_TILES = False


def preferred(a, b, group_lens, trans_b=False):
    """Whether grouped_gemm's rule should run this kernel instead of our Triton one: PREFERRED, not a transposed b
    with K > N (the measured exception above), and it accepts the inputs."""
    if not PREFERRED or (trans_b and a.shape[1] > b.shape[1]):
        return False
    return _wgmma_grouped_can(a, b, group_lens, trans_b) is True


def _require(ok, name):
    """ValueError with the predicate's reason unless it accepted the inputs (True)."""
    if ok is not True:
        raise ValueError(f"{name}: {ok}")


def wgmma_grouped(a, b, group_lens, trans_b=False, cluster=None, tail_pct=None, num_sms=None, tail_waves=None,
                  half_tiles=None, tall=None):
    """out [M, N] bf16: per group a[rows] @ (b[g]^T if trans_b else b[g]); the inputs checked first by the
    predicate below (ValueError with its reason: no CUDA, no SM90, the extension not built, a layout it cannot
    take). cluster: CTAs per cluster (1 or 2; default CLUSTER); tail_pct: the stream-K tail (fp8_wgmma.TAIL_PCT's
    meaning; default TAIL_PCT with one CTA per tile, off with clusters), tail_waves (fp8_wgmma.TAIL_WAVES);
    half_tiles: dynamic tiles with half tiles (default HALF_TILES where one CTA per tile and no tail run; asked
    for with a cluster or a tail: ValueError); tall: 256 x 128 tiles with dynamic tiles and 128-row half tiles
    (default TALL_TILES for an N-major b, off for a K-major one, where they were measured slower; like half_tiles
    they need one CTA per tile and no tail); num_sms: CTAs at most (default:
    the GPU's SMs; tests use fewer)."""
    _require(_wgmma_grouped_can(a, b, group_lens, trans_b), "wgmma_grouped")
    return _grouped_bf16(a, b, group_lens, trans_b, cluster, tail_pct, num_sms, tail_waves, half_tiles, tall)


def _grouped_bf16(a, b, group_lens, trans_b=False, cluster=None, tail_pct=None, num_sms=None, tail_waves=None,
                  half_tiles=None, tall=None):
    """wgmma_grouped past its checks (the dispatcher's backend: it ran the predicate when it chose it)."""
    from turbo_dist.kernels import gemm as gemm_kernels  # its cached SM count

    M, K = a.shape
    G = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    num_sms = gemm_kernels._num_sms(a.device) if num_sms is None else num_sms
    cluster = CLUSTER if cluster is None else cluster
    sk, _keep = stream_k_args(a.device, num_sms, cluster, tail_pct, tail_waves, TAIL_PCT)
    if tall and (half_tiles is False or cluster != 1 or sk):
        raise ValueError("tall tiles run as dynamic tiles: they need cluster=1, no stream-K tail (tail_pct=0) and "
                         "half_tiles left on")
    asked = half_tiles is not None or bool(tall)
    sk, _keep = half_tile_args(a.device, bool(tall) or (HALF_TILES if half_tiles is None else half_tiles), asked,
                               cluster, sk, _keep)
    if ((TALL_TILES and not trans_b) if tall is None else tall) and "counter" in sk:
        sk = dict(sk, tall=True)
    offs = group_offsets(group_lens, a.device)  # int64 cumulative ends, read by the kernel (after the refusals)
    with on_device(a.device):
        _launch_bf16(a, b, out, offs, M, N, K, G, trans_b, num_sms, cluster, sk)
    return out


def _launch_bf16(a, b, out, offs, M, N, K, G, trans_b, num_sms, cluster, sk):
    wgmma_module().grouped_bf16(
        device=a.device.index, stream=torch.cuda.current_stream(a.device).cuda_stream, a=a.data_ptr(),
        b=b.data_ptr(), out=out.data_ptr(), offs=offs.data_ptr(), M=M, N=N, K=K, G=G, lda=a.stride(0),
        ldb=b.stride(1), b_group=b.stride(0) if G > 1 else b.shape[1] * b.stride(1), ldo=out.stride(0),
        n_major=not trans_b, num_sms=num_sms, cluster=cluster, **sk)


def _hopper_bf16(kernel, a, b, names):
    """The checks both kernels share: the extension built with `kernel`, a and b bf16 on one SM90 device; None
    when they pass, else the reason."""
    if not (getattr(a, "is_cuda", False) and getattr(b, "is_cuda", False)) or a.device != b.device:
        return f"wgmma needs {names} on one CUDA device"
    mod = wgmma_module()
    if mod is None:
        warn_missing_once(_MOD, a.device, "wgmma")
        return _MOD["why"]
    if not hasattr(mod, kernel):
        return f"turbo_dist._fp8_wgmma was built without {kernel}: rebuild it (pip install -e .)"
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return "wgmma runs on SM90 (Hopper) only"
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return f"wgmma's {kernel} takes bf16 only, got {a.dtype} and {b.dtype}"
    return None


def _wgmma_grouped_can(a, b, group_lens, trans_b=False):
    why = _hopper_bf16("grouped_bf16", a, b, "a and b")
    if why:
        return why
    if a.stride(1) != 1 or b.stride(2) != 1:
        return "wgmma needs a row-major and b's last dim contiguous"
    M, K = a.shape
    N = b.shape[1] if trans_b else b.shape[2]
    if K % 8 or N % 8 or a.stride(0) % 8 or b.stride(1) % 8 or (b.shape[0] > 1 and b.stride(0) % 8):
        return f"wgmma needs K, N and the row / group strides multiples of 8 elements, got K={K}, N={N}"
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return "wgmma needs 16-byte aligned operands (TMA)"
    if max(M, N, K, b.shape[0]) >= 2 ** 31:
        return "wgmma needs M, N, K and G below 2**31"
    return True


# The weight gradient's CTAs per cluster: 2 = two row tiles of a group share dc's (y's) boxes by TMA multicast, 1 =
# one CTA per tile, tiles handed out at run time. (Measured and removed: two independent pipelines of 128 x 128
# tiles per CTA, 0.84-0.92x torch's at 128-1024 rows per expert, probe_grouped_wgrad_p2_h200.json; warpgroups
# splitting a tile by columns and taking turns for the epilogue, 0.96-1.04x one CTA per tile,
# probe_grouped_wgrad_stagger_h200.json.)
WGRAD_CLUSTER = 2
# The tile's epilogue by stmatrix instead of shuffles and 16-byte stores (grouped_wgrad.cu, stage_out_stsm): bit-equal
# to the shuffle epilogue and 1.10-1.22x torch._grouped_mm's weight gradient at 128-1024 rows per expert, where the
# shuffle epilogue was 0.94-1.01x (one H200, 2026-12-05: benchmarks/results/probe_grouped_wgrad_stsm_h200.json).
WGRAD_STSM = True


def wgmma_wgrad(a, dc, group_lens, trans_b=False, num_sms=None, cluster=None, stsm=None):
    """grouped_gemm_wgrad on Hopper (csrc/fp8_wgmma/grouped_wgrad.cu): dB [G, K, N] = per group a[rows]^T @ dc[rows]
    (trans_b: [G, N, K] = dc[rows]^T @ a[rows]); a group without rows gets zeros; the inputs checked first by the
    predicate below (ValueError with its reason). num_sms: CTAs at most (default: the GPU's SMs; tests use
    fewer); cluster: 1 or 2 (default WGRAD_CLUSTER); stsm: the epilogue by stmatrix (default WGRAD_STSM)."""
    _require(_wgmma_wgrad_can(a, dc, group_lens, trans_b), "wgmma_wgrad")
    return _wgrad(a, dc, group_lens, trans_b, num_sms, cluster, stsm)


def _wgrad(a, dc, group_lens, trans_b=False, num_sms=None, cluster=None, stsm=None):
    """wgmma_wgrad past its checks (the dispatcher's backend)."""
    from turbo_dist.kernels import gemm as gemm_kernels

    cluster = WGRAD_CLUSTER if cluster is None else cluster
    if cluster not in (1, 2):
        raise ValueError(f"wgmma_wgrad: cluster must be 1 or 2, got cluster={cluster}")
    x, y = (dc, a) if trans_b else (a, dc)
    M, P = x.shape
    Q, G = y.shape[1], group_lens.shape[0]
    out = torch.empty((G, P, Q), dtype=a.dtype, device=a.device)
    if G == 0 or P == 0 or Q == 0:
        return out
    if M == 0:
        return out.zero_()
    offs = group_offsets(group_lens, a.device)
    counter = tile_counter(a.device) if cluster == 1 else None  # cluster 1: the dynamic tile order
    with on_device(a.device):
        wgmma_module().grouped_wgrad(
            device=a.device.index, stream=torch.cuda.current_stream(a.device).cuda_stream, x=x.data_ptr(),
            y=y.data_ptr(), out=out.data_ptr(), offs=offs.data_ptr(), M=M, P=P, Q=Q, G=G, ldx=x.stride(0),
            ldy=y.stride(0), ldo=Q, out_group=P * Q,
            num_sms=gemm_kernels._num_sms(a.device) if num_sms is None else num_sms,
            counter=0 if counter is None else counter.data_ptr(), cluster=cluster,
            stsm=bool(WGRAD_STSM if stsm is None else stsm))
    return out


# Whether grouped_gemm_wgrad's rule runs this kernel, up to WGRAD_GROUP_ROWS rows per group on average. With the
# stmatrix epilogue it leads every backend on the probe's cases (G=32 fc1 / fc2 at 128 and 256 rows per expert,
# G=8 / 32 fc1 at 1024: 1.08-1.22x torch._grouped_mm, 1.03-1.18x our Triton kernel; probe_grouped_wgrad_stsm_h200
# .json). Before it (shuffle epilogue) it was at parity with torch's and behind the Triton kernel, so opt-in
# (probe_grouped_wgrad_tail_h200.json; ops_grouped_wgrad_h200.json: the backward 2-9% slower in the default).
WGRAD_PREFERRED = True
WGRAD_GROUP_ROWS = 1024


def wgrad_preferred(a, dc, group_lens, trans_b=False):
    return WGRAD_PREFERRED and _wgmma_wgrad_can(a, dc, group_lens, trans_b) is True


def _wgmma_wgrad_can(a, dc, group_lens, trans_b=False):
    why = _hopper_bf16("grouped_wgrad", a, dc, "a and dc")
    if why:
        return why
    if a.stride(1) != 1 or dc.stride(1) != 1:
        return "wgmma needs a and dc row-major"
    (M, K), N = a.shape, dc.shape[1]
    if K % 8 or N % 8 or a.stride(0) % 8 or dc.stride(0) % 8:
        return f"wgmma needs K, N and the row strides multiples of 8 elements, got K={K}, N={N}"
    if a.data_ptr() % 16 or dc.data_ptr() % 16:
        return "wgmma needs 16-byte aligned operands (TMA)"
    G = group_lens.shape[0]
    if max(M, K, N, G) >= 2 ** 31 or G * -(-K // 128) * -(-N // 128) >= 2 ** 31:
        return "wgmma needs M, N, K, G and the tile count below 2**31"
    return True


# Last in the default order; grouped_gemm's rule names it first where it fits (preferred above).
dispatcher.register_backend("grouped_gemm_wgrad", "wgmma", _wgrad, _wgmma_wgrad_can, priority=40)
dispatcher.register_backend("grouped_gemm", "wgmma", _grouped_bf16, _wgmma_grouped_can, priority=40)
