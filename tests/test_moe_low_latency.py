"""MoE low-latency dispatch/combine (DeepEP's low_latency_* API) against a plain reference.

Every rank rebuilds every rank's inputs from seeds, so it computes its expected outputs locally.
CPU (gloo): the collective path (the kernels alone, with simulated ranks: tests/test_moe_ll_kernels.py).
GPU: the triton path.
"""
import pytest
import torch
import torch.distributed as dist

from turbo_dist.moe import Buffer
from turbo_dist.moe.ll_layout import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8
from turbo_dist.moe.low_latency import LowLatency, LowLatencyHandle
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device

HIDDEN, TOPK, NUM_MAX = 256, 3, 8


def make_inputs(rank, world, num_experts, routing, seed=0, num_max=NUM_MAX, hidden=HIDDEN, topk=TOPK):
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    t = 0 if routing == "empty" and rank == world - 1 else num_max - (rank % 3)
    x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
    idx = torch.rand(t, num_experts, generator=g).topk(topk, dim=1).indices
    if routing == "skewed":  # most tokens put their first pick on rank 0's first expert
        first = torch.zeros(t, 1, dtype=torch.int64)
        idx = torch.where((idx == 0).any(1, keepdim=True), idx, torch.cat([first, idx[:, 1:]], 1))
    if routing in ("random", "empty", "skewed"):
        idx = torch.where(torch.rand(t, topk, generator=g) < 0.2, torch.full_like(idx, -1), idx)
    if routing == "all_dropped":
        idx = torch.full_like(idx, -1)
    w = torch.rand(t, topk, generator=g)
    return x, idx, w


def ref_dispatch(me, inputs, num_experts, world, num_max):
    """Per local expert: rows (source rank, token, k order), src token ids, per-source counts."""
    e_l = num_experts // world
    out = []
    for e in range(e_l):
        g = me * e_l + e
        rows, src, per_src = [], [], []
        for s, (x, idx, _) in enumerate(inputs):
            hits = [(t, k) for t in range(idx.size(0)) for k in range(idx.size(1)) if int(idx[t, k]) == g]
            rows += [x[t] for t, _ in hits]
            src += [t for t, _ in hits]
            per_src.append(len(hits))
        out.append((torch.stack(rows) if rows else torch.zeros(0, inputs[0][0].size(1), dtype=inputs[0][0].dtype),
                    src, per_src))
    return out


def expert_fn(recv, me, e_l):
    """What expert e of rank `me` returns for its rows: rows * (global id + 1) / 4 (exact in bf16 for our data)."""
    gid = torch.arange(e_l, dtype=torch.float32, device=recv.device).view(-1, 1, 1) + me * e_l
    return (recv.float() * (gid + 1) / 4).to(torch.bfloat16)


def ref_combine(x, idx, w):
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(idx.size(1)):
        g = idx[:, k]
        y = (x.float() * (g.float() + 1).view(-1, 1) / 4).to(torch.bfloat16).float()
        acc += torch.where((g >= 0).view(-1, 1), y * w[:, k:k + 1], 0.0)
    return acc


def check_dispatch(me, world, num_experts, num_max, inputs, recv_x, count, handle):
    """recv_x: [E_l, R * M, H] (dequantized for FP8); inputs: what every rank sent (dequantized for FP8)."""
    ref = ref_dispatch(me, inputs, num_experts, world, num_max)
    src_info, layout_range = handle[0].cpu(), handle[1].cpu()
    assert tuple(handle[2:]) == (num_max, inputs[0][0].size(1), num_experts)
    for e, (rows, src, per_src) in enumerate(ref):
        n = len(src)
        assert int(count[e]) == n
        assert torch.equal(recv_x[e, :n].cpu(), rows), f"expert {e}: rows differ"
        assert src_info[e, :n].tolist() == src
        begin = [sum(per_src[:s]) for s in range(world)]
        assert (layout_range[e] >> 32).tolist() == begin and (layout_range[e] & 0xFFFFFFFF).tolist() == per_src


