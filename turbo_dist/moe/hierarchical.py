"""The `hierarchical` transport (DeepEP's internode / `num_rdma_bytes` mode): two hops instead of one.

Ranks form `num_nodes` x `local_world_size` (runtime topology; TURBO_DIST_RANKS_PER_NODE=2 makes 4 ranks act
as 2 nodes x 2). Rank (n, l) = n * L + l. A dispatch sends each token once to every node that owns one of
its experts, to the rank with the same local index there (the "rail" hop, the RDMA side: collectives on
the rail subgroup {(n, l) for every n}); that rank forwards it inside its node to the ranks owning its
experts (the NVLink side: collectives on the node subgroup). A combine goes back the same way: each
forwarder sums (fp32) the rows its node's ranks return for a token, sends that one row across nodes,
and the source sums the per-node rows (fp32), then casts.

Results are the flat `collective` transport's: same rows in the same order (by source rank, then token
index), same received top-k, counts and handle fields; the combine's sum is grouped by node first, so
it matches the flat one bit for bit whenever the fp32 partial sums are exact (and to rounding otherwise).
Split sizes need host-side counts: one count all_gather (and one host read) per non-cached dispatch, as in
the collective transport; cached dispatch and combine reuse the handle.
"""
import logging

import torch
import torch.distributed as dist

from turbo_dist.ops._host import device_ints

from .collective import _check_worst, _columns, _pad, _pack, _unpack, all_to_all_rows, gather_rows, send_order, staged
from .config import DispatchHandle
from .layout import localize_topk, token_positions

log = logging.getLogger("turbo_dist")

_GROUPS = {}


