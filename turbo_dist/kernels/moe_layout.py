"""Triton kernel of the MoE dispatch layout (DeepEP's get_dispatch_layout): one launch instead of ~15 torch ops.

moe/layout.dispatch_layout (torch ops) is the reference and the CPU path; on CUDA it calls `dispatch_layout`
here. Program p takes BLOCK_T tokens: their expert ids [BLOCK_T, K] give is_token_in_rank (a token counts once
per rank however many of its experts live there), the per-rank counts of the block (one atomic add per rank)
and the per-expert counts (one atomic add per (token, k) slot). Integer atomics: the counts do not depend on
the order programs run in.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _dispatch_layout_kernel(idx_ptr, per_rank_ptr, per_expert_ptr, in_rank_ptr, T, E, experts_per_rank,
                            K: tl.constexpr, K_POW2: tl.constexpr, R: tl.constexpr, R_POW2: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.arange(0, K_POW2)
    r = tl.arange(0, R_POW2)
    tm = t < T
    idx = tl.load(idx_ptr + t[:, None].to(tl.int64) * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :], other=-1)
    valid = (idx >= 0) & (idx < E)  # ids past the experts (unchecked on the GPU: a host read) never index memory
    tl.atomic_add(per_expert_ptr + tl.where(valid, idx, 0), tl.full([BLOCK_T, K_POW2], 1, tl.int32), mask=valid)
    rank = tl.where(valid, idx // experts_per_rank, -1)
    hit = tl.max((rank[:, :, None] == r[None, None, :]).to(tl.int32), 1)  # [BLOCK_T, R_POW2]
    rm = r < R
    tl.store(in_rank_ptr + t[:, None].to(tl.int64) * R + r[None, :], hit.to(tl.int1), mask=tm[:, None] & rm[None, :])
    tl.atomic_add(per_rank_ptr + r, tl.sum(hit, 0), mask=rm)


def dispatch_layout(topk_idx, num_experts, num_ranks):
    """(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool) of
    topk_idx [T, K] int64 (-1: none), experts split evenly over the ranks; what moe/layout.dispatch_layout
    gives. Two launches (the zeroed counts, the kernel), no host sync."""
    t, k = topk_idx.shape
    dev = topk_idx.device
    counts = torch.zeros(num_ranks + num_experts, dtype=torch.int32, device=dev)
    per_rank, per_expert = counts[:num_ranks], counts[num_ranks:]
    in_rank = torch.empty(t, num_ranks, dtype=torch.bool, device=dev)
    if t == 0 or k == 0:
        return per_rank, per_expert, in_rank.zero_()
    k_pow2, r_pow2 = triton.next_power_of_2(k), triton.next_power_of_2(num_ranks)
    block_t = max(1, min(128, 8192 // (k_pow2 * r_pow2)))
    _dispatch_layout_kernel[(triton.cdiv(t, block_t),)](
        topk_idx.contiguous(), per_rank, per_expert, in_rank, t, num_experts, num_experts // num_ranks,
        K=k, K_POW2=k_pow2, R=num_ranks, R_POW2=r_pow2, BLOCK_T=block_t, num_warps=4)
    return per_rank, per_expert, in_rank