# ----------------------------------------------------------------------------- rank bodies
def _ll_body(rank, world, routing, use_fp8, hook, seed):
    dev = rank_device()
    num_experts = 4 * world
    e_l = 4
    inputs = [make_inputs(r, world, num_experts, routing, seed) for r in range(world)]
    x, idx, w = (t.to(dev) for t in inputs[rank])
    buf = Buffer(None, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts),
                 low_latency_mode=True)
    stats = torch.zeros(e_l, dtype=torch.int32, device=dev)
    for _ in range(2):  # twice: the second call reuses the buffers / flips parities
        recv, count, handle, event, recv_hook = buf.low_latency_dispatch(
            x, idx, NUM_MAX, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
            async_finish=not hook, return_recv_hook=hook)
        if hook:
            assert callable(recv_hook)
            recv_hook()
        else:
            assert recv_hook is None
            event.current_stream_wait()
    assert isinstance(handle, LowLatencyHandle) and count.dtype == torch.int32
    n = NUM_MAX * world
    if use_fp8:
        q, s = recv
        assert q.shape == (e_l, n, HIDDEN) and q.dtype == torch.float8_e4m3fn
        assert s.shape == (e_l, n, HIDDEN // 128) and s.dtype == torch.float32 and s.stride(1) == 1
        recv_x = torch.stack([per_token_cast_back(q[e], s[e]) for e in range(e_l)])
        q_inputs = [(per_token_cast_back(*per_token_cast_to_fp8(a)), b, c) for a, b, c in inputs]
        check_dispatch(rank, world, num_experts, NUM_MAX, q_inputs, recv_x, count.cpu(), handle)
        # SNR of the FP8 round trip against the bf16 rows
        ref = ref_dispatch(rank, inputs, num_experts, world, NUM_MAX)
        for e, (rows, _, _) in enumerate(ref):
            if rows.size(0):
                got = recv_x[e, :rows.size(0)].cpu()
                snr = 10 * torch.log10(rows.float().pow(2).sum() / (rows.float() - got).pow(2).sum())
                assert snr > 25, f"FP8 round trip SNR {snr:.1f} dB"
    else:
        recv_x = recv
        assert recv_x.shape == (e_l, n, HIDDEN) and recv_x.dtype == torch.bfloat16
        check_dispatch(rank, world, num_experts, NUM_MAX, inputs, recv_x, count.cpu(), handle)
    assert torch.equal(stats.cpu(), 2 * count.cpu())

    y = expert_fn(recv_x.to(torch.bfloat16), rank, e_l)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=dev)
    combined, event, recv_hook = buf.low_latency_combine(y, idx, w, handle, async_finish=not hook,
                                                          return_recv_hook=hook, out=out)
    recv_hook() if hook else event.current_stream_wait()
    assert combined is out and combined.shape == x.shape
    xs = per_token_cast_back(*per_token_cast_to_fp8(inputs[rank][0])).to(torch.bfloat16) if use_fp8 else inputs[rank][0]
    ref = ref_combine(xs, inputs[rank][1], inputs[rank][2])
    assert torch.allclose(combined.float().cpu(), ref, rtol=1e-2, atol=1e-2), (combined.float().cpu() - ref).abs().max()
    # zero copy: the expert outputs written into get_next_low_latency_combine_buffer, x's values not read; two
    # buffers alternate; the result equals the copying combine's bit for bit
    seen = set()
    for _ in range(3):
        dst = buf.get_next_low_latency_combine_buffer(handle)
        assert dst.shape == y.shape and dst.dtype == torch.bfloat16 and dst.device == y.device
        seen.add(dst.data_ptr())
        dst.copy_(y)
        zc, event, recv_hook = buf.low_latency_combine(torch.zeros_like(y), idx, w, handle, zero_copy=True,
                                                       async_finish=not hook, return_recv_hook=hook)
        recv_hook() if hook else event.current_stream_wait()
        assert torch.equal(zc, combined)
    assert len(seen) == 2
    # use_logfmt: 10-bit log-magnitude rows on the triton path (within a few % of the bf16 combine), refused on the
    # collective path
    if buf._ll.path == "triton":
        lf, event, recv_hook = buf.low_latency_combine(y, idx, w, handle, use_logfmt=True, async_finish=not hook,
                                                       return_recv_hook=hook)
        recv_hook() if hook else event.current_stream_wait()
        scale = ref_combine(xs.abs(), inputs[rank][1], inputs[rank][2])
        assert ((lf.float().cpu() - ref).abs() <= 0.03 * scale + 1e-2).all(), "LogFMT combine off"
    else:
        with pytest.raises(NotImplementedError, match="use_logfmt"):
            buf.low_latency_combine(y, idx, w, handle, use_logfmt=True)
    if buf._ll.path == "triton":  # DeepEP's RDMA-side buffer: here the low-latency symmetric buffer
        raw = buf.get_local_buffer_tensor(torch.int64, size=(2, 2, world), use_rdma_buffer=True)
        assert raw.device == y.device and raw.data_ptr() == buf._ll._buffer.local().data_ptr()
    else:
        with pytest.raises(RuntimeError, match="no RDMA-side buffer"):
            buf.get_local_buffer_tensor(torch.int64, use_rdma_buffer=True)
    return int(count.sum())


