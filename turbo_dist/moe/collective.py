"""The `collective` transport: dispatch/combine over torch.distributed all_to_all (NCCL on GPU, gloo on CPU).

Works on any topology and is the correctness reference for the `nvlink` transport. Every payload
of a token (its rows of x, FP8 scales, rank-local top-k indices and weights, source index) travels
as one packed byte row, so a dispatch is one count all_gather plus one all_to_all_single; the
permutation into send order is fused into that packing gather, and the combine's unpermute is a
per-rank fp32 index_add (unique indices per rank: deterministic, summed in rank order).
The split sizes of all_to_all_single must be known on the host, so a non-cached dispatch reads
the counts back once (a cached dispatch and combine reuse the handle's splits: no host sync).
"""
import torch
import torch.distributed as dist

from .config import DispatchHandle
from .layout import token_positions

_ALIGN = 8  # byte columns are packed on 8-byte boundaries so every dtype view is aligned


def _columns(specs):
    """specs: list of (name, numel, dtype or None). Returns ({name: (start, end, dtype, numel)}, row_bytes)."""
    cols, off = {}, 0
    for name, numel, dtype in specs:
        if dtype is None or numel == 0:
            continue
        size = numel * torch.empty((), dtype=dtype).element_size()
        cols[name] = (off, off + size, dtype, numel)
        off += (size + _ALIGN - 1) // _ALIGN * _ALIGN
    return cols, max(off, _ALIGN)


def _pack(rows, cols, row_bytes, parts, device):
    """One uint8 [rows, row_bytes] tensor holding `parts[name]` ([rows, numel] tensors) at their columns."""
    buf = torch.empty(rows, row_bytes, dtype=torch.uint8, device=device)
    for name, (start, end, dtype, numel) in cols.items():
        buf[:, start:end].copy_(parts[name].reshape(rows, numel).contiguous().view(torch.uint8).view(rows, end - start))
    return buf


def _unpack(buf, cols, name):
    start, end, dtype, numel = cols[name]
    rows = buf.size(0)
    return buf[:, start:end].contiguous().view(dtype).view(rows, numel)


def staged(rt, t):
    """Shared-GPU test mode (`Runtime.shares_gpu`: gloo between processes sharing a GPU, and gloo takes no CUDA
    tensors in all_to_all / all_gather): the MoE collectives then run on host copies. Never in production."""
    return rt.shares_gpu and t.is_cuda


