"""TokenDispatcher: router output in, expert inputs grouped by local expert out (for grouped GEMM), and back."""
import torch

from .autograd import combine as _combine
from .autograd import dispatch as _dispatch
from .buffer import Buffer
from .layout import align_up


class TokenDispatcher:
    """Moves tokens to the ranks of their experts and back, differentiably.

        td = TokenDispatcher(num_experts, group)
        expert_in, tokens_per_expert = td.dispatch(hidden [T, H], topk_idx [T, k] int64, topk_weights [T, k] fp32)
        expert_out = grouped_gemm(expert_in, w, tokens_per_expert)          # rows grouped by local expert
        y = td.combine(expert_out)                                           # [T, H], weighted by topk_weights

    `expert_in` holds one row per (received token, local expert it chose), experts in order, each group
    padded with zero rows to a multiple of `expert_alignment`; `tokens_per_expert` (python list
    [num_local_experts]) gives the padded group sizes. `combine` multiplies each row by its routing
    weight, sums a token's rows on this rank (fp32) and combines over ranks. Gradients flow to hidden,
    topk_weights and the expert outputs. One dispatch/combine pair at a time per dispatcher.

    num_nvl_bytes (nvlink transport): `Buffer.get_nvl_buffer_size_hint(max_tokens_per_rank, width, num_ranks,
    num_topk, dtype=...)` with `width` the wider of hidden_states and expert_output (combine moves
    expert_output rows; their gradients go back through a cached dispatch), dtype hidden_states' (the combine
    sends in it too).
    """

    def __init__(self, num_experts, group=None, buffer=None, num_nvl_bytes=0, expert_alignment=1, transport=None):
        if buffer is not None:
            if not isinstance(buffer, Buffer):
                raise TypeError(f"buffer must be a turbo_dist.moe.Buffer, got {type(buffer).__name__}")
            if group is not None and group is not buffer.group:
                raise ValueError("TokenDispatcher: `group` is not the process group of `buffer`; pass one of them "
                                 "(the buffer's group is used)")
            if num_nvl_bytes or transport is not None:
                raise ValueError("TokenDispatcher: num_nvl_bytes / transport configure a Buffer this dispatcher "
                                 "creates; with `buffer=` given, set them on that Buffer instead")
        self.buffer = buffer if buffer is not None else Buffer(group, num_nvl_bytes, transport=transport)
        world = self.buffer.group_size
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % world:
            raise ValueError(f"num_experts={num_experts!r} must be a positive multiple of the group size {world}")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // world
        self.expert_alignment = expert_alignment
        self._state = None

    def dispatch(self, hidden_states, topk_idx, topk_weights):
        for name, t in (("hidden_states", hidden_states), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TokenDispatcher.dispatch: {name} must be a tensor, got {type(t).__name__}")
        if hidden_states.dim() != 2:
            raise ValueError(f"hidden_states must be [num_tokens, hidden], got {tuple(hidden_states.shape)}")
        if topk_weights is None or topk_weights.shape != topk_idx.shape:
            raise ValueError("topk_weights must have topk_idx's shape [num_tokens, num_topk]")
        recv_x, recv_idx, recv_w, counts, handle = _dispatch(
            self.buffer, hidden_states, topk_idx, topk_weights.to(torch.float32), num_experts=self.num_experts)
        num_recv, k = recv_idx.shape
        local_e = self.num_local_experts
        flat = recv_idx.reshape(-1)
        key = torch.where(flat >= 0, flat, torch.full_like(flat, local_e))
        total = int(sum(counts))  # exact counts (alignment 1 in the dispatch): a host value already
        order = torch.sort(key, stable=True).indices[:total]
        rows = torch.div(order, k, rounding_mode="floor")
        probs = recv_w.reshape(-1).index_select(0, order)
        expert_in = recv_x.index_select(0, rows)
        padded = [align_up(c, self.expert_alignment) for c in counts]
        dest = None
        if padded != list(counts):
            dest = _padded_positions(counts, padded, recv_x.device)
            out = torch.zeros(sum(padded), recv_x.size(1), dtype=recv_x.dtype, device=recv_x.device)
            expert_in = out.index_copy(0, dest, expert_in)
        self._state = (handle, rows, probs, dest, num_recv, recv_x.dtype, expert_in.size(0))
        return expert_in, padded

    def combine(self, expert_output):
        if self._state is None:
            raise RuntimeError("TokenDispatcher.combine called before dispatch")
        handle, rows, probs, dest, num_recv, dtype, expect = self._state
        if not isinstance(expert_output, torch.Tensor) or expert_output.dim() != 2 or expert_output.size(0) != expect:
            shape = tuple(expert_output.shape) if isinstance(expert_output, torch.Tensor) else type(expert_output)
            raise ValueError(f"expert_output must be [{expect}, width] (the rows dispatch handed out, padding "
                             f"included), got {shape}")
        self._state = None  # only once the call is valid: a refused call can be retried
        y = expert_output if dest is None else expert_output.index_select(0, dest)
        weighted = y.to(torch.float32) * probs.view(-1, 1)
        per_token = torch.zeros(num_recv, y.size(1), dtype=torch.float32, device=y.device).index_add(0, rows, weighted)
        return _combine(self.buffer, per_token.to(dtype), handle)


def _padded_positions(counts, padded, device):
    starts, pos = 0, []
    for c, p in zip(counts, padded):
        pos.append(torch.arange(starts, starts + c, device=device))
        starts += p
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64, device=device)
