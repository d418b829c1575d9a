"""The `nvlink` MoE transport against the `collective` one: bit-exact dispatch/combine, FP8, backward, errors.

On GPU (NCCL, one GPU per rank) the compiled Triton kernels write into peers' symmetric buffers;
world_size=1 is a self-loop through the same kernels. Without a GPU the same kernels run under
TRITON_INTERPRET=1 for a single rank (its only peer is itself): fp16/fp32 payloads, tiny sizes.
"""
import pytest
import torch

import turbo_dist.moe as moe
from turbo_dist.moe import Buffer, Config
from turbo_dist.testing import run_distributed

from dist_utils import rank_device
from test_moe import (_async_and_errors_body, _dispatch_combine_body, _fp8_body, expert_fn, from_fp8, make_buffer,
                      make_inputs, to_fp8)

HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter self-loop; on GPU the compiled kernels are tested")


def _gpu_worlds(*sizes):
    return [pytest.param(s, marks=[pytest.mark.gpu(min_gpus=s)], id=f"w{s}") for s in sizes]


def _nothing_received(routing, world_size):
    """Routings after which no rank receives a row: every expert slot dropped, or "empty" (the last rank has no
    tokens, see test_moe.make_inputs) on one rank, where the last rank is the only one."""
    return routing == "all_dropped" or (routing == "empty" and world_size == 1)


# ----------------------------------------------------------------------------- rank bodies
def _outputs_equal(a, b, what):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert a is not None and b is not None, f"{what}: one transport returned None"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a.cpu(), b.cpu()), f"{what}: nvlink differs from collective"
    else:
        assert a == b, f"{what}: {a} vs {b}"


def _compare_body(rank, world, routing, dtype, num_tokens, num_experts, hidden, num_sms):
    """Every output of the nvlink transport equals the collective transport's, bit for bit."""
    dev = rank_device()
    topk = 4
    coll = make_buffer("collective")
    nvl = make_buffer("nvlink", num_tokens + 3 * world, hidden, topk)
    assert nvl.transport == "nvlink"
    cfg = Config(num_sms, 4, 64)
    x, idx, w = (t.to(dev) for t in make_inputs(rank, world, num_tokens, num_experts, routing, dtype, hidden=hidden,
                                                 topk=topk))
    n_rank, _, n_expert, in_rank, _ = coll.get_dispatch_layout(idx, num_experts)
    kw = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=idx,
              topk_weights=w)
    outs = {}
    for name, buf in (("collective", coll), ("nvlink", nvl)):
        o = {}
        o["recv"] = buf.dispatch(x, expert_alignment=4, config=cfg, **kw)
        recv_x, recv_idx, recv_w, _, handle, _ = o["recv"]
        o["cached"] = buf.dispatch((x.float() * 3 - 1).to(dtype), handle=handle, config=cfg)[0]
        y = expert_fn(recv_x, rank)
        bias = (torch.randn(x.shape, generator=torch.Generator().manual_seed(rank)) / 4).to(dtype).to(dev)
        o["combine"] = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=cfg)[:2]
        o["combine_plain"] = buf.combine(y, handle)[0]
        worst = max(world * (num_tokens + 3 * world), 1)
        o["worst"] = buf.dispatch(x, num_worst_tokens=worst, config=cfg, **kw)
        wx, widx, ww, _, whandle, _ = o["worst"]
        o["worst_cached"] = buf.dispatch(x, handle=whandle, config=cfg)[0]
        o["worst_combine"] = buf.combine(wx, whandle, topk_weights=ww, config=cfg)[:2]
        if hidden % 128 == 0:
            q, s = to_fp8(x.float())
            (rq, rs), _, _, counts, fhandle, _ = buf.dispatch((q, s), **kw)
            o["fp8"] = (rq, rs, counts, fhandle[3])
            o["fp8_cached"] = buf.dispatch((q, s), handle=fhandle)[0]
            o["fp8_combine"] = buf.combine(from_fp8(rq, rs).to(dtype), fhandle)[0]
        outs[name] = o
    c, n = outs["collective"], outs["nvlink"]
    for i, what in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")):
        _outputs_equal(c["recv"][i], n["recv"][i], what)
    for i in (0, 1, 3):  # rank_prefix_matrix, num_tokens_matrix, recv_src_idx
        _outputs_equal(c["recv"][4][i], n["recv"][4][i], f"handle[{i}]")
    _outputs_equal(c["cached"], n["cached"], "cached dispatch")
    _outputs_equal(c["combine"][0], n["combine"][0], "combine (+bias)")
    _outputs_equal(c["combine"][1], n["combine"][1], "combined topk_weights")
    _outputs_equal(c["combine_plain"], n["combine_plain"], "combine")
    num_recv = c["recv"][0].size(0)
    for i, what in enumerate(("worst recv_x", "worst recv_topk_idx", "worst recv_topk_weights")):
        _outputs_equal(c["worst"][i][:num_recv], n["worst"][i][:num_recv], what)
    assert bool((n["worst"][1][num_recv:] == -1).all()) and bool((n["worst"][2][num_recv:] == 0).all())
    assert n["worst"][3] == [] and n["worst"][4].num_recv_tokens is None, "num_worst_tokens: no host sync"
    _outputs_equal(c["worst_cached"][:num_recv], n["worst_cached"][:num_recv], "worst cached dispatch")
    _outputs_equal(c["worst_combine"][0], n["worst_combine"][0], "worst combine")
    _outputs_equal(c["worst_combine"][1], n["worst_combine"][1], "worst combined weights")
    if "fp8" in c:
        for a, b, what in zip(c["fp8"], n["fp8"], ("fp8 rows", "fp8 scales", "fp8 counts", "fp8 src")):
            _outputs_equal(a, b, what)
        _outputs_equal(c["fp8_cached"][0], n["fp8_cached"][0], "fp8 cached rows")
        _outputs_equal(c["fp8_cached"][1], n["fp8_cached"][1], "fp8 cached scales")
        _outputs_equal(c["fp8_combine"], n["fp8_combine"], "fp8 round trip combine")
    nvl._impl.check_error(sync=True)
    return num_recv


