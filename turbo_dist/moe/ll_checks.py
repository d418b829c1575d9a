"""Validation of the low-latency calls (moe/low_latency.py), raising before anything is launched, and the handle
low_latency_dispatch passes to low_latency_combine."""
import torch

from ..kernels import moe_ll_logfmt
from .layout import check_topk_idx

PAYLOAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class LowLatencyHandle(tuple):
    """What low_latency_dispatch returns for low_latency_combine: DeepEP's 5-tuple
    (src_info [E_l, R * M] int32, layout_range [E_l, R] int64, num_max_dispatch_tokens_per_rank, hidden,
    num_experts). Attributes: dst [R * M, K] int64 (where each (source, token, k) sits in recv_x),
    num_tokens (this rank's T), num_topk, path."""

    def __new__(cls, fields, **attrs):
        obj = super().__new__(cls, fields)
        obj.__dict__.update(attrs)
        return obj


def describe(t):
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def check_dispatch(ll, x, topk_idx, num_max, num_experts, stats, wait_stats, use_fp8, round_scale, use_ue8m0):
    """low_latency_dispatch's arguments (ll: the LowLatency engine)."""
    rt = ll.rt
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"low_latency_dispatch x must be a [num_tokens, hidden] tensor, got {describe(x)}")
    if x.dtype not in PAYLOAD_DTYPES:
        raise TypeError(f"low_latency_dispatch x must be bf16 (or fp16/fp32), got {x.dtype}")
    rt.check_tensor(x, "x")
    check_topk_idx(topk_idx, num_experts, rt.world_size)
    rt.check_tensor(topk_idx, "topk_idx")
    if topk_idx.size(0) != x.size(0) or topk_idx.size(1) == 0:
        raise ValueError(f"topk_idx must be [{x.size(0)}, num_topk >= 1], got {tuple(topk_idx.shape)}")
    if not isinstance(num_max, int) or num_max <= 0:
        raise ValueError(f"num_max_dispatch_tokens_per_rank must be a positive int, got {num_max!r}")
    if x.size(0) > num_max:
        raise ValueError(f"x has {x.size(0)} tokens, more than num_max_dispatch_tokens_per_rank={num_max}")
    if use_fp8 and x.size(1) % 128:
        raise ValueError(f"use_fp8 needs hidden divisible by 128, got {x.size(1)}")
    if round_scale and not use_fp8:
        raise ValueError("round_scale needs use_fp8=True")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale=True (DeepEP's rule)")
    if use_ue8m0 and x.size(1) % 512:
        raise ValueError(f"use_ue8m0 packs 4 scales per int32: hidden must be divisible by 512, got {x.size(1)}")
    e_l = num_experts // rt.world_size
    if stats is not None:
        strided = isinstance(stats, torch.Tensor) and not stats.is_contiguous()  # the kernels add at stats_ptr + e
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32 or stats.shape != (e_l,) or strided:
            raise ValueError(f"cumulative_local_expert_recv_stats must be a contiguous int32 [{e_l}], got "
                             f"{describe(stats)}{' (strided)' if strided else ''}")
        rt.check_tensor(stats, "cumulative_local_expert_recv_stats")
    if wait_stats is not None:
        check_wait_stats(ll, wait_stats, "dispatch_wait_recv_cost_stats", use_fp8 or x.element_size() <= 2)


def check_combine(ll, x, topk_idx, topk_weights, handle, use_logfmt, out, wait_stats=None):
    """low_latency_combine's arguments."""
    rt = ll.rt
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError("low_latency_combine needs the handle low_latency_dispatch returned")
    if use_logfmt:
        if ll.path != "triton" or not isinstance(x, torch.Tensor) or x.element_size() > 2:
            raise NotImplementedError("use_logfmt (10-bit LogFMT rows, kernels/moe_ll_logfmt.py) needs the triton "
                                      "low-latency path with a bf16/fp16 x; this call runs the collective path")
        if handle[3] % moe_ll_logfmt.GROUP:
            raise ValueError(f"use_logfmt needs hidden divisible by {moe_ll_logfmt.GROUP}, got {handle[3]}")
    num_max, hidden, num_experts = handle[2], handle[3], handle[4]
    e_l, n = num_experts // rt.world_size, num_max * rt.world_size
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (e_l, n, hidden):
        raise ValueError(f"low_latency_combine x must be [{e_l}, {n}, {hidden}], got {describe(x)}")
    if x.dtype not in PAYLOAD_DTYPES:
        raise TypeError(f"low_latency_combine x must be bf16 (or fp16/fp32), got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("low_latency_combine x must be contiguous")
    rt.check_tensor(x, "x")
    check_topk_idx(topk_idx, num_experts, rt.world_size)
    if tuple(topk_idx.shape) != (handle.num_tokens, handle.num_topk):
        raise ValueError(f"topk_idx must be [{handle.num_tokens}, {handle.num_topk}] as dispatched, got "
                         f"{tuple(topk_idx.shape)}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape or \
            topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32 {tuple(topk_idx.shape)}, got {describe(topk_weights)}")
    rt.check_tensor(topk_idx, "topk_idx")
    rt.check_tensor(topk_weights, "topk_weights")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (handle.num_tokens, hidden) or \
                out.dtype != x.dtype:
            raise ValueError(f"out must be {x.dtype} [{handle.num_tokens}, {hidden}], got {describe(out)}")
        rt.check_tensor(out, "out")
    if wait_stats is not None:
        check_wait_stats(ll, wait_stats, "combine_wait_recv_cost_stats", x.element_size() <= 2)


def check_wait_stats(ll, wait_stats, name, triton_payload):
    """dispatch_ / combine_wait_recv_cost_stats: the triton path's wait kernel fills them."""
    rt = ll.rt
    if ll.path != "triton" or not triton_payload:
        raise NotImplementedError(f"{name} needs the triton low-latency path (a wait per source rank); this call "
                                  "runs the collective path, which has none")
    if not isinstance(wait_stats, torch.Tensor) or wait_stats.dtype != torch.int64 or \
            not wait_stats.is_contiguous() or wait_stats.numel() < rt.world_size:
        raise ValueError(f"{name} must be a contiguous int64 tensor of at least {rt.world_size} elements "
                         f"([num_ranks] or DeepEP's [num_ranks, num_ranks]), got {describe(wait_stats)}")
    rt.check_tensor(wait_stats, name)


def check_shrink(ll):
    """The rank mask calls need a Buffer(enable_shrink=True)."""
    if ll.mask is None:
        raise RuntimeError("the low-latency rank mask needs Buffer(..., low_latency_mode=True, enable_shrink=True)")


def check_mask_rank(ll, rank_to_mask):
    """low_latency_update_mask_buffer's rank: another rank of the group, on a Buffer(enable_shrink=True)."""
    check_shrink(ll)
    if not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < ll.rt.world_size:
        raise ValueError(f"rank_to_mask must be a rank of the group, in [0, {ll.rt.world_size}), got {rank_to_mask!r}")
    if rank_to_mask == ll.rt.rank:
        raise ValueError(f"rank {rank_to_mask} cannot mask itself")
