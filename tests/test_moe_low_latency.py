"""MoE low-latency dispatch/combine (DeepEP's low_latency_* API) against a plain reference.

Every rank rebuilds every rank's inputs from seeds, so it computes its expected outputs locally.
CPU (gloo): the collective path; the Triton kernels run in the interpreter with simulated ranks in one
process (each "rank" a separate byte buffer, peer pointers their addresses). GPU: the triton path.
"""
import pytest
import torch
import torch.distributed as dist

from turbo_dist.kernels import moe_ll, moe_ll_place
from turbo_dist.moe import Buffer
from turbo_dist.moe.ll_layout import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, place_tokens
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
    with pytest.raises(ValueError, match="must be"):
        buf.low_latency_combine(y[:, :-1], idx, w, handle)
    with pytest.raises(ValueError, match="call it first"):
        buf.low_latency_combine(y, idx, w, handle, zero_copy=True)
    with pytest.raises(TypeError, match="handle"):
        buf.get_next_low_latency_combine_buffer((1, 2))
    buf.get_next_low_latency_combine_buffer(handle)
    with pytest.raises(ValueError, match="must be"):
        buf.low_latency_combine(y[:, :-1], idx, w, handle, zero_copy=True)
    with pytest.raises(RuntimeError, match="low_latency_mode=True"):
        Buffer(None).low_latency_dispatch(x, idx, NUM_MAX, num_experts)
    buf.clean_low_latency_buffer(NUM_MAX, 512, num_experts)
    return True


# ----------------------------------------------------------------------------- tests
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


