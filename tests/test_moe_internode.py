"""MoE hierarchical (internode) dispatch/combine: identical to the flat collective transport.

The ranks act as several nodes through TURBO_DIST_RANKS_PER_NODE (4 ranks = 2 nodes x 2, 2 ranks =
2 nodes x 1). Every rank runs the same dispatch/combine on both transports and compares: rows, order,
top-k, counts and handle must match exactly. Payload values are small integers (exact in bf16 and in
every fp32 partial sum), so the combine, which groups its sum by node, must match bit for bit too.
"""
import pytest
import torch

from turbo_dist.moe import Buffer
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device

HIDDEN, TOPK = 128, 4


def make_inputs(rank, world, num_tokens, num_experts, routing, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    t = 0 if routing == "empty" and rank == world - 1 else num_tokens + 3 * rank
    x = torch.randint(-4, 5, (t, HIDDEN), generator=g).to(torch.bfloat16)
    scores = torch.rand(t, num_experts, generator=g)
    idx = scores.topk(TOPK, dim=1).indices
    per_rank = num_experts // world
    if routing == "one_rank":  # everything to the last rank's experts
        idx = scores[:, -per_rank:].topk(min(TOPK, per_rank), dim=1).indices + num_experts - per_rank
    if routing == "skewed":  # most tokens go to node 0's first rank
        idx[: t * 3 // 4, 0] = torch.randint(0, per_rank, (t * 3 // 4,), generator=g)
        idx[:, 1:] = torch.where(idx[:, 1:] == idx[:, :1], -1, idx[:, 1:])
    if routing in ("random", "empty"):
        idx = torch.where(torch.rand(t, idx.size(1), generator=g) < 0.2, torch.full_like(idx, -1), idx)
    if routing == "all_dropped":
        idx = torch.full_like(idx, -1)
    w = torch.rand(t, idx.size(1), generator=g)
    return x, idx, w


def expert_fn(recv_x, rank):
    return (recv_x.float() * (rank + 1) + rank).to(recv_x.dtype)


def _same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what} differs"


def _internode_body(rank, world, routing, num_tokens, num_experts):
    dev = rank_device()
    hier = Buffer(None)  # 2+ nodes: hierarchical whatever num_rdma_bytes says (DeepEP's hint is 0 up to 8 ranks)
    flat = Buffer(None, transport="collective")
    rt = hier.runtime
    assert hier.transport == "hierarchical" and rt.num_nodes > 1
    x, idx, w = (t.to(dev) for t in make_inputs(rank, world, num_tokens, num_experts, routing))

    n_rank, n_rdma, n_expert, in_rank, _ = hier.get_dispatch_layout(idx, num_experts)
    f_rank, f_rdma, f_expert, f_in_rank, _ = flat.get_dispatch_layout(idx, num_experts)
    assert f_rdma is None and torch.equal(n_rank, f_rank) and torch.equal(n_expert, f_expert)
    ref_rdma = in_rank.view(-1, rt.num_nodes, rt.local_world_size).any(2).sum(0).to(torch.int32)
    assert n_rdma.dtype == torch.int32 and torch.equal(n_rdma, ref_rdma)

    layout = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    for alignment in (1, 4):
        got = hier.dispatch(x, num_tokens_per_rdma_rank=n_rdma, topk_idx=idx, topk_weights=w,
                            expert_alignment=alignment, **layout)
        ref = flat.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=alignment, **layout)
        for name, a, b in zip(("recv_x", "recv_topk_idx", "recv_topk_weights"), got[:3], ref[:3]):
            _same(a, b, name)
        assert got[3] == ref[3], "num_recv_tokens_per_expert_list"
        for i in range(6):
            _same(got[4][i], ref[4][i], f"handle[{i}]")
    recv_x, _, recv_w, _, handle, _ = got
    _, _, _, _, f_handle, _ = ref

    # Cached dispatch of another payload, FP8 payload, no top-k.
    x2 = (x.float() * 2 - 1).to(torch.bfloat16)
    _same(hier.dispatch(x2, handle=handle)[0], flat.dispatch(x2, handle=f_handle)[0], "cached recv_x")
    q = x.float().to(torch.float8_e4m3fn)
    s = torch.rand(x.size(0), HIDDEN // 128, device=dev)
    (hq, hs), *_ = hier.internode_dispatch((q, s), **layout)
    (fq, fs), *_ = flat.dispatch((q, s), **layout)
    _same(hq.view(torch.uint8), fq.view(torch.uint8), "fp8 rows")
    _same(hs, fs, "fp8 scales")
    no_topk = hier.dispatch(x, **layout)
    assert no_topk[1] is None and no_topk[2] is None and no_topk[3] == flat.dispatch(x, **layout)[3]
    _same(no_topk[0], recv_x, "recv_x without top-k")

    # Combine: payload + weights, then with bias; must equal the flat transport bit for bit.
    y = expert_fn(recv_x, rank)
    comb, comb_w, _ = hier.combine(y, handle, topk_weights=recv_w)
    f_comb, f_comb_w, _ = flat.combine(y, f_handle, topk_weights=recv_w)
    _same(comb, f_comb, "combined_x")
    _same(comb_w, f_comb_w, "combined_topk_weights")
    bias = torch.ones_like(x)
    _same(hier.internode_combine(y, handle, bias=(bias, bias))[0], flat.combine(y, f_handle, bias=(bias, bias))[0],
          "combined_x with bias")

    # num_worst_tokens: fixed-size outputs; combine takes the padded rows.
    worst = max(world * (num_tokens + 3 * world), 1)
    wgot = hier.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **layout)
    wref = flat.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **layout)
    for i in range(3):
        _same(wgot[i], wref[i], f"worst output {i}")
    assert wgot[3] == [] == wref[3]
    _same(hier.combine(expert_fn(wgot[0], rank), wgot[4])[0], flat.combine(expert_fn(wref[0], rank), wref[4])[0],
          "combine of padded rows")

    # num_worst_tokens below the busiest rank's count: every rank raises (none is left waiting in the exchange)
    if handle.max_recv_tokens > 1:
        for buf in (hier, flat):
            with pytest.raises(ValueError, match=f"smaller than the {handle.max_recv_tokens} tokens rank"):
                buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=handle.max_recv_tokens - 1, **layout)
    with pytest.raises(ValueError, match="num_tokens_per_rdma_rank"):
        hier.dispatch(x, num_tokens_per_rdma_rank=n_rdma[:1].repeat(rt.num_nodes + 1), **layout)
    with pytest.raises(NotImplementedError, match="num_tokens_per_rdma_rank"):
        flat.dispatch(x, num_tokens_per_rdma_rank=n_rdma, **layout)
    with pytest.raises(ValueError, match="hierarchical"):
        hier.combine(y, f_handle)
    return int(handle.num_recv_tokens), int(handle.num_rdma_send_tokens)


def _sizes(*cases):
    """(world_size, ranks_per_node) params carrying world_sizes_for_device's marks (skip without enough GPUs,
    or shared_gpu in the shared-GPU test mode)."""
    out = []
    for ws, rpn in cases:
        p = world_sizes_for_device(ws)[0]
        out.append(pytest.param(ws, rpn, marks=getattr(p, "marks", ())))
    return out


@pytest.mark.dist
@pytest.mark.parametrize("world_size,ranks_per_node", _sizes((4, 2), (2, 1)))
@pytest.mark.parametrize("routing", ["random", "skewed", "one_rank", "empty", "all_dropped"])
def test_hierarchical_matches_flat(world_size, ranks_per_node, routing):
    got = run_distributed(_internode_body, world_size, args=(routing, 12, 4 * world_size),
                          env={"TURBO_DIST_RANKS_PER_NODE": str(ranks_per_node)})
    if routing == "all_dropped":
        assert got == [(0, 0)] * world_size
    else:
        assert sum(n for n, _ in got) > 0
