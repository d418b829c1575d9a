"""Differentiable dispatch and combine: the backward of a dispatch is a combine and vice versa."""
import torch

from turbo_dist.ops._autograd import first_order_only

from .config import DispatchHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, topk_weights, topk_idx, num_experts, expert_alignment, num_worst_tokens, config):
        n_rank, _, n_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens, config=config)
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.x_dtype, ctx.has_weights, ctx.recv_shape = x.dtype, topk_weights is not None, tuple(recv_x.shape)
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    @first_order_only("turbo_dist.moe dispatch / combine")
    def backward(ctx, grad_recv_x, grad_recv_idx, grad_recv_w, grad_counts, grad_handle):
        (recv_idx,) = ctx.saved_tensors
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(ctx.recv_shape, dtype=ctx.x_dtype, device=recv_idx.device)
        grad_recv_x = grad_recv_x.to(ctx.x_dtype).contiguous()
        weights = None
        if ctx.has_weights and ctx.needs_input_grad[2]:
            # Slots of experts on other ranks were zeros made here, not copies: their gradient stops.
            g = grad_recv_w if grad_recv_w is not None else torch.zeros(recv_idx.shape, dtype=torch.float32,
                                                                        device=recv_idx.device)
            weights = torch.where(recv_idx >= 0, g.to(torch.float32), torch.zeros((), device=g.device)).contiguous()
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x, ctx.handle, topk_weights=weights)
        return None, grad_x, grad_w, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, handle, config):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(x, handle, config=config)
        return combined

    @staticmethod
    @first_order_only("turbo_dist.moe dispatch / combine")
    def backward(ctx, grad):
        grad_x, _, _, _, _, _ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return None, grad_x, None, None


def dispatch(buffer, x, topk_idx, topk_weights=None, num_experts=None, expert_alignment=1, num_worst_tokens=0,
             config=None):
    """Differentiable `buffer.dispatch` (layout computed inside).

    x: [num_tokens, hidden] bf16/fp16/fp32 (FP8 tuples are not differentiable: use Buffer.dispatch).
    topk_idx: [num_tokens, num_topk] int64; topk_weights: [num_tokens, num_topk] fp32 (gets gradients).
    Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle).
    Backward: grad_x = combine(grad_recv_x); grad_topk_weights = combine of the weights' gradients.
    """
    if isinstance(x, (tuple, list)):
        raise NotImplementedError("turbo_dist.moe.dispatch (autograd) takes a bf16/fp16/fp32 x, not an FP8 tuple")
    _check_buffer(buffer, "dispatch")
    if not isinstance(x, torch.Tensor) or not isinstance(topk_idx, torch.Tensor):
        raise TypeError(f"dispatch takes tensors x and topk_idx, got {type(x).__name__} and {type(topk_idx).__name__}")
    if num_experts is None:
        raise ValueError("dispatch needs num_experts")
    return _Dispatch.apply(buffer, x, topk_weights, topk_idx, num_experts, expert_alignment, num_worst_tokens,
                           config)


def combine(buffer, x, handle, config=None):
    """Differentiable `buffer.combine` (weights not applied). Backward: a cached dispatch of the gradient."""
    _check_buffer(buffer, "combine")
    if not isinstance(handle, DispatchHandle):
        raise TypeError("combine needs the handle dispatch returned")
    return _Combine.apply(buffer, x, handle, config)


def _check_buffer(buffer, what):
    from .buffer import Buffer

    if not isinstance(buffer, Buffer):
        raise TypeError(f"turbo_dist.moe.{what} takes a turbo_dist.moe.Buffer first, got {type(buffer).__name__}")