def test_low_latency_kernels_simulated_ranks():
    """The triton path's kernels with R simulated ranks in one process (interpreter on CPU, GPU if present)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    world, num_experts, num_max, hidden, k = 2, 8, 4, 128, 3
    e_l = num_experts // world
    dtype = torch.float16  # the interpreter mishandles bf16; the kernels move 4-byte words of any dtype
    inputs = [make_inputs(r, world, num_experts, "random", 5, num_max=num_max, hidden=hidden, topk=k)
              for r in range(world)]
    inputs = [(a.to(dtype), b, c) for a, b, c in inputs]
    regions, nbytes = LowLatency.layout(num_max, hidden, world, k)
    bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=dev) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=dev)
    errs = [moe_ll.ErrorWord(dev) for _ in range(world)]
    reg = regions[1]
    cnt = [b[:world * 8 * 4].view(torch.int64).view(2, 2, world) for b in bufs]
    for r in range(world):  # every rank sends (payload + FP8-like scales) before anyone receives
        x, idx, _ = inputs[r]
        scales = torch.rand(x.size(0), hidden // 128, device=dev)
        inputs[r] = inputs[r] + (scales.cpu(),)
        moe_ll.dispatch_send(x.to(dev), scales, idx.to(dev), num_max, ptrs, r, world, e_l, reg["x"], reg["s"],
                             reg["idx"], (0 * 2 + 1) * world * 8)
    slots = world * num_max
    for me in range(world):
        assert cnt[me][0, 1].tolist() == [num_max] * world
        moe_ll.wait_counters(cnt[me][0, 1], errs[me].addr, num_max, moe_ll.ERR_DISPATCH, 5.0)
        assert cnt[me][0, 1].tolist() == [0] * world and errs[me].read(sync=True)[0] == 0
        b = bufs[me]
        rows_x = b[reg["x"]:reg["x"] + slots * hidden * 2].view(dtype).view(slots, hidden)
        rows_s = b[reg["s"]:reg["s"] + slots * 4].view(torch.float32).view(slots, 1)
        all_idx = b[reg["idx"]:reg["idx"] + slots * k * 4].view(torch.int32).view(world, num_max, k)
        out_x = torch.zeros(e_l * slots + 1, hidden, dtype=dtype, device=dev)
        out_s = torch.zeros(e_l * slots + 1, 1, dtype=torch.float32, device=dev)
        count, src_info, layout_range, dst = place_tokens(rows_x, rows_s, all_idx, me, e_l, num_max, out_x, out_s)
        # the placement kernels (CUDA's path) give the torch reference's outputs bit for bit, the scales in
        # DeepEP's column-major layout, the stats accumulated
        got = _place_kernels(rows_x, rows_s, all_idx, me, e_l, ue8m0=False)
        assert torch.equal(got["x"][:e_l * slots], out_x[:-1]) and torch.equal(got["scales"], out_s[:-1].view(e_l, slots, 1))
        for name, ref_t in (("count", count), ("src_info", src_info), ("layout_range", layout_range), ("dst", dst)):
            assert torch.equal(got[name], ref_t), name
        assert torch.equal(got["stats"], 5 + count)
        ref = ref_dispatch(me, [(a, b_, c) for a, b_, c, _ in inputs], num_experts, world, num_max)
        ref_s = ref_dispatch(me, [(s_, b_, c) for _, b_, c, s_ in inputs], num_experts, world, num_max)
        for e, ((rows, src, per_src), (srows, _, _)) in enumerate(zip(ref, ref_s)):
            n = len(src)
            assert int(count[e]) == n and src_info[e, :n].tolist() == src
            assert torch.equal(out_x[e * slots:e * slots + n].cpu(), rows)
            assert torch.equal(out_s[e * slots:e * slots + n].cpu(), srows)

        # combine: experts return rows * 2; each source gets them in its [t, k] slots
        y = (got["x"][:e_l * slots] * 2).contiguous()
        moe_ll.combine_send(y, dst, ptrs, me, world, num_max, reg["comb"], (1 * 2 + 1) * world * 8)
    for me in range(world):
        assert cnt[me][1, 1].tolist() == [num_max * k] * world  # one count per (token slot, k) program
        moe_ll.wait_counters(cnt[me][1, 1], errs[me].addr, num_max * k, moe_ll.ERR_COMBINE, 5.0)
        x, idx, _, _ = inputs[me]
        t = x.size(0)
        slot_rows = bufs[me][reg["comb"]:reg["comb"] + num_max * k * hidden * 2].view(dtype).view(num_max, k, hidden)
        for j in range(k):
            sent = idx[:, j] >= 0
            assert torch.equal(slot_rows[:t][sent, j].cpu(), x[sent] * 2)
        w = inputs[me][2].to(dev)
        out = moe_ll_place.combine_reduce(slot_rows, idx.to(dev), w, torch.empty(t, hidden, dtype=dtype, device=dev))
        ref = torch.zeros(t, hidden)
        for j in range(k):
            ref += torch.where(idx[:, j:j + 1] >= 0, slot_rows[:t, j].float().cpu() * w[:, j:j + 1].cpu(), 0.0)
        assert torch.allclose(out.float().cpu(), ref.to(dtype).float(), rtol=1e-3, atol=1e-3)

    assert all(e.read(sync=True) == [0] * moe_ll.ERR_NUMEL for e in errs)

    # nobody sends: the wait gives up, records who it waited for (the lowest missing source), and does not
    # consume. The launch is asynchronous on GPU: the record is there once the kernel ran (read(sync=True)).
    cnt[0][0, 0, 1] = num_max  # source 1 arrived, source 0 did not
    cost = torch.full((world,), 7, dtype=torch.int64, device=dev)
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_DISPATCH, 1e-3, stats=cost)
    code, src, seen, expected = errs[0].read(sync=True)
    assert (code, src, seen, expected) == (moe_ll.ERR_DISPATCH, 0, 0, num_max)
    assert int(cost[0]) > 7 and int(cost[1]) == 7, "the wait cost goes to the source waited for"
    assert cnt[0][0, 0].tolist() == [0, num_max], "a wait that timed out must not consume"
    # a recorded error makes later waits return at once, consuming nothing
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_COMBINE, 60.0)
    assert errs[0].read(sync=True) == [moe_ll.ERR_DISPATCH, 0, 0, num_max] and cnt[0][0, 0].tolist() == [0, num_max]
    errs[0].clear()
    cnt[0][0, 0] = torch.tensor([num_max, 1])  # now source 1 is the one missing (one of its programs came)
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_COMBINE, 1e-3)
    assert errs[0].read(sync=True) == [moe_ll.ERR_COMBINE, 1, 1, num_max]


def _place_kernels(rows_x, rows_s, all_idx, me, e_l, ue8m0):
    """kernels/moe_ll_place.place into fresh outputs (stats starting at 5, scales column-major as DeepEP's)."""
    dev = rows_x.device
    n = all_idx.size(0) * all_idx.size(1)
    g = (rows_s.size(1) // 4 if ue8m0 else rows_s.size(1)) if rows_s is not None else 1
    out = {"x": torch.zeros(e_l * n + 1, rows_x.size(1), dtype=rows_x.dtype, device=dev),
           "scales": torch.zeros(e_l, g, n, dtype=torch.int32 if ue8m0 else torch.float32, device=dev).transpose(1, 2),
           "count": torch.empty(e_l, dtype=torch.int32, device=dev),
           "src_info": torch.empty(e_l, n, dtype=torch.int32, device=dev),
           "layout_range": torch.empty(e_l, all_idx.size(0), dtype=torch.int64, device=dev),
           "dst": torch.empty(n, all_idx.size(2), dtype=torch.int64, device=dev),
           "stats": torch.full((e_l,), 5, dtype=torch.int32, device=dev)}
    moe_ll_place.place(rows_x, rows_s, all_idx, me, e_l, out["x"], out["scales"], ue8m0, out["count"], out["src_info"],
                       out["layout_range"], out["dst"], out["stats"])
    return out


@pytest.mark.parametrize("world,num_max,k,routing", [(2, 8, 3, "random"), (3, 5, 4, "skewed"), (2, 4, 2, "repeat"),
                                                       (1, 3, 2, "all_dropped")])
def test_place_kernels_match_torch_reference(world, num_max, k, routing):
    """kernels/moe_ll_place.place == ll_layout.place_tokens (torch), incl. UE8M0 packing, tokens repeating an
    expert (more entries than slots: dropped the same way), empty slots; interpreter on CPU, GPU if present."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    e_l, hidden, groups = 3, 64, 8
    g = torch.Generator().manual_seed(world * 100 + num_max)
    idx = torch.randint(-1, world * e_l, (world, num_max, k), generator=g)
    if routing == "skewed":
        idx[:, :, 0] = e_l  # rank 1's first expert
    if routing == "repeat":  # every entry on expert 1 of rank 0: 2x more entries than its slots
        idx.fill_(1)
    if routing == "all_dropped":
        idx.fill_(-1)
    rows_x = torch.randn(world * num_max, hidden, generator=g).to(torch.float16)
    rows_s = torch.exp2(torch.randint(-8, 8, (world * num_max, groups), generator=g).float())  # pow-2, as UE8M0 needs
    for me in range(world):
        n = world * num_max
        out_x = torch.zeros(e_l * n + 1, hidden, dtype=torch.float16)
        out_s = torch.zeros(e_l * n + 1, groups)
        ref = place_tokens(rows_x, rows_s, idx, me, e_l, num_max, out_x, out_s)
        for ue8m0 in (False, True):
            got = _place_kernels(rows_x.to(dev), rows_s.to(dev), idx.to(dev).int(), me, e_l, ue8m0)
            for name, r in zip(("count", "src_info", "layout_range", "dst"), ref):
                assert torch.equal(got[name].cpu(), r), (name, got[name].cpu(), r)
            cnt = ref[0]
            for e in range(e_l):
                c = int(cnt[e])
                assert torch.equal(got["x"][e * n:e * n + c].cpu(), out_x[e * n:e * n + c])
                s_ref = out_s[e * n:e * n + c]
                want = pack_ue8m0(s_ref) if ue8m0 else s_ref
                assert torch.equal(got["scales"][e, :c].cpu(), want)
            assert torch.equal(got["stats"].cpu(), 5 + cnt)


@pytest.mark.gpu(min_gpus=1)
def test_fused_fp8_cast_in_send_kernel_bit_identical():
    """The send kernel's in-kernel FP8 cast (the triton path's) == per_token_cast_to_fp8, round_scale too."""
    dev = torch.device("cuda")
    t, hidden, k, num_max = 5, 384, 2, 6
    x = (torch.randn(t, hidden, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16).to(dev)
    x[1, :128] = 0  # an all-zero group: the 1e-4 floor
    idx = torch.zeros(t, k, dtype=torch.int64, device=dev)
    regions, nbytes = LowLatency.layout(num_max, hidden, 1, k)
    reg = regions[0]
    for round_scale in (False, True):
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        ptrs = torch.tensor([buf.data_ptr()], dtype=torch.int64, device=dev)
        moe_ll.dispatch_send(x, None, idx, num_max, ptrs, 0, 1, 1, reg["x"], reg["s"], reg["idx"], 0,
                             cast_fp8=True, round_scale=round_scale)
        q_ref, s_ref = per_token_cast_to_fp8(x, round_scale)
        q = buf[reg["x"]:reg["x"] + t * hidden].view(t, hidden)
        s = buf[reg["s"]:reg["s"] + t * 3 * 4].view(torch.float32).view(t, 3)
        assert torch.equal(s, s_ref), round_scale
        assert torch.equal(q, q_ref.view(torch.uint8)), round_scale
        assert buf[:8].view(torch.int64).item() == num_max  # one release per program (t slots + empty ones)


@pytest.mark.gpu(min_gpus=1)
def test_fp8_casts_bit_identical_on_cpu_and_gpu():
    """The tests quantize their references on the CPU and the ranks quantize on their GPU: both casts (the
    library's and test_moe.to_fp8) must give the same bits on either device (a `/ 448.0` would not: CUDA
    multiplies by the reciprocal of a CPU-scalar divisor)."""
    from test_moe import to_fp8

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 3
    for name, cast in (("per_token_cast_to_fp8", per_token_cast_to_fp8),
                       ("round_scale", lambda t: per_token_cast_to_fp8(t, round_scale=True)), ("to_fp8", to_fp8)):
        q_cpu, s_cpu = cast(x)
        q_gpu, s_gpu = cast(x.cuda())
        assert torch.equal(s_gpu.cpu(), s_cpu), f"{name}: scales differ between CPU and GPU"
        assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)), f"{name}: fp8 bits differ"
        assert torch.equal(per_token_cast_back(q_gpu, s_gpu).cpu(), per_token_cast_back(q_cpu, s_cpu))


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