def _backward_body(rank, world, dtype, num_tokens, num_experts, hidden):
    """Gradients through moe.dispatch/moe.combine are the same on both transports."""
    dev = rank_device()
    grads = {}
    for transport in ("collective", "nvlink"):
        buf = make_buffer(transport, num_tokens + 3 * world, hidden)
        x0, idx, w0 = make_inputs(rank, world, num_tokens, num_experts, "random", dtype, hidden=hidden)
        x = x0.to(dev).requires_grad_(True)
        w = w0.to(dev).requires_grad_(True)
        idx = idx.to(dev)
        recv_x, recv_idx, recv_w, counts, handle = moe.dispatch(buf, x, idx, w, num_experts=num_experts)
        scale = torch.arange(1, hidden + 1, device=dev, dtype=torch.float32) / hidden
        h = (recv_x.float() * scale * (1 + recv_w.sum(1, keepdim=True))).to(dtype)
        y = moe.combine(buf, h, handle)
        (y.float() * torch.linspace(-1, 1, hidden, device=dev)).sum().backward()
        grads[transport] = (y.detach(), x.grad, w.grad)
    for a, b, what in zip(grads["collective"], grads["nvlink"], ("y", "grad x", "grad topk_weights")):
        _outputs_equal(a, b, what)
    return True


def _errors_body(rank, world):
    """Too small a buffer: ValueError naming num_nvl_bytes; a wait that cannot finish: RuntimeError naming the peer."""
    from turbo_dist.kernels import moe_nvlink as K
    from turbo_dist.moe.nvlink import NvlinkTransport

    dev = rank_device()
    num_experts, hidden = 4 * world, 128
    x, idx, w = (t.to(dev) for t in make_inputs(rank, world, 32, num_experts, "one_rank", torch.float32,
                                                 hidden=hidden))
    buf = make_buffer("nvlink", 4, hidden)  # room for ~4 tokens per rank; the last rank gets ~32 * world
    n_rank, _, n_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    kw = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=idx)
    with pytest.raises(ValueError, match="num_nvl_bytes >= "):
        buf.dispatch(x, **kw)
    with pytest.raises(ValueError, match="num_nvl_bytes >= "):
        buf.dispatch(x, num_worst_tokens=1 << 20, **kw)  # refused before any kernel
    # The buffer still works for a batch that fits (every rank raised alike: sequences stay aligned).
    n_rank2, _, n_expert2, in_rank2, _ = buf.get_dispatch_layout(idx[:2], num_experts)
    out = buf.dispatch(x[:2], num_tokens_per_rank=n_rank2, is_token_in_rank=in_rank2, num_tokens_per_expert=n_expert2,
                       topk_idx=idx[:2])
    assert out[0].size(0) == (2 * world if rank == world - 1 else 0)
    buf._impl.check_error(sync=True)
    # num_worst_tokens smaller than what a rank receives: the device guard trips on every rank alike.
    big = make_buffer("nvlink", 64, hidden)
    with_worst = big.dispatch(x, num_worst_tokens=1, **kw)
    assert with_worst[0].size(0) == 1
    with pytest.raises(ValueError, match="num_worst_tokens"):
        big._impl.check_error(sync=True)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        big.dispatch(x, **kw)  # sticky: the Buffer reports it at every later call
    # A bounded wait: wait for an epoch nobody will ever signal.
    t = make_buffer("nvlink", 8, hidden)._impl
    assert isinstance(t, NvlinkTransport)
    t.timeout_s = 0.05
    outs = {"x": torch.empty(0, hidden, dtype=torch.int32, device=dev),
            "src": torch.empty(0, dtype=torch.int32, device=dev)}
    bufs = {"x": torch.empty(1, hidden, dtype=torch.int32, device=dev),
            "src": torch.empty(1, dtype=torch.int32, device=dev)}
    num_recv = torch.zeros(1, dtype=torch.int32, device=dev)
    K.dispatch_recv(bufs, outs, num_recv, 0, t.sig_local, t.err, t.epoch + 1000, world, 1, 128, t.flag_off,
                    t.timeout_s, 1)
    with pytest.raises(RuntimeError, match="peer rank 0 timed out"):
        t.check_error(sync=True)
    return True


