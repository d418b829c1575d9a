"""MoE token dispatch/combine with DeepEP's API (normal, internode and low-latency modes).

    from turbo_dist.moe import Buffer, Config, EventOverlap     # instead of `from deep_ep import ...`
    buf = Buffer(group, num_nvl_bytes=Buffer.get_nvl_buffer_size_hint(4096, 7168, group.size()))
    n_rank, _, n_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, num_tokens_per_rank=n_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=topk_idx, topk_weights=w)
    y, _, _ = buf.combine(expert_out, handle)

Autograd: `dispatch`/`combine` (each one's backward is the other), and `TokenDispatcher`, which
hands experts their tokens grouped by local expert (ready for turbo_dist.ops.grouped_gemm).
"""
import torch

from ..runtime import EventOverlap
from .autograd import combine, dispatch
from .buffer import Buffer
from .config import Config, DispatchHandle
from .layout import dispatch_layout
from .token_dispatcher import TokenDispatcher

topk_idx_t = torch.int64  # DeepEP's `from deep_ep_cpp import topk_idx_t`: the dtype topk_idx must have

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "dispatch", "combine", "TokenDispatcher",
           "dispatch_layout", "topk_idx_t"]
