"""Dispatch layout: which rank and expert every token goes to, computed on the device without a host sync.

Experts are split evenly over ranks: rank r owns experts [r * E / R, (r + 1) * E / R).
"""
import torch

from ..kernels import moe_layout


def check_topk_idx(topk_idx, num_experts, num_ranks, name="topk_idx"):
    """Validate `topk_idx: [num_tokens, num_topk] int64` against `num_experts` split over `num_ranks`."""
    if not isinstance(topk_idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [num_tokens, num_topk] int64, got {type(topk_idx).__name__}")
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {topk_idx.dtype}")
    if topk_idx.dim() != 2:
        raise ValueError(f"{name} must be [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} is not divisible by the number of ranks {num_ranks}")
    # A value check needs the data on the host: free on CPU, a sync on GPU (skipped there: the hot path).
    if topk_idx.device.type == "cpu" and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{name} values must lie in [-1, {num_experts}); found range [{lo}, {hi}]")


def dispatch_layout(topk_idx, num_experts, num_ranks):
    """Layout of a dispatch, all on `topk_idx.device`, no host synchronisation.

    topk_idx: [num_tokens, num_topk] int64, -1 for an unused slot.
    Returns (num_tokens_per_rank [num_ranks] int32, num_tokens_per_expert [num_experts] int32,
    is_token_in_rank [num_tokens, num_ranks] bool). A token counts once per rank however many of
    that rank's experts it selected, and once per (token, expert) slot for the expert counts.
    CUDA: one Triton kernel (kernels/moe_layout.py); elsewhere the torch ops of dispatch_layout_torch.
    """
    if topk_idx.is_cuda:
        return moe_layout.dispatch_layout(topk_idx, num_experts, num_ranks)
    return dispatch_layout_torch(topk_idx, num_experts, num_ranks)


def dispatch_layout_torch(topk_idx, num_experts, num_ranks):
    """dispatch_layout in torch ops (the CPU path and the kernel's reference)."""
    num_tokens = topk_idx.size(0)
    device = topk_idx.device
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    # Route -1 to an overflow bin that is dropped afterwards: keeps shapes static (no nonzero/masked_select).
    expert_bin = torch.where(valid, topk_idx, torch.full_like(topk_idx, num_experts)).flatten()
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, expert_bin, torch.ones_like(expert_bin, dtype=torch.int32))
    num_tokens_per_expert = counts[:num_experts].contiguous()

    rank_bin = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)
    in_rank.scatter_(1, rank_bin, True)
    is_token_in_rank = in_rank[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def token_positions(is_token_in_rank):
    """send_head: [num_tokens, num_ranks] int32, the index of each token among those sent to that rank, -1 if not sent.

    Senders keep token order, so this is also the row of the token inside its block at the receiver.
    """
    flags = is_token_in_rank.to(torch.int32)
    pos = torch.cumsum(flags, dim=0, dtype=torch.int32) - 1
    return torch.where(is_token_in_rank, pos, torch.full_like(pos, -1))


def localize_topk(topk_idx, topk_weights, rank, experts_per_rank):
    """topk as seen by `rank`: expert ids made local to it, -1 (weight 0) where the expert lives elsewhere."""
    lo = rank * experts_per_rank
    local = (topk_idx >= lo) & (topk_idx < lo + experts_per_rank)
    idx = torch.where(local, topk_idx - lo, torch.full_like(topk_idx, -1))
    weights = None
    if topk_weights is not None:
        weights = torch.where(local, topk_weights, torch.zeros_like(topk_weights))
    return idx, weights


def align_up(n, alignment):
    return (n + alignment - 1) // alignment * alignment