# ----------------------------------------------------------------------------- CPU: interpreter self-loop
@cpu_only
@pytest.mark.dist
@pytest.mark.parametrize("routing", ["random", "empty", "all_dropped"])
def test_interpreter_reference(routing):
    got = run_distributed(_dispatch_combine_body, 1, args=(routing, torch.float16, 12, 8, "nvlink"))
    assert got == [0] if _nothing_received(routing, 1) else got[0] > 0


@cpu_only
@pytest.mark.dist
def test_interpreter_vs_collective():
    assert run_distributed(_compare_body, 1, args=("skewed", torch.float32, 10, 8, 128, 2))[0] > 0


@cpu_only
@pytest.mark.dist
def test_interpreter_fp8_backward_errors():
    assert run_distributed(_fp8_body, 1, args=(10, 4, "nvlink")) == [True]
    assert run_distributed(_backward_body, 1, args=(torch.float32, 8, 8, 128)) == [True]
    assert run_distributed(_errors_body, 1) == [True]


# ----------------------------------------------------------------------------- GPU: compiled kernels
@pytest.mark.dist
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("world_size", _gpu_worlds(1, 2, 4))
@pytest.mark.parametrize("routing", ["random", "skewed", "one_rank", "empty", "all_dropped"])
def test_nvlink_vs_collective(world_size, routing):
    got = run_distributed(_compare_body, world_size, args=(routing, torch.bfloat16, 96, 8 * world_size, 1024, 8))
    assert (sum(got) == 0) == _nothing_received(routing, world_size)


@pytest.mark.dist
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("world_size", _gpu_worlds(1, 2, 4))
def test_nvlink_large_hidden(world_size):
    # DeepSeek-V3's hidden and top-8 of many experts, a few hundred tokens, 24 channels.
    run_distributed(_compare_body, world_size, args=("random", torch.bfloat16, 300, 32 * world_size, 7168, 24))


@pytest.mark.dist
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("world_size", _gpu_worlds(1, 2, 4))
def test_nvlink_reference_fp8_backward_errors(world_size):
    assert sum(run_distributed(_dispatch_combine_body, world_size,
                               args=("random", torch.bfloat16, 24, 4 * world_size, "nvlink"))) > 0
    assert all(run_distributed(_fp8_body, world_size, args=(20, 4 * world_size, "nvlink")))
    assert all(run_distributed(_async_and_errors_body, world_size, args=("nvlink",)))
    assert all(run_distributed(_backward_body, world_size, args=(torch.bfloat16, 40, 4 * world_size, 256)))
    assert all(run_distributed(_errors_body, world_size))


def test_size_hint_and_layout():
    from turbo_dist.moe.nvlink import _regions, required_nvl_bytes

    hint = Buffer.get_nvl_buffer_size_hint(4096, 7168, 8)
    assert hint >= 4096 * 8 * 7168 * 2
    assert Buffer.get_nvl_buffer_size_hint(4096, 7168, 8, fp8=True) < hint
    n = required_nvl_bytes(100, 256, 4, 2, torch.bfloat16)
    cap, offs = _regions(n, [512, 0, 32, 16, 4])
    assert cap >= 100 and offs == sorted(offs) and all(o % 256 == 0 for o in offs)