def all_to_all_rows(send, send_counts, recv_counts, group, size, host=False):
    """all_to_all_single of rows with host-side split sizes over `group` (`size` ranks); host=True: through host
    copies (see `staged`)."""
    recv = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
    if size == 1:
        recv.copy_(send)
    elif host:
        out = recv.cpu()
        dist.all_to_all_single(out, send.cpu(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=group)
        recv.copy_(out)
    else:
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return recv


def gather_rows(rt, row):
    """[world, n]: every rank's `row` (all_gather over the runtime's group; host copies when `staged`)."""
    if rt.world_size == 1:
        return row.view(1, -1)
    src = row.cpu() if staged(rt, row) else row
    parts = [torch.empty_like(src) for _ in range(rt.world_size)]
    dist.all_gather(parts, src, group=rt.group)
    return torch.stack(parts).to(row.device)


def _all_to_all(rt, send, send_counts, recv_counts, row_bytes):
    return all_to_all_rows(send, send_counts, recv_counts, rt.group, rt.world_size, staged(rt, send))


def exchange_counts(rt, num_tokens_per_rank, num_tokens_per_expert):
    """All ranks' per-rank counts and the per-expert counts of our experts: one all_gather, one host read.

    Returns (num_tokens_matrix [R, R] int32 on device, matrix as nested list, expert counts of our
    local experts summed over sources as a list).
    """
    world = rt.world_size
    local_experts = num_tokens_per_expert.numel() // world
    row = torch.cat([num_tokens_per_rank.to(torch.int32), num_tokens_per_expert.to(torch.int32)])
    gathered = gather_rows(rt, row)
    matrix = gathered[:, :world].contiguous()
    lo = world + rt.rank * local_experts
    expert_recv = gathered[:, lo:lo + local_experts].sum(0)
    host = torch.cat([matrix.flatten(), expert_recv]).tolist()  # the one host sync of a dispatch
    matrix_host = [host[i * world:(i + 1) * world] for i in range(world)]
    return matrix, matrix_host, host[world * world:]


def send_order(is_token_in_rank, send_head, send_offsets, num_send):
    """send_token_idx [num_send] int64: tokens in send order (destination rank, then token index)."""
    num_tokens, world = is_token_in_rank.shape
    device = is_token_in_rank.device
    pos = torch.where(is_token_in_rank, send_offsets.view(1, -1).to(torch.int64) + send_head.to(torch.int64),
                      torch.full((num_tokens, world), num_send, dtype=torch.int64, device=device))
    tokens = torch.arange(num_tokens, dtype=torch.int64, device=device).view(-1, 1).expand(num_tokens, world)
    order = torch.zeros(num_send + 1, dtype=torch.int64, device=device)
    order.scatter_(0, pos.flatten(), tokens.flatten())  # the dump slot [num_send] absorbs unsent pairs
    return order[:num_send]


def dispatch(rt, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
             num_worst_tokens):
    """Non-cached dispatch. Returns (recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
    recv_expert_counts (list, unaligned), handle)."""
    world, rank, device = rt.world_size, rt.rank, x.device
    num_tokens, hidden = x.shape
    local_experts = num_tokens_per_expert.numel() // world
    matrix, matrix_host, expert_counts = exchange_counts(rt, num_tokens_per_rank, num_tokens_per_expert)
    send_counts = matrix_host[rank]
    recv_counts = [matrix_host[s][rank] for s in range(world)]
    num_send, num_recv = sum(send_counts), sum(recv_counts)
    _check_worst(num_worst_tokens, matrix_host)

    send_head = token_positions(is_token_in_rank)
    send_offsets = (torch.cumsum(matrix[rank], 0, dtype=torch.int32) - matrix[rank]).contiguous()
    send_idx = send_order(is_token_in_rank, send_head, send_offsets, num_send)
    dest = torch.repeat_interleave(torch.arange(world, device=device), matrix[rank], output_size=num_send)

    specs = [("topk_idx", topk_idx.size(1) if topk_idx is not None else 0, torch.int64),
             ("x", hidden, x.dtype),
             ("scales", x_scales.size(1) if x_scales is not None else 0, torch.float32),
             ("topk_weights", topk_weights.size(1) if topk_weights is not None else 0, torch.float32),
             ("src_idx", 1, torch.int32)]
    cols, row_bytes = _columns(specs)
    parts = {"x": x.index_select(0, send_idx), "src_idx": send_idx.to(torch.int32)}
    if x_scales is not None:
        parts["scales"] = x_scales.index_select(0, send_idx)
    if topk_idx is not None:
        rows_idx = topk_idx.index_select(0, send_idx)
        lo = (dest * local_experts).view(-1, 1)
        local = (rows_idx >= lo) & (rows_idx < lo + local_experts)
        parts["topk_idx"] = torch.where(local, rows_idx - lo, torch.full_like(rows_idx, -1))
        if topk_weights is not None:
            w = topk_weights.index_select(0, send_idx).to(torch.float32)
            parts["topk_weights"] = torch.where(local, w, torch.zeros_like(w))
    send = _pack(num_send, cols, row_bytes, parts, device)
    recv = _all_to_all(rt, send, send_counts, recv_counts, row_bytes)

    rows = num_worst_tokens or num_recv
    recv_x = _pad(_unpack(recv, cols, "x"), rows, 0)
    recv_scales = _pad(_unpack(recv, cols, "scales"), rows, 0) if x_scales is not None else None
    recv_topk_idx = _pad(_unpack(recv, cols, "topk_idx"), rows, -1) if topk_idx is not None else None
    recv_topk_weights = _pad(_unpack(recv, cols, "topk_weights"), rows, 0) \
        if (topk_idx is not None and topk_weights is not None) else None
    recv_src_idx = _pad(_unpack(recv, cols, "src_idx").view(-1), rows, -1)

    rank_prefix_matrix = torch.cumsum(matrix, 0, dtype=torch.int32)
    handle = DispatchHandle(
        (rank_prefix_matrix, matrix, send_offsets, recv_src_idx, is_token_in_rank, send_head),
        num_recv_tokens=num_recv, num_worst_tokens=num_worst_tokens, num_tokens=num_tokens,
        send_counts=send_counts, recv_counts=recv_counts, send_token_idx=send_idx,
        max_recv_tokens=max(sum(matrix_host[s][r] for s in range(world)) for r in range(world)),
        max_send_tokens=max(sum(r) for r in matrix_host), transport="collective",
    )
    return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, expert_counts, handle


def cached_dispatch(rt, x, x_scales, handle):
    """Dispatch with a handle from an earlier dispatch: same routing, new payload, no count exchange."""
    send_idx = _send_token_idx(handle)
    hidden = x.size(1)
    specs = [("x", hidden, x.dtype), ("scales", x_scales.size(1) if x_scales is not None else 0, torch.float32)]
    cols, row_bytes = _columns(specs)
    parts = {"x": x.index_select(0, send_idx)}
    if x_scales is not None:
        parts["scales"] = x_scales.index_select(0, send_idx)
    send = _pack(send_idx.numel(), cols, row_bytes, parts, x.device)
    recv = _all_to_all(rt, send, handle.send_counts, handle.recv_counts, row_bytes)
    rows = handle.num_worst_tokens or handle.num_recv_tokens
    recv_x = _pad(_unpack(recv, cols, "x"), rows, 0)
    recv_scales = _pad(_unpack(recv, cols, "scales"), rows, 0) if x_scales is not None else None
    return recv_x, recv_scales


def combine(rt, x, topk_weights, handle, bias=()):
    """Send every received row back to its source and sum per token in fp32 (rank order), cast to x.dtype.

    bias: tensors [num_tokens, hidden] added (in fp32, after the sum) to the result, DeepEP's `bias`.
    Returns (combined_x [num_tokens, hidden], combined_topk_weights [num_tokens, num_topk] fp32 or None).
    """
    num_recv = handle.num_recv_tokens
    x = x[:num_recv]
    hidden = x.size(1)
    specs = [("x", hidden, x.dtype),
             ("topk_weights", topk_weights.size(1) if topk_weights is not None else 0, torch.float32)]
    cols, row_bytes = _columns(specs)
    parts = {"x": x}
    if topk_weights is not None:
        parts["topk_weights"] = topk_weights[:num_recv].to(torch.float32)
    send = _pack(num_recv, cols, row_bytes, parts, x.device)
    back = _all_to_all(rt, send, handle.recv_counts, handle.send_counts, row_bytes)
    send_idx = _send_token_idx(handle)
    num_tokens = handle.num_tokens
    out = reduce_rows(_unpack(back, cols, "x"), send_idx, handle.send_counts, num_tokens, x.dtype, bias)
    out_w = None
    if topk_weights is not None:
        out_w = reduce_rows(_unpack(back, cols, "topk_weights"), send_idx, handle.send_counts, num_tokens,
                            torch.float32)
    return out, out_w


def reduce_rows(rows, send_idx, send_counts, num_tokens, out_dtype, bias=()):
    """out[t] = sum over ranks r (in order) of the row token t got back from r (+ bias), accumulated in fp32."""
    acc = torch.zeros(num_tokens, rows.size(1), dtype=torch.float32, device=rows.device)
    start = 0
    for count in send_counts:
        if count:
            acc.index_add_(0, send_idx[start:start + count], rows[start:start + count].to(torch.float32))
        start += count
    for b in bias:
        acc += b.to(torch.float32)
    return acc.to(out_dtype)


def _send_token_idx(handle):
    idx = getattr(handle, "send_token_idx", None)
    if idx is None:  # a handle made by the nvlink transport: rebuild the send order from its send_head
        num_send = sum(handle.send_counts)
        idx = send_order(handle.is_token_in_rank, handle.send_head, handle.send_offsets, num_send)
        handle.send_token_idx = idx
    return idx


def _pad(t, rows, fill):
    if t.size(0) == rows:
        return t
    out = torch.full((rows,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[:t.size(0)] = t
    return out


def _check_worst(num_worst_tokens, matrix_host):
    """Every rank checks every rank's receive count (matrix_host[s][r]: tokens s sends r, the same on all ranks), so
    all raise together instead of one raising while the others block in the exchange."""
    if not num_worst_tokens:
        return
    recv = [sum(row[r] for row in matrix_host) for r in range(len(matrix_host))]
    worst = max(range(len(recv)), key=recv.__getitem__)
    if recv[worst] > num_worst_tokens:
        raise ValueError(f"num_worst_tokens={num_worst_tokens} is smaller than the {recv[worst]} tokens rank {worst} "
                         "receives; pass at least num_ranks * num_tokens")


class CollectiveTransport:
    """Transport object the Buffer drives (same methods as nvlink.NvlinkTransport)."""

    name = "collective"

    def __init__(self, rt):
        self.rt = rt

    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, num_worst_tokens, config):
        return dispatch(self.rt, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                        num_tokens_per_expert, num_worst_tokens)

    def cached_dispatch(self, x, x_scales, handle, config):
        return cached_dispatch(self.rt, x, x_scales, handle)

    def combine(self, x, topk_weights, bias, handle, config):
        return combine(self.rt, x, topk_weights, handle, bias)

    def check_error(self):
        pass