def _ll_graph_body(rank, world, use_fp8, seed):
    """Dispatch -> experts -> combine captured once in a CUDA graph, replayed with new inputs copied into the
    captured tensors: every replay must give what eager calls give for those inputs (the counters are consumed
    by the waits, so replays need no epoch; the captured parities stay valid, see kernels/moe_ll.py)."""
    dev = rank_device()
    num_experts, e_l = 4 * world, 4
    sets = [[make_inputs(r, world, num_experts, "random", seed + i) for r in range(world)] for i in range(3)]
    x_s, idx_s, w_s = (t.to(dev).clone() for t in sets[0][rank])
    buf = Buffer(None, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts),
                 low_latency_mode=True)

    def step():
        recv, count, handle, _, _ = buf.low_latency_dispatch(x_s, idx_s, NUM_MAX, num_experts, use_fp8=use_fp8)
        if use_fp8:
            q, s = recv
            recv_x = torch.stack([per_token_cast_back(q[e], s[e]) for e in range(e_l)]).to(torch.bfloat16)
        else:
            recv_x = recv
        y = expert_fn(recv_x, rank, e_l)
        out, _, _ = buf.low_latency_combine(y, idx_s, w_s, handle)
        return recv_x, count, handle, out

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: buffer allocation, kernel compilation (host syncs) before capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread may touch CUDA
        recv_x, count, handle, out = step()
    assert buf._ll.last_path["dispatch"] == "triton"
    for i in range(3):
        x, idx, w = sets[i][rank]
        x_s.copy_(x)
        idx_s.copy_(idx)
        w_s.copy_(w)
        torch.cuda.synchronize()
        dist.barrier()  # every rank's inputs are in place before any rank's replay sends
        graph.replay()
        torch.cuda.synchronize()
        inputs = sets[i]
        if use_fp8:
            inputs = [(per_token_cast_back(*per_token_cast_to_fp8(a)).to(torch.bfloat16), b, c) for a, b, c in inputs]
        check_dispatch(rank, world, num_experts, NUM_MAX, inputs, recv_x, count.cpu(), handle)
        ref = ref_combine(inputs[rank][0], idx.cpu(), w.cpu())
        assert torch.allclose(out.float().cpu(), ref, rtol=1e-2, atol=1e-2), f"replay {i}: combine differs"
    return True


