"""MoE dispatch/combine (DeepEP semantics) against a plain single-process reference.

Every rank builds every rank's inputs from seeds, so it can compute its own expected outputs
without moving tensors between processes; the reference is written with loops over ranks.
"""
import pytest
import torch
import torch.distributed as dist

from turbo_dist.moe import Buffer, Config, EventOverlap
from turbo_dist.moe.layout import dispatch_layout, token_positions
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import on_gpu, rank_device

HIDDEN, TOPK = 256, 4


# ----------------------------------------------------------------------------- inputs and reference
def make_inputs(rank, world, num_tokens, num_experts, routing, dtype=torch.bfloat16, seed=0, hidden=HIDDEN,
                topk=TOPK):
    """Inputs of `rank` (CPU tensors), reproducible from any process."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    t = 0 if routing == "empty" and rank == world - 1 else num_tokens + 3 * rank  # ranks differ in size
    x = torch.randn(t, hidden, generator=g).to(dtype)
    scores = torch.rand(t, num_experts, generator=g)
    per_rank = num_experts // world
    if routing == "one_rank":  # everything to the last rank's experts
        idx = scores[:, -per_rank:].topk(min(topk, per_rank), dim=1).indices + num_experts - per_rank
        idx = torch.cat([idx, torch.full((t, topk - idx.size(1)), -1, dtype=torch.int64)], 1)
    else:
        idx = scores.topk(topk, dim=1).indices
    if routing in ("random", "empty"):
        idx = torch.where(torch.rand(t, topk, generator=g) < 0.15, torch.full_like(idx, -1), idx)
    if routing == "skewed":  # most tokens pick rank 0's experts first
        idx[: t * 3 // 4, 0] = torch.randint(0, per_rank, (t * 3 // 4,), generator=g)
        idx = _dedup(idx)
    if routing == "all_dropped":
        idx = torch.full_like(idx, -1)
    w = torch.rand(t, topk, generator=g)
    return x, idx, w


def _dedup(idx):
    out = idx.clone()
    for i in range(out.size(0)):
        seen = set()
        for j in range(out.size(1)):
            if out[i, j].item() in seen:
                out[i, j] = -1
            seen.add(out[i, j].item())
    return out


def ref_dispatch(me, inputs, num_experts, world):
    """What rank `me` receives: rows by source rank, then token order."""
    per = num_experts // world
    lo, hi = me * per, (me + 1) * per
    xs, idxs, ws, srcs, counts = [], [], [], [], [0] * per
    for x, idx, w in inputs:
        mine = (idx >= lo) & (idx < hi)
        sel = mine.any(1)
        xs.append(x[sel])
        idxs.append(torch.where(mine, idx - lo, torch.full_like(idx, -1))[sel])
        ws.append(torch.where(mine, w, torch.zeros_like(w))[sel])
        srcs.append(torch.nonzero(sel).flatten().to(torch.int32))
        for e in range(per):
            counts[e] += int((idx == lo + e).sum())
    return torch.cat(xs), torch.cat(idxs), torch.cat(ws), torch.cat(srcs), counts


def expert_fn(recv_x, rank):
    """What the 'experts' of `rank` send back (deterministic, rank dependent, stays in recv_x's dtype)."""
    return (recv_x.float() * (rank + 1) + 0.5 * rank).to(recv_x.dtype)


def ref_combine(me, inputs, num_experts, world, fn=expert_fn):
    """sum over ranks (in rank order, fp32) of what each rank sends back for my tokens."""
    x_me = inputs[me][0]
    acc = torch.zeros(x_me.shape, dtype=torch.float32)
    for r in range(world):
        rx, _, _, src, _ = ref_dispatch(r, inputs, num_experts, world)
        sizes = [int(((inp[1] >= r * (num_experts // world)) & (inp[1] < (r + 1) * (num_experts // world)))
                     .any(1).sum()) for inp in inputs]
        start = sum(sizes[:me])
        rows = fn(rx, r)[start:start + sizes[me]]
        acc.index_add_(0, src[start:start + sizes[me]].long(), rows.float())
    return acc.to(x_me.dtype)


def to_fp8(x):
    """Per-token, per-128-channel e4m3 cast (DeepEP's test helper, our own code).

    Bit-identical on CPU and CUDA, so a reference quantized on the CPU matches what a rank quantized on its
    GPU: `amax / 448.0` would be a true division on CPU but a multiply by the fp32 reciprocal on CUDA
    (PyTorch's scalar-divisor shortcut), so the scale is that product on both."""
    t, h = x.shape
    xv = x.float().view(t, h // 128, 128)
    amax = xv.abs().amax(dim=2).clamp(min=1e-4)
    scales = amax * (1.0 / 448.0)
    q = (xv / scales.unsqueeze(2)).to(torch.float8_e4m3fn).view(t, h)
    return q, scales.contiguous()


def from_fp8(q, scales):
    t, h = q.shape
    return (q.float().view(t, h // 128, 128) * scales.unsqueeze(2)).view(t, h)


def make_buffer(transport, num_max_tokens=64, hidden=HIDDEN, topk=TOPK):
    """A Buffer on `transport` (None: the default pick). For "nvlink" without a GPU (one rank on CPU), the
    transport object is swapped in by hand: its Triton kernels then run in the interpreter, the only
    peer being the rank itself (Buffer refuses "nvlink" without peer access, rightly, for world > 1)."""
    if transport != "nvlink":
        return Buffer(None, transport=transport) if transport else Buffer(None)
    world = dist.get_world_size()
    nbytes = Buffer.get_nvl_buffer_size_hint(num_max_tokens, hidden, world, topk, dtype=torch.float32)
    if on_gpu():
        return Buffer(None, num_nvl_bytes=nbytes, transport="nvlink")
    assert world == 1, "the nvlink transport runs on CPU only for a single rank (interpreter self-loop)"
    from turbo_dist.moe.nvlink import NvlinkTransport

    buf = Buffer(None, transport="collective")
    buf._impl = NvlinkTransport(buf.runtime, nbytes)
    buf.transport = "nvlink"
    return buf


# ----------------------------------------------------------------------------- rank bodies
def _dispatch_combine_body(rank, world, routing, dtype, num_tokens, num_experts, transport):
    dev = rank_device()
    buf = make_buffer(transport, num_tokens + 3 * world)
    inputs = [make_inputs(r, world, num_tokens, num_experts, routing, dtype) for r in range(world)]
    x, idx, w = (t.to(dev) for t in inputs[rank])
    exp_x, exp_idx, exp_w, exp_src, exp_counts = ref_dispatch(rank, inputs, num_experts, world)

    n_rank, n_rdma, n_expert, in_rank, ev = buf.get_dispatch_layout(idx, num_experts)
    assert n_rdma is None and isinstance(ev, EventOverlap)
    ref_n_rank, ref_n_expert, ref_in_rank = _ref_layout(inputs[rank][1], num_experts, world)
    assert torch.equal(n_rank.cpu(), ref_n_rank) and torch.equal(n_expert.cpu(), ref_n_expert)
    assert torch.equal(in_rank.cpu(), ref_in_rank)
    assert n_rank.dtype == torch.int32 and n_expert.dtype == torch.int32 and in_rank.dtype == torch.bool

    for alignment in (1, 8):
        recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
            x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
            topk_idx=idx, topk_weights=w, expert_alignment=alignment)
        assert torch.equal(recv_x.cpu(), exp_x), "dispatch must move rows bit-exactly"
        assert torch.equal(recv_idx.cpu(), exp_idx) and torch.equal(recv_w.cpu(), exp_w)
        assert counts == [-(-c // alignment) * alignment for c in exp_counts]
        assert torch.equal(handle[3].cpu(), exp_src)
        # DeepEP's handle[0]: tokens from rank i occupy rows [rpm[i-1][me], rpm[i][me]).
        rpm = handle[0].cpu()
        sizes = [int(((inp[1] >= rank * (num_experts // world)) & (inp[1] < (rank + 1) * (num_experts // world)))
                     .any(1).sum()) for inp in inputs]
        assert rpm[:, rank].tolist() == list(torch.tensor(sizes).cumsum(0))

    # Without top-k, then a cached dispatch of another payload, then combine (+ weights, + bias).
    recv_x2, none_idx, none_w, counts2, handle2, _ = buf.dispatch(
        x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    assert none_idx is None and none_w is None and counts2 == exp_counts and torch.equal(recv_x2.cpu(), exp_x)
    cached, c_idx, c_w, c_counts, c_handle, _ = buf.dispatch((x.float() * 2).to(dtype), handle=handle)
    assert c_idx is None and c_w is None and c_counts is None and c_handle is None
    assert torch.equal(cached.cpu(), (exp_x.float() * 2).to(dtype))

    y = expert_fn(recv_x, rank)
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
    assert combined.dtype == dtype and combined.shape == x.shape
    assert torch.equal(combined.cpu(), ref_combine(rank, inputs, num_experts, world)), "combine mismatch"
    # Weights of other ranks' experts arrive as 0, so summing them back gives the original (dropped slots: 0).
    assert torch.equal(combined_w.cpu(), torch.where(inputs[rank][1] >= 0, inputs[rank][2], 0.0))
    bias = torch.ones_like(x, dtype=torch.float32)
    with_bias, _, _ = buf.combine(y, handle, bias=(bias.to(dtype), bias.to(dtype)))
    ref_bias = (ref_combine(rank, inputs, num_experts, world).float() + 2.0).to(dtype)
    assert torch.allclose(with_bias.float().cpu(), ref_bias.float(), rtol=1e-2, atol=1e-2)

    # num_worst_tokens: fixed-size outputs, padding rows marked, empty list; combine accepts padded x.
    worst = max(sum(int(inp[0].size(0)) for inp in inputs), 1)
    wx, widx, ww, wcounts, whandle, _ = buf.dispatch(
        x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
        topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
    n = exp_x.size(0)
    assert wcounts == [] and wx.size(0) == worst and widx.size(0) == worst
    assert torch.equal(wx[:n].cpu(), exp_x) and torch.equal(widx[:n].cpu(), exp_idx)
    assert bool((widx[n:] == -1).all()) and bool((ww[n:] == 0).all())
    padded_y = torch.cat([expert_fn(wx[:n], rank), torch.full_like(wx[n:], 7)])
    wcomb, _, _ = buf.combine(padded_y, whandle)
    assert torch.equal(wcomb.cpu(), ref_combine(rank, inputs, num_experts, world))
    return n


def _ref_layout(idx, num_experts, world):
    per = num_experts // world
    n_expert = torch.tensor([int((idx == e).sum()) for e in range(num_experts)], dtype=torch.int32)
    in_rank = torch.stack([((idx >= r * per) & (idx < (r + 1) * per)).any(1) for r in range(world)], 1) \
        if idx.size(0) else torch.zeros(0, world, dtype=torch.bool)
    return in_rank.sum(0).to(torch.int32), n_expert, in_rank


def _fp8_body(rank, world, num_tokens, num_experts, transport):
    dev = rank_device()
    buf = make_buffer(transport, num_tokens + 3 * world)
    inputs = [make_inputs(r, world, num_tokens, num_experts, "random", torch.float32) for r in range(world)]
    x, idx, w = (t.to(dev) for t in inputs[rank])
    q, s = to_fp8(x)
    n_rank, _, n_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    (rq, rs), ridx, rw, counts, handle, _ = buf.dispatch((q, s), num_tokens_per_rank=n_rank, is_token_in_rank=in_rank,
                                                        num_tokens_per_expert=n_expert, topk_idx=idx, topk_weights=w)
    assert rq.dtype == torch.float8_e4m3fn and rs.dtype == torch.float32
    fp8_inputs = [(from_fp8(*to_fp8(inp[0])), inp[1], inp[2]) for inp in inputs]
    exp_x, exp_idx, _, _, _ = ref_dispatch(rank, fp8_inputs, num_experts, world)
    assert torch.equal(from_fp8(rq.cpu(), rs.cpu()), exp_x), "FP8 rows and scales must arrive bit-exactly"
    assert torch.equal(ridx.cpu(), exp_idx)
    (cq, cs), _, _, _, _, _ = buf.dispatch((q, s), handle=handle)
    assert torch.equal(cq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(cs, rs)
    # FP8 round trip: dispatch FP8, experts dequantize, combine in bf16.
    back, _, _ = buf.combine(from_fp8(rq, rs).to(torch.bfloat16), handle)
    ref = ref_combine(rank, [(a.to(torch.bfloat16), b, c) for a, b, c in fp8_inputs], num_experts, world,
                      fn=lambda rx, r: rx)
    assert torch.equal(back.cpu(), ref)
    return True


def _async_and_errors_body(rank, world, transport):
    dev = rank_device()
    buf = make_buffer(transport, 16 + 3 * world)
    num_experts = 4 * world
    x, idx, w = (t.to(dev) for t in make_inputs(rank, world, 16, num_experts, "random"))
    prev = Buffer.capture()
    n_rank, _, n_expert, in_rank, ev = buf.get_dispatch_layout(idx, num_experts, previous_event=prev,
                                                               async_finish=True, allocate_on_comm_stream=True)
    ev.current_stream_wait()
    recv_x, _, _, _, handle, ev = buf.dispatch(x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank,
                                               num_tokens_per_expert=n_expert, topk_idx=idx, topk_weights=w,
                                               previous_event=Buffer.capture(), async_finish=True,
                                               config=Config(8, 4, 64))
    with ev:
        pass
    out, _, ev = buf.combine(recv_x, handle, async_finish=True)
    ev.current_stream_wait()
    assert out.shape == x.shape

    with pytest.raises(TypeError, match="int64"):
        buf.get_dispatch_layout(idx.int(), num_experts)
    if world > 1:  # at world 1 every expert count divides evenly
        with pytest.raises(ValueError, match="divisible"):
            buf.get_dispatch_layout(idx, num_experts + 1)
    with pytest.raises(ValueError, match="num_tokens_per_rank"):
        buf.dispatch(x, topk_idx=idx)
    with pytest.raises(TypeError, match="bf16"):
        buf.dispatch(x.to(torch.int32), num_tokens_per_rank=n_rank, is_token_in_rank=in_rank,
                     num_tokens_per_expert=n_expert)
    with pytest.raises(ValueError, match="cached handle"):
        buf.dispatch(x, handle=handle, topk_idx=idx)
    # num_worst_tokens below the busiest rank's count: every rank raises (none is left waiting in the exchange);
    # the nvlink transport checks num_worst_tokens on the device (no host sync) and reports it at the next call
    if handle.max_recv_tokens > 1 and transport != "nvlink":
        with pytest.raises(ValueError, match=f"smaller than the {handle.max_recv_tokens} tokens"):
            buf.dispatch(x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
                         topk_idx=idx, topk_weights=w, num_worst_tokens=handle.max_recv_tokens - 1)
    with pytest.raises(ValueError, match="rows"):
        buf.combine(recv_x[:-1] if recv_x.size(0) else torch.zeros(1, HIDDEN, dtype=x.dtype, device=dev), handle)
    ones = torch.ones_like(x)
    with pytest.raises(ValueError, match="a pair of tensors"):  # a third bias would be dropped by some transports
        buf.combine(recv_x, handle, bias=(ones, ones, ones))
    with pytest.raises(ValueError, match="x's dtype"):
        buf.combine(recv_x, handle, bias=ones.float())
    with pytest.raises(ValueError, match="float32"):
        buf.dispatch((x.to(torch.float8_e4m3fn), torch.ones(x.size(0), 1, device=dev)),
                     num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    # A handle of another Buffer (transport or group size) is refused before anything moves.
    from turbo_dist.moe import DispatchHandle

    other = "hierarchical" if transport != "hierarchical" else "collective"
    forged = DispatchHandle(tuple(handle), **{**handle.__dict__, "transport": other})
    with pytest.raises(ValueError, match=f"from a Buffer on the '{other}' transport but this Buffer uses"):
        buf.combine(recv_x, forged)
    with pytest.raises(ValueError, match=f"from a Buffer on the '{other}' transport"):
        buf.dispatch(x, handle=forged)
    wide = handle.is_token_in_rank.new_zeros(handle.is_token_in_rank.size(0), world + 1)
    forged = DispatchHandle(tuple(handle)[:4] + (wide, handle[5]), **handle.__dict__)
    with pytest.raises(ValueError, match=f"group of {world + 1} ranks but this Buffer's group has {world}"):
        buf.combine(recv_x, forged)
    with pytest.raises(TypeError, match="needs the handle"):
        buf.combine(recv_x, tuple(handle))
    # Unsupported uses say what is unsupported and what to do instead (README "Not supported").
    with pytest.raises(TypeError, match="mpi4py communicator"):  # comm= (tests/test_runtime_mpi.py)
        Buffer(None, comm=object())
    with pytest.raises(ValueError, match="'hierarchical'"):
        Buffer(buf.group, transport="rdma")
    with pytest.raises(RuntimeError, match="no RDMA-side buffer"):  # not in low-latency mode
        buf.get_local_buffer_tensor(torch.float32, use_rdma_buffer=True)
    if transport == "collective":
        with pytest.raises(RuntimeError, match="collective transport has no symmetric buffer"):
            buf.get_local_buffer_tensor(torch.float32)
    with pytest.raises(NotImplementedError, match=f"on the {transport} transport .* transport='hierarchical'"):
        buf.dispatch(x, num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32, device=dev),
                     num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    # (low-latency and internode modes are tested with their own modules)
    with pytest.raises(ValueError, match="even"):
        Buffer.set_num_sms(3)
    # DeepEP's positional order (..., allow_mnnvl, use_fabric, explicitly_destroy, enable_shrink, comm), then a
    # destroyed Buffer says so on use
    gone = Buffer(buf.group, 0, 0, False, 24, True, False, False, True)
    assert gone.explicitly_destroy is True and gone.enable_shrink is False
    gone.destroy()
    with pytest.raises(RuntimeError, match="was destroyed"):
        gone.dispatch(x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    return True


# ----------------------------------------------------------------------------- tests
@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("routing", ["random", "skewed", "one_rank", "empty", "all_dropped"])
def test_dispatch_combine_collective(world_size, routing):
    num_experts = 4 * world_size
    got = run_distributed(_dispatch_combine_body, world_size,
                          args=(routing, torch.bfloat16, 24, num_experts, "collective"))
    if routing == "all_dropped":
        assert got == [0] * world_size
    else:
        assert sum(got) > 0


@pytest.mark.dist
def test_dispatch_combine_fp32_payload():
    run_distributed(_dispatch_combine_body, 2, args=("random", torch.float32, 8, 8, "collective"))


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
def test_fp8_dispatch_collective(world_size):
    assert all(run_distributed(_fp8_body, world_size, args=(20, 4 * world_size, "collective")))


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
def test_async_flags_and_errors(world_size):
    assert all(run_distributed(_async_and_errors_body, world_size, args=("collective",)))


def test_layout_single_process():
    idx = torch.tensor([[0, 5, -1], [7, 6, 4], [-1, -1, -1], [1, 1, 2]], dtype=torch.int64)
    n_rank, n_expert, in_rank = dispatch_layout(idx, 8, 2)
    assert n_rank.tolist() == [2, 2]
    assert n_expert.tolist() == [1, 2, 1, 0, 1, 1, 1, 1]
    assert in_rank.tolist() == [[True, True], [False, True], [False, False], [True, False]]
    assert token_positions(in_rank).tolist() == [[0, 0], [-1, 1], [-1, -1], [1, -1]]


@pytest.mark.parametrize("tokens,topk,experts,ranks", [(37, 3, 8, 2), (200, 8, 256, 4), (5, 2, 48, 24), (0, 4, 16, 2),
                                                       (64, 6, 64, 64)])
def test_layout_kernel_matches_torch_ops(tokens, topk, experts, ranks):
    """kernels/moe_layout (CUDA's path; interpreter on CPU) == the torch ops, incl. -1 slots, a token picking
    two experts of one rank, more ranks than the kernel's rank block covers per token block."""
    from turbo_dist.kernels import moe_layout
    from turbo_dist.moe.layout import dispatch_layout_torch

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator().manual_seed(tokens + experts)
    idx = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
    idx = torch.where(torch.rand(tokens, topk, generator=g) < 0.2, torch.full_like(idx, -1), idx)
    want = dispatch_layout_torch(idx, experts, ranks)
    got = moe_layout.dispatch_layout(idx.to(dev), experts, ranks)
    for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b), name
    if tokens:
        assert int(want[0].sum()) > 0


def test_config_validation():
    Config(24, 6, 256)
    with pytest.raises(ValueError):
        Config(24, 256, 256)
    assert Buffer.get_dispatch_config(8).num_sms == Buffer.num_sms
    assert Config(24, 8, 256).get_nvl_buffer_size_hint(7168 * 2, 8) > 0
    # DeepEP's rule: no RDMA bytes within one NVLink domain (8 ranks), some beyond
    assert Config().get_rdma_buffer_size_hint(7168 * 2, 8) == 0 < Config().get_rdma_buffer_size_hint(7168 * 2, 16)


def _token_dispatcher_body(rank, world):
    from turbo_dist.moe import TokenDispatcher

    dev = rank_device()
    num_experts = 2 * world
    x, idx, w = (t.to(dev) for t in make_inputs(rank, world, 12, num_experts, "random", dtype=torch.float32))
    buf = Buffer(None, transport="collective")
    other = dist.new_group(list(range(world)))  # same ranks, another process group
    with pytest.raises(ValueError, match="not the process group of `buffer`"):
        TokenDispatcher(num_experts, other, buffer=buf)
    with pytest.raises(ValueError, match="set them on that Buffer"):
        TokenDispatcher(num_experts, buffer=buf, num_nvl_bytes=1 << 20)
    with pytest.raises(TypeError, match="turbo_dist.moe.Buffer"):
        TokenDispatcher(num_experts, buffer=object())
    td = TokenDispatcher(num_experts, buffer=buf, expert_alignment=4)
    expert_in, tokens_per_expert = td.dispatch(x, idx, w)
    assert all(c % 4 == 0 for c in tokens_per_expert) and sum(tokens_per_expert) == expert_in.size(0)
    # Padded rows too many or too few are refused before anything moves, and the pair stays usable.
    for bad in (torch.cat([expert_in, expert_in[:1]]), expert_in[:-1]):
        with pytest.raises(ValueError, match=f"expert_output must be \\[{expert_in.size(0)}, width\\]"):
            td.combine(bad)
    # Identity experts: every token comes back as x times the sum of the weights of its valid slots.
    y = td.combine(expert_in)
    expected = x * torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1, keepdim=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    return True


def _autograd_body(rank, world, transport):
    """moe.dispatch -> experts -> moe.combine, differentiated, against single-process autograd: a token's output
    is the sum over the ranks it went to of that rank's expert function of (x, the token's weights for that
    rank's experts), so every rank can build its own reference from its own inputs."""
    from turbo_dist import moe

    dev = rank_device()
    num_experts, per = 2 * world, 2
    buf = make_buffer(transport, 16 + 3 * world, hidden=16, topk=2)
    x0, idx, w0 = make_inputs(rank, world, 10, num_experts, "random", torch.float32, hidden=16, topk=2)
    x, w = (t.clone().to(dev).requires_grad_(True) for t in (x0, w0))
    probe = torch.linspace(-1, 1, 16, device=dev)
    rx, ridx, rw, _, handle = moe.dispatch(buf, x, idx.to(dev), w, num_experts=num_experts)
    y = moe.combine(buf, rx * (1 + (rw * rw).sum(1, keepdim=True)) * (rank + 1), handle)
    (y * probe).sum().backward()

    xr, wr = (t.clone().requires_grad_(True) for t in (x0, w0))
    yr = torch.zeros_like(xr)
    for r in range(world):
        mine = (idx >= r * per) & (idx < (r + 1) * per)
        wl = torch.where(mine, wr, torch.zeros_like(wr))
        fr = xr * (1 + (wl * wl).sum(1, keepdim=True)) * (r + 1)
        yr = yr + torch.where(mine.any(1, keepdim=True), fr, torch.zeros_like(fr))
    (yr * probe.cpu()).sum().backward()
    for name, got, ref in (("y", y, yr), ("dx", x.grad, xr.grad), ("dtopk_weights", w.grad, wr.grad)):
        torch.testing.assert_close(got.detach().cpu(), ref.detach(), rtol=1e-5, atol=1e-5, msg=name)
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_dispatch_combine_autograd_matches_single_process(world_size):
    assert all(run_distributed(_autograd_body, world_size, args=("collective",)))


@pytest.mark.dist
def test_token_dispatcher_identity_experts_and_group_check():
    assert run_distributed(_token_dispatcher_body, 2) == [True, True]


def test_size_hints_refuse_bad_counts():
    """The size hints take counts >= 1 (numpy ints too) and name the argument that is not (a negative token
    count returned a negative byte count, num_ranks=0 a positive one)."""
    import numpy as np

    assert Buffer.get_nvl_buffer_size_hint(np.int64(8), 64, 2) > 0
    for args, name in (((-5, 7168, 8), "num_max_tokens_per_rank"), ((8, 7168, 0), "num_ranks"),
                       ((8, 0, 2), "hidden"), ((8.0, 64, 2), "num_max_tokens_per_rank")):
        with pytest.raises(ValueError, match=f"get_nvl_buffer_size_hint: {name} must be an int >= 1"):
            Buffer.get_nvl_buffer_size_hint(*args)
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank must be an int >= 1"):
        Buffer.get_low_latency_rdma_size_hint(-1, 7168, 8, 256)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        Buffer.get_low_latency_rdma_size_hint(8, 7168, 8, 0)


def test_autograd_entries_refuse_non_tensors():
    """moe.dispatch / combine take a Buffer first and tensors; TokenDispatcher.dispatch tensors (were
    AttributeErrors from inside)."""
    from turbo_dist import moe

    x, idx = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="takes a turbo_dist.moe.Buffer first, got NoneType"):
        moe.dispatch(None, x, idx, num_experts=2)
    with pytest.raises(TypeError, match="takes a turbo_dist.moe.Buffer first, got str"):
        moe.combine("buf", x, None)
    with pytest.raises(TypeError, match="TokenDispatcher.dispatch: topk_idx must be a tensor, got NoneType"):
        moe.TokenDispatcher.dispatch(object.__new__(moe.TokenDispatcher), x, None, torch.ones(4, 2))