def rdma_layout(is_token_in_rank, num_nodes):
    """num_tokens_per_rdma_rank [num_nodes] int32 and is_token_in_node [T, num_nodes] bool (device, no sync)."""
    t, r = is_token_in_rank.shape
    in_node = is_token_in_rank.reshape(t, num_nodes, r // num_nodes).any(2)
    return in_node.sum(0, dtype=torch.int32), in_node


def subgroups(rt):
    """(rail group: same local index on every node, node group: the ranks of this node), made once per runtime.

    Collective: every rank of the runtime's group creates every subgroup in the same order.
    """
    key = (id(rt.group), rt.local_world_size)
    cached = _GROUPS.get(key)
    if cached is not None and cached[0] is rt.group:
        return cached[1], cached[2]
    ranks = dist.get_process_group_ranks(rt.group)
    n_nodes, lws = rt.num_nodes, rt.local_world_size
    rail = node = None
    for lr in range(lws):
        g = dist.new_group([ranks[n * lws + lr] for n in range(n_nodes)])
        if lr == rt.local_rank:
            rail = g
    for n in range(n_nodes):
        g = dist.new_group([ranks[n * lws + lr] for lr in range(lws)])
        if n == rt.node_rank:
            node = g
    _GROUPS[key] = (rt.group, rail, node)
    return rail, node


def _a2a(rt, send, send_counts, recv_counts, group, size):
    return all_to_all_rows(send, send_counts, recv_counts, group, size, staged(rt, send))


def _blocks(counts):
    """Start offsets of consecutive blocks of the given sizes."""
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts


class HierarchicalTransport:
    """Transport object the Buffer drives (same methods as collective.CollectiveTransport)."""

    name = "hierarchical"

    def __init__(self, rt):
        self.rt = rt
        self.rail, self.node = subgroups(rt)

    def check_error(self):
        pass

    # ------------------------------------------------------------------ counts and routing
    def _routing(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert):
        """One all_gather of (per-rank, per-node, per-expert) counts; everything else is derived on the host."""
        rt = self.rt
        world, n_nodes, lws = rt.world_size, rt.num_nodes, rt.local_world_size
        per_node, in_node = rdma_layout(is_token_in_rank, n_nodes)
        row = torch.cat([num_tokens_per_rank.to(torch.int32), per_node, num_tokens_per_expert.to(torch.int32)])
        gathered = gather_rows(rt, row)
        e_l = num_tokens_per_expert.numel() // world
        lo = world + n_nodes + rt.rank * e_l
        host = torch.cat([gathered[:, :world + n_nodes].flatten(), gathered[:, lo:lo + e_l].sum(0)]).tolist()
        width = world + n_nodes
        mat = [host[s * width:s * width + world] for s in range(world)]          # tokens s -> rank r
        to_node = [host[s * width + world:(s + 1) * width] for s in range(world)]  # tokens s -> node n
        expert_counts = host[world * width:]
        me, n0, l0 = rt.rank, rt.node_rank, rt.local_rank
        rail_send = to_node[me]
        rail_recv = [to_node[n * lws + l0][n0] for n in range(n_nodes)]
        node_send = [sum(mat[n * lws + l0][n0 * lws + lr] for n in range(n_nodes)) for lr in range(lws)]
        node_recv = [sum(mat[n * lws + lr][me] for n in range(n_nodes)) for lr in range(lws)]
        # Rows arrive from forwarder l in blocks n = 0..N-1 (source (n, l)); the output wants source order.
        arrival = [(n * lws + lr, mat[n * lws + lr][me]) for lr in range(lws) for n in range(n_nodes)]
        starts = _blocks([c for _, c in arrival])
        by_source = sorted(range(len(arrival)), key=lambda i: arrival[i][0])
        device = is_token_in_rank.device
        order = [torch.arange(starts[i], starts[i] + arrival[i][1], device=device) for i in by_source]
        order = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64, device=device)
        gmat = gathered[:, :world].contiguous()
        return dict(mat=mat, gmat=gmat, expert_counts=expert_counts, in_node=in_node, rail_send=rail_send,
                    rail_recv=rail_recv, node_send=node_send, node_recv=node_recv, order=order)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, num_worst_tokens, config):
        rt = self.rt
        world, n_nodes, lws = rt.world_size, rt.num_nodes, rt.local_world_size
        num_tokens, hidden = x.shape
        device = x.device
        rt_info = self._routing(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert)
        num_recv = sum(rt_info["node_recv"])
        _check_worst(num_worst_tokens, rt_info["mat"])

        # Rail hop: token order per destination node; each row carries its node's L routing bits.
        in_node = rt_info["in_node"]
        rail_send = rt_info["rail_send"]
        num_rail_send = sum(rail_send)
        node_offsets = device_ints(_blocks(rail_send), torch.int32, device)  # (pinned: no stream wait)
        rail_idx = send_order(in_node, token_positions(in_node), node_offsets, num_rail_send)
        dest_node = torch.repeat_interleave(torch.arange(n_nodes, device=device),
                                            device_ints(rail_send, torch.int64, device), output_size=num_rail_send)
        bits = is_token_in_rank.reshape(num_tokens, n_nodes, lws)[rail_idx, dest_node].to(torch.uint8)
        k = topk_idx.size(1) if topk_idx is not None else 0
        specs = [("topk_idx", k, torch.int64), ("x", hidden, x.dtype),
                 ("scales", x_scales.size(1) if x_scales is not None else 0, torch.float32),
                 ("topk_weights", k if topk_weights is not None else 0, torch.float32),
                 ("src_idx", 1, torch.int32), ("bits", lws, torch.uint8)]
        cols, row_bytes = _columns(specs)
        parts = {"x": x.index_select(0, rail_idx), "src_idx": rail_idx.to(torch.int32), "bits": bits}
        if x_scales is not None:
            parts["scales"] = x_scales.index_select(0, rail_idx)
        if topk_idx is not None:
            parts["topk_idx"] = topk_idx.index_select(0, rail_idx)
            if topk_weights is not None:
                parts["topk_weights"] = topk_weights.index_select(0, rail_idx).to(torch.float32)
        send = _pack(num_rail_send, cols, row_bytes, parts, device)
        rail_rows = _a2a(self.rt, send, rail_send, rt_info["rail_recv"], self.rail, n_nodes)

        # Node hop: forward to each local rank whose bit is set, in arrival (node, token) order.
        fwd_bits = _unpack(rail_rows, cols, "bits").bool()
        fwd_offsets = device_ints(_blocks(rt_info["node_send"]), torch.int32, device)
        fwd_idx = send_order(fwd_bits, token_positions(fwd_bits), fwd_offsets, sum(rt_info["node_send"]))
        node_rows = _a2a(self.rt, rail_rows.index_select(0, fwd_idx), rt_info["node_send"], rt_info["node_recv"], self.node,
                         lws)
        rows = node_rows.index_select(0, rt_info["order"])

        rows_n = num_worst_tokens or num_recv
        recv_x = _pad(_unpack(rows, cols, "x"), rows_n, 0)
        recv_scales = _pad(_unpack(rows, cols, "scales"), rows_n, 0) if x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            e_l = num_tokens_per_expert.numel() // world
            got_w = _unpack(rows, cols, "topk_weights") if topk_weights is not None else None
            local_idx, local_w = localize_topk(_unpack(rows, cols, "topk_idx"), got_w, rt.rank, e_l)
            recv_topk_idx = _pad(local_idx, rows_n, -1)
            recv_topk_weights = _pad(local_w, rows_n, 0) if local_w is not None else None
        recv_src_idx = _pad(_unpack(rows, cols, "src_idx").view(-1), rows_n, -1)

        gmat = rt_info["gmat"]
        send_head = token_positions(is_token_in_rank)
        send_offsets = (torch.cumsum(gmat[rt.rank], 0, dtype=torch.int32) - gmat[rt.rank]).contiguous()
        mat = rt_info["mat"]
        handle = DispatchHandle(
            (torch.cumsum(gmat, 0, dtype=torch.int32), gmat, send_offsets, recv_src_idx, is_token_in_rank, send_head),
            num_recv_tokens=num_recv, num_worst_tokens=num_worst_tokens, num_tokens=num_tokens,
            send_counts=mat[rt.rank], recv_counts=[mat[s][rt.rank] for s in range(world)],
            max_recv_tokens=max(sum(mat[s][r] for s in range(world)) for r in range(world)),
            max_send_tokens=max(sum(r) for r in mat), transport="hierarchical",
            rail_idx=rail_idx, rail_send=rail_send, rail_recv=rt_info["rail_recv"], fwd_idx=fwd_idx,
            node_send=rt_info["node_send"], node_recv=rt_info["node_recv"], order=rt_info["order"],
            num_rdma_send_tokens=num_rail_send, num_rdma_recv_tokens=rail_rows.size(0),
        )
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, rt_info["expert_counts"], handle

    def cached_dispatch(self, x, x_scales, handle, config):
        """Same routing as `handle`, new payload: the two hops with the handle's orders, no count exchange."""
        self._check_handle(handle)
        hidden = x.size(1)
        specs = [("x", hidden, x.dtype), ("scales", x_scales.size(1) if x_scales is not None else 0, torch.float32)]
        cols, row_bytes = _columns(specs)
        parts = {"x": x.index_select(0, handle.rail_idx)}
        if x_scales is not None:
            parts["scales"] = x_scales.index_select(0, handle.rail_idx)
        send = _pack(handle.rail_idx.numel(), cols, row_bytes, parts, x.device)
        rail_rows = _a2a(self.rt, send, handle.rail_send, handle.rail_recv, self.rail, self.rt.num_nodes)
        node_rows = _a2a(self.rt, rail_rows.index_select(0, handle.fwd_idx), handle.node_send, handle.node_recv, self.node,
                         self.rt.local_world_size)
        rows = node_rows.index_select(0, handle.order)
        rows_n = handle.num_worst_tokens or handle.num_recv_tokens
        recv_x = _pad(_unpack(rows, cols, "x"), rows_n, 0)
        recv_scales = _pad(_unpack(rows, cols, "scales"), rows_n, 0) if x_scales is not None else None
        return recv_x, recv_scales

    # ------------------------------------------------------------------ combine
    def combine(self, x, topk_weights, bias, handle, config):
        """Reverse both hops: forwarders sum their node's rows per token (fp32), one row per node crosses
        the rail, the source sums the nodes' rows (fp32) in node order, adds bias and casts to x.dtype."""
        self._check_handle(handle)
        rt = self.rt
        num_recv = handle.num_recv_tokens
        x = x[:num_recv]
        hidden = x.size(1)
        device = x.device
        w_cols = topk_weights.size(1) if topk_weights is not None else 0
        # Back to arrival order, then to the forwarders.
        arrival = torch.empty(num_recv, hidden + w_cols, dtype=torch.float32, device=device)
        vals = x.float() if topk_weights is None else torch.cat([x.float(), topk_weights[:num_recv].float()], 1)
        arrival.index_copy_(0, handle.order, vals)
        back = _a2a(self.rt, arrival, handle.node_recv, handle.node_send, self.node, rt.local_world_size)
        partial = torch.zeros(handle.num_rdma_recv_tokens, hidden + w_cols, dtype=torch.float32, device=device)
        start = 0
        for count in handle.node_send:  # per local rank, in order: deterministic fp32 sums
            if count:
                partial.index_add_(0, handle.fwd_idx[start:start + count], back[start:start + count])
            start += count
        # One row per (token, node) crosses the rail, in the payload dtype (weights stay fp32).
        specs = [("x", hidden, x.dtype), ("topk_weights", w_cols, torch.float32)]
        cols, row_bytes = _columns(specs)
        parts = {"x": partial[:, :hidden].to(x.dtype)}
        if w_cols:
            parts["topk_weights"] = partial[:, hidden:]
        send = _pack(partial.size(0), cols, row_bytes, parts, device)
        home = _a2a(self.rt, send, handle.rail_recv, handle.rail_send, self.rail, rt.num_nodes)
        acc = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=device)
        acc_w = torch.zeros(handle.num_tokens, w_cols, dtype=torch.float32, device=device) if w_cols else None
        got_x = _unpack(home, cols, "x")
        got_w = _unpack(home, cols, "topk_weights") if w_cols else None
        start = 0
        for count in handle.rail_send:  # per node, in order
            if count:
                idx = handle.rail_idx[start:start + count]
                acc.index_add_(0, idx, got_x[start:start + count].float())
                if w_cols:
                    acc_w.index_add_(0, idx, got_w[start:start + count])
            start += count
        for b in bias:
            acc += b.to(torch.float32)
        return acc.to(x.dtype), acc_w

    @staticmethod
    def _check_handle(handle):
        if getattr(handle, "transport", None) != "hierarchical":
            raise ValueError(f"this handle was made by the {getattr(handle, 'transport', '?')!r} transport; the "
                             "hierarchical transport needs a handle from its own dispatch")