def _ll_options_body(rank, world):
    dev = rank_device()
    num_experts = 2 * world
    inputs = [make_inputs(r, world, num_experts, "random", 3, hidden=512) for r in range(world)]
    x, idx, w = (t.to(dev) for t in inputs[rank])
    buf = Buffer(None, low_latency_mode=True)
    (q, s), count, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, round_scale=True)
    (q8, s8), count8, _, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, round_scale=True,
                                                         use_ue8m0=True)
    assert s8.dtype == torch.int32 and s8.shape == (2, NUM_MAX * world, 1) and torch.equal(count8, count)
    for e in range(2):
        c = int(count[e])
        lg = torch.log2(s[e, :c])
        assert torch.equal(lg, torch.round(lg)), "round_scale gives powers of 2"
        assert torch.equal(s8[e, :c], pack_ue8m0(s[e, :c].contiguous()))
        assert torch.equal(q8[e, :c].view(torch.uint8), q[e, :c].view(torch.uint8))
    # bad input is refused before any communication
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        buf.low_latency_dispatch(x, idx, 1, num_experts)
    with pytest.raises(TypeError, match="int64"):
        buf.low_latency_dispatch(x, idx.int(), NUM_MAX, num_experts)
    with pytest.raises(ValueError, match="use_ue8m0"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, use_ue8m0=True)
    cost = torch.zeros(world, world, dtype=torch.int64, device=dev)  # DeepEP's shape; [num_ranks] works too
    if buf._ll.path == "triton":
        buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, dispatch_wait_recv_cost_stats=cost)
        torch.cuda.synchronize()
        assert (cost >= 0).all() and not cost[1:].any(), "only the first num_ranks entries are written"
        with pytest.raises(ValueError, match="dispatch_wait_recv_cost_stats"):
            buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, dispatch_wait_recv_cost_stats=cost[0, :1])
    else:
        with pytest.raises(NotImplementedError, match="dispatch_wait_recv_cost_stats needs the triton"):
            buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, dispatch_wait_recv_cost_stats=cost)
    y = torch.zeros(2, NUM_MAX * world, 512, dtype=torch.bfloat16, device=dev)
    ccost = torch.zeros(world, dtype=torch.int64, device=dev)
    if buf._ll.path == "triton":  # combine_wait_recv_cost_stats (DeepEP's): the combine wait's cycles per source
        _, _, h16, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, use_fp8=False)
        buf.low_latency_combine(y, idx, w, h16, combine_wait_recv_cost_stats=ccost)
        torch.cuda.synchronize()
        assert int(ccost.sum()) > 0, "the combine wait's cycles are written"
    else:
        with pytest.raises(NotImplementedError, match="combine_wait_recv_cost_stats needs the triton"):
            buf.low_latency_combine(y, idx, w, handle, combine_wait_recv_cost_stats=ccost)
    with pytest.raises(RuntimeError, match="enable_shrink"):
        buf.low_latency_update_mask_buffer((rank + 1) % world, True)
    with pytest.raises(ValueError, match="must be"):
        buf.low_latency_combine(y[:, :-1], idx, w, handle)
    with pytest.raises(ValueError, match="call it first"):
        buf.low_latency_combine(y, idx, w, handle, zero_copy=True)
    with pytest.raises(TypeError, match="handle"):
        buf.get_next_low_latency_combine_buffer((1, 2))
    buf.get_next_low_latency_combine_buffer(handle)
    with pytest.raises(ValueError, match="must be"):
        buf.low_latency_combine(y[:, :-1], idx, w, handle, zero_copy=True)
    # a refused zero-copy combine leaves the buffer to write where it was: the corrected retry reads what was written
    y1 = torch.randn(y.shape, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(dev)
    plain, _, _ = buf.low_latency_combine(y1, idx, w, handle)
    buf.get_next_low_latency_combine_buffer(handle).copy_(y1)
    with pytest.raises(ValueError):
        buf.low_latency_combine(y1, idx, w.double(), handle, zero_copy=True)
    retried, _, _ = buf.low_latency_combine(y1, idx, w, handle, zero_copy=True)
    assert torch.equal(retried, plain)
    with pytest.raises(ValueError, match="contiguous int32"):  # the kernels add at stats_ptr + e
        buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts,
                                 cumulative_local_expert_recv_stats=torch.zeros(4, dtype=torch.int32, device=dev)[::2])
    other = Buffer(None, low_latency_mode=True)  # its own symmetric buffer, as DeepEP gives each Buffer its memory
    assert other._ll._buffer_name != buf._ll._buffer_name
    with pytest.raises(RuntimeError, match="low_latency_mode=True"):
        Buffer(None).low_latency_dispatch(x, idx, NUM_MAX, num_experts)
    buf.clean_low_latency_buffer(NUM_MAX, 512, num_experts)
    return True


def _ll_mask_body(rank, world, use_fp8, seed):
    """Buffer(enable_shrink=True): the last rank is cut off: every other rank masks it and it masks every other
    rank (as both sides would end up after timeouts with shrink): no rows cross the cut in either direction and
    no expert output comes back across it. Then the masks are cleared and the calls are whole again."""
    dev = rank_device()
    num_experts, e_l = 4 * world, 4
    dead = world - 1
    inputs = [make_inputs(r, world, num_experts, "random", seed) for r in range(world)]
    x, idx, w = (t.to(dev) for t in inputs[rank])
    buf = Buffer(None, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts),
                 low_latency_mode=True, enable_shrink=True)
    with pytest.raises(ValueError, match="enable_shrink"):
        Buffer(None, enable_shrink=True)
    status = torch.full((world,), 7, dtype=torch.int32, device=dev)
    buf.low_latency_query_mask_buffer(status)
    assert not status.any()
    with pytest.raises(ValueError, match="cannot mask itself"):
        buf.low_latency_update_mask_buffer(rank, True)
    with pytest.raises(ValueError, match="rank_to_mask"):
        buf.low_latency_update_mask_buffer(world, True)
    cut = [r for r in range(world) if (r == dead) != (rank == dead)]  # the ranks across the cut from this one
    for r in cut:
        buf.low_latency_update_mask_buffer(r, True)
    buf.low_latency_query_mask_buffer(status)
    assert status.tolist() == [int(r in cut) for r in range(world)]
    for masked in (True, False):
        recv, count, handle, event, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, num_experts, use_fp8=use_fp8)
        recv_x = torch.stack([per_token_cast_back(recv[0][e], recv[1][e]) for e in range(e_l)]) if use_fp8 else recv
        seen = [(per_token_cast_back(*per_token_cast_to_fp8(a)) if use_fp8 else a, b, c) for a, b, c in inputs]
        if masked:  # nothing from a masked source
            seen = [(a, torch.full_like(b, -1), c) if r in cut else (a, b, c) for r, (a, b, c) in enumerate(seen)]
        check_dispatch(rank, world, num_experts, NUM_MAX, seen, recv_x.cpu(), count.cpu(), handle)
        y = expert_fn(recv_x.to(torch.bfloat16), rank, e_l)
        if masked and rank == dead:  # what a broken rank might send: left out, not multiplied by 0 (inf * 0 = NaN)
            y = torch.full_like(y, float("inf"))
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        ref_idx = inputs[rank][1]
        if masked:  # a masked rank's experts contribute nothing
            ref_idx = torch.where(torch.isin(ref_idx // e_l, torch.tensor(cut, dtype=torch.int64)),
                                  torch.full_like(ref_idx, -1), ref_idx)
        ref = ref_combine(seen[rank][0].to(torch.bfloat16), ref_idx, inputs[rank][2])
        if not (masked and rank == dead):
            assert torch.allclose(combined.float().cpu(), ref, rtol=1e-2, atol=1e-2), (masked, rank)
        buf.low_latency_clean_mask_buffer()
    buf.low_latency_query_mask_buffer(status)
    assert not status.any()
    return True


def _ll_mask_inf_body(rank, world):
    """Collective path: rank 0 masks rank 1, whose (faulty) experts return inf: rank 0's output leaves them out
    (inf * 0 would be NaN) and keeps its own expert's share. One-way masking: the triton path's rank 1 would
    wait on rank 0's sends, so this runs the collective path only."""
    buf = Buffer(None, low_latency_mode=True, enable_shrink=True)
    if buf._ll.path != "collective":
        return True
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 2], [0, 2]])  # expert 0 on rank 0, expert 2 on rank 1
    w = torch.full((2, 2), 0.5)
    if rank == 0:
        buf.low_latency_update_mask_buffer(1, True)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, 4, 2 * world, use_fp8=False)
    y = recv.clone() if rank == 0 else torch.full_like(recv, float("inf"))
    out, _, _ = buf.low_latency_combine(y, idx, w, handle)
    if rank == 0:
        assert torch.equal(out, torch.full_like(out, 0.5)), out[:, :4]
    return True


@pytest.mark.dist
def test_low_latency_masked_rank_inf_left_out():
    assert all(run_distributed(_ll_mask_inf_body, 2))


# ----------------------------------------------------------------------------- tests
@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_masked_rank(world_size, use_fp8):
    assert all(run_distributed(_ll_mask_body, world_size, args=(use_fp8, 13)))

@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("routing,use_fp8,hook", [("random", False, False), ("random", True, True),
                                                   ("skewed", True, False), ("empty", False, True),
                                                   ("all_dropped", False, False)])
def test_low_latency_dispatch_combine(world_size, routing, use_fp8, hook):
    got = run_distributed(_ll_body, world_size, args=(routing, use_fp8, hook, world_size))
    assert (sum(got) == 0) == (routing == "all_dropped")


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
def test_low_latency_options_and_errors(world_size):
    assert all(run_distributed(_ll_options_body, world_size))


@pytest.mark.gpu(min_gpus=1)
@pytest.mark.dist
@pytest.mark.parametrize("routing,use_fp8,hook", [("random", False, False), ("random", True, True),
                                                   ("empty", False, False)])
def test_low_latency_triton_self_loop(routing, use_fp8, hook):
    """One GPU: the triton path with the rank writing into its own symmetric buffer."""
    run_distributed(_ll_body, 1, args=(routing, use_fp8, hook, 7), backend="nccl",
                    env={"TURBO_DIST_MOE_LL_PATH": "triton"})


@pytest.mark.gpu(min_gpus=2)
@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("routing,use_fp8,hook", [("random", False, False), ("skewed", True, True)])
def test_low_latency_triton_multi_gpu(world_size, routing, use_fp8, hook):
    run_distributed(_ll_body, world_size, args=(routing, use_fp8, hook, 11), env={"TURBO_DIST_MOE_LL_PATH": "triton"})


@pytest.mark.gpu(min_gpus=1)
@pytest.mark.dist
@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_cuda_graph_self_loop(use_fp8):
    """DeepEP's low-latency ops are captured in CUDA graphs for decoding: capture once, replay with new inputs."""
    run_distributed(_ll_graph_body, 1, args=(use_fp8, 21), backend="nccl", env={"TURBO_DIST_MOE_LL_PATH": "triton"})


@pytest.mark.gpu(min_gpus=2)
@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_low_latency_cuda_graph_multi_gpu(world_size):
    run_distributed(_ll_graph_body, world_size, args=(True, 23), env={"TURBO_DIST_MOE_LL_PATH": "triton"})


def test_triton_path_hands_fp32_payloads_to_collective_and_says_so(caplog):
    """The triton kernels move FP8/2-byte rows: an fp32 call on the triton path runs collective, logged and recorded."""
    import logging

    ll = object.__new__(LowLatency)  # only the path choice is exercised: no runtime, no buffer
    ll.path, ll.last_path = "triton", {"dispatch": None, "combine": None}
    with caplog.at_level(logging.INFO, logger="turbo_dist"):
        assert ll._takes_triton("dispatch", torch.zeros(2, 128, dtype=torch.bfloat16))
        assert ll._takes_triton("dispatch", torch.zeros(2, 128, dtype=torch.float8_e4m3fn))
        assert not ll._takes_triton("combine", torch.zeros(2, 128, dtype=torch.float32))
        assert not ll._takes_triton("combine", torch.zeros(2, 128, dtype=torch.float32))
    assert ll.last_path == {"dispatch": "triton", "combine": "collective"}
    logged = [r.getMessage() for r in caplog.records if "runs the collective path" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("moe low-latency combine: torch.float32 payload"), logged
    ll.path = "collective"  # the collective path never claims the kernels
    assert not ll._takes_triton("dispatch", torch.zeros(2, 128, dtype=torch.bfloat16))


def test_counter_blocks_are_16_byte_aligned_for_any_rank_count():
    """Each (kind, parity) block of int64 counters starts 16-byte aligned, also for odd rank counts: Triton compiles
    an 8-byte aligned pointer / offset as another kernel, which a CUDA graph captured on the other parity than the
    eager warm-up would have compiled and loaded inside the capture."""
    from turbo_dist.moe import low_latency as ll

    for r in list(range(1, 10)) + [2047, 2048]:
        stride = ll._cnt_stride(r)
        assert stride >= r and (stride * 8) % 16 == 0, r
        assert 4 * stride * 8 <= ll._COUNTER_BYTES, r
