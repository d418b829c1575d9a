"""The `nvlink` MoE transport against the `collective` one: bit-exact dispatch/combine, FP8, backward, errors.

On GPU (NCCL, one GPU per rank) the compiled Triton kernels write into peers' symmetric buffers;
world_size=1 is a self-loop through the same kernels. Without a GPU the same kernels run under
TRITON_INTERPRET=1 for a single rank (its only peer is itself): fp16/fp32 payloads, tiny sizes.
Multi-rank indexing without several GPUs: `test_simulated_ranks*` run 2 or 4 ranks in one process on one
device (each rank its own buffers, peers' addresses passed to the kernels, launches ordered so that no wait
can deadlock; see _SimWorld) against the plain reference of test_moe: on CPU in the interpreter, on a GPU
with the compiled kernels.
"""
import inspect
import threading

import pytest
import torch

import turbo_dist.moe as moe
from turbo_dist.moe import Buffer, Config
from turbo_dist.testing import run_distributed

from dist_utils import rank_device
from test_moe import (_async_and_errors_body, _autograd_body, _dispatch_combine_body, _fp8_body, expert_fn, from_fp8,
                      make_buffer, make_inputs, ref_dispatch, to_fp8)

HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter self-loop; on GPU the compiled kernels are tested")


def _gpu_worlds(*sizes):
    return [pytest.param(s, marks=[pytest.mark.gpu(min_gpus=s)], id=f"w{s}") for s in sizes]


def _nothing_received(routing, world_size):
    """Routings after which no rank receives a row: every expert slot dropped, or "empty" (the last rank has no
    tokens, see test_moe.make_inputs) on one rank, where the last rank is the only one."""
    return routing == "all_dropped" or (routing == "empty" and world_size == 1)


# ----------------------------------------------------------------------------- rank bodies
def _outputs_equal(a, b, what, against="collective"):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert a is not None and b is not None, f"{what}: one transport returned None"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        same = torch.equal(a.cpu(), b.cpu())
        assert same, f"{what}: nvlink differs from {against}"
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
    assert all(run_distributed(_autograd_body, world_size, args=("nvlink",)))
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


# ----------------------------------------------------------------------------- CPU: simulated ranks
class _SimRuntime:
    """The parts of turbo_dist's Runtime the nvlink transport and Buffer use, for one simulated rank."""

    def __init__(self, world, rank):
        self.world, self.rank, self.world_size = world, rank, world.size
        self.global_rank, self.group, self.device = rank, None, world.device
        self.num_nodes, self.local_world_size, self.comm_stream = 1, world.size, None
        self.has_peer_access, self.shmem_backend = True, "simulated"
        self.names = 0  # new_buffer_name

    def check_tensor(self, t, name="tensor"):
        if t.device.type != self.device.type:
            raise ValueError(f"{name} is on {t.device}; the simulated ranks live on {self.device}")

    def symm_buffer(self, name, nbytes):
        return self.world.symm_buffer(name, nbytes, self.rank)

    def new_buffer_name(self, prefix):
        self.names += 1
        return f"{prefix}.{self.names - 1}"

    def barrier(self):  # ranks are built one after another in the main thread: nothing to wait for
        pass


class _SimWorld:
    """`size` ranks of the nvlink transport in one process and on one device (the CPU with the Triton
    interpreter, else the current GPU with the compiled kernels).

    Each rank has its own zeroed symmetric buffers; every rank's kernels get all ranks' base addresses as
    peer pointers, exactly as on GPUs. Each rank's Buffer calls run in a thread of their own, but kernels
    never run concurrently: the five launchers of turbo_dist.kernels.moe_nvlink are replaced by a rendezvous
    that, once every rank reached the same launch, runs all ranks' launches one at a time (rank order) in the
    thread that arrived last, so that no wait can deadlock:
      - senders without a wait (plain dispatch_send) and receivers (dispatch_recv, combine_recv): as they are;
        the receive launches come after every rank's send launch, so their flag waits are already met.
      - kernels that enter a device barrier before sending (cached dispatch_send, combine_send) or before
        reading counts (notify): before rank r's launch, the barrier flags of ranks s > r (not launched yet)
        are forged in r's signal buffer and restored right after, so every flag a wait uses is either the
        kernels' own write or forged for a rank that writes it later in the round; at the end of the round
        every rank's barrier flags must equal the op's epoch (every rank's barrier writes landed where they
        should). notify runs twice: the first round only deposits every rank's counts (its outputs read slots
        that later ranks had not written yet and are dropped); the second round reads them all.
    Production code paths are untouched: only the order of kernel launches is arranged.
    """

    KERNELS = ("notify", "dispatch_send", "dispatch_recv", "combine_send", "combine_recv")

    def __init__(self, size, monkeypatch, timeout_s=2.0):
        from turbo_dist.kernels import moe_nvlink as K

        self.size = size
        self.device = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")
        self._real = {n: getattr(K, n) for n in self.KERNELS}
        self._sigs = {n: inspect.signature(f) for n, f in self._real.items()}
        self._bufs = {}
        self._tls = threading.local()
        self._pending = [None] * size
        self._results = [None] * size
        self._rendezvous = threading.Barrier(size, action=self._run_round, timeout=120)
        self.rounds = []  # (kernel name, epoch) of every round, for the test to check the op sequence
        for n in self.KERNELS:
            monkeypatch.setattr(K, n, self._launcher(n))
        import turbo_dist.moe.buffer as buffer_mod

        self.runtimes = [_SimRuntime(self, r) for r in range(size)]
        self._buffer_mod, self._monkeypatch, self.timeout_s = buffer_mod, monkeypatch, timeout_s

    def symm_buffer(self, name, nbytes, rank):
        from turbo_dist.runtime.symm import SymmBuffer

        if name not in self._bufs:
            nbytes = max(int(nbytes), 4096)
            local = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
            ptrs = torch.tensor([t.data_ptr() for t in local], dtype=torch.int64, device=self.device)
            self._bufs[name] = (nbytes, local, ptrs)
        nb, local, ptrs = self._bufs[name]
        assert nbytes <= nb, f"simulated symm_buffer {name!r}: rank {rank} asks {nbytes} > {nb} bytes"
        return SymmBuffer(name, nb, local[rank], None, ptrs, rank, self.size)

    def make_buffers(self, num_nvl_bytes):
        bufs = []
        for rt in self.runtimes:
            self._monkeypatch.setattr(self._buffer_mod, "get_runtime", lambda group, rt=rt: rt)
            buf = Buffer(None, num_nvl_bytes=num_nvl_bytes, transport="nvlink")
            assert buf.transport == "nvlink" and buf.rank == rt.rank and buf.group_size == self.size
            buf._impl.timeout_s = self.timeout_s  # a wait that is never met fails in seconds, not minutes
            bufs.append(buf)
        return bufs

    # -- the rendezvous
    def _launcher(self, name):
        def launch(*args, **kwargs):
            rank = self._tls.rank
            self._pending[rank] = (name, self._sigs[name].bind(*args, **kwargs))
            self._rendezvous.wait()
            return self._results[rank]
        return launch

    def _run_round(self):
        names = [p[0] for p in self._pending]
        if len(set(names)) != 1:
            raise AssertionError(f"simulated ranks launch different kernels at the same step: {names}")
        name = names[0]
        calls = [p[1] for p in self._pending]
        epochs = {int(c.arguments["epoch"]) for c in calls}
        assert len(epochs) == 1, f"{name}: ranks at different op epochs {epochs}"
        epoch = epochs.pop()
        self.rounds.append((name, epoch))
        real = self._real[name]
        barrier = name in ("notify", "combine_send") or (name == "dispatch_send" and calls[0].arguments["barrier"])
        for _ in range(2 if name == "notify" else 1):
            for r, call in enumerate(calls):
                forged = self._forge(call, r, epoch) if barrier else None
                self._results[r] = real(*call.args, **call.kwargs)
                if forged is not None:
                    forged[0][forged[1]] = forged[2]  # restore: the real writes of ranks > r come later
        if barrier:
            for r, call in enumerate(calls):
                a = call.arguments
                flags = a["sig_local"][a["barrier_off"]:a["barrier_off"] + self.size]
                assert flags.tolist() == [epoch] * self.size, \
                    f"{name} epoch {epoch}: rank {r}'s barrier flags {flags.tolist()} (a rank's write went astray)"
        for p in range(self.size):
            self._pending[p] = None

    def _forge(self, call, rank, epoch):
        a = call.arguments
        sig, off = a["sig_local"], a["barrier_off"]
        later = slice(off + rank + 1, off + self.size)
        saved = sig[later].clone()
        sig[later] = torch.clamp(saved, min=epoch)
        return sig, later, saved

    def run(self, body, buffers, *args):
        """body(rank, buffer, *args) in one thread per rank; returns the results, raises the first error."""
        results, errors = [None] * self.size, [None] * self.size

        def target(r):
            self._tls.rank = r
            try:
                results[r] = body(r, buffers[r], *args)
            except BaseException as e:  # noqa: B036 (re-raised in the main thread)
                errors[r] = e
                self._rendezvous.abort()

        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a simulated rank hangs"
        raised = [e for e in errors if e is not None]
        if raised:  # the cause first, not the BrokenBarrierError it left the other ranks with
            raise sorted(raised, key=lambda e: isinstance(e, threading.BrokenBarrierError))[0]
        return results


def _sim_ref_matrix(inputs, num_experts, world):
    """num_tokens_matrix [R, R]: tokens rank s sends to rank d."""
    per = num_experts // world
    return torch.tensor([[int(((idx >= d * per) & (idx < (d + 1) * per)).any(1).sum()) for d in range(world)]
                         for _, idx, _ in inputs], dtype=torch.int32)


def _sim_ref_combine(me, inputs, num_experts, world, fn, bias=None):
    """fp32 sum over ranks (rank order) of what each rank sends back for my tokens, + bias, cast."""
    matrix = _sim_ref_matrix(inputs, num_experts, world)
    acc = torch.zeros(inputs[me][0].shape, dtype=torch.float32)
    for r in range(world):
        rx, _, _, src, _ = ref_dispatch(r, inputs, num_experts, world)
        start, n = int(matrix[:me, r].sum()), int(matrix[me, r])
        acc.index_add_(0, src[start:start + n].long(), fn(rx, r)[start:start + n].float())
    if bias is not None:
        acc += bias.float()
    return acc.to(inputs[me][0].dtype)


def _sim_equal(a, b, what):
    _outputs_equal(a, b, what, against="the reference")


def _sim_body(rank, buf, world, routing, dtype, num_tokens, num_experts, hidden, num_sms):
    """One simulated rank: every output of every op against the plain reference of test_moe (after each op,
    a recorded device error, e.g. a flag wait that timed out, is raised first: it names the peer)."""
    topk, align = 4, 3
    cfg = Config(num_sms, 4, 64)
    inputs = [make_inputs(r, world, num_tokens, num_experts, routing, dtype, hidden=hidden, topk=topk)
              for r in range(world)]
    x, idx, w = inputs[rank]  # CPU copies for the reference; xd, idxd, wd: what the rank passes
    dev = buf.runtime.device
    xd, idxd, wd = (t.to(dev) for t in inputs[rank])
    exp_x, exp_idx, exp_w, exp_src, exp_counts = ref_dispatch(rank, inputs, num_experts, world)
    n = exp_x.size(0)
    matrix = _sim_ref_matrix(inputs, num_experts, world)

    n_rank, _, n_expert, in_rank, _ = buf.get_dispatch_layout(idxd, num_experts)
    # top-k as column-major views (same values): the kernels must not assume a row-major caller.
    kw = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
              topk_idx=idxd.t().contiguous().t(), topk_weights=wd.t().contiguous().t())
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(xd, expert_alignment=align, config=cfg, **kw)
    buf._impl.check_error(sync=True)
    _sim_equal(recv_x, exp_x, "recv_x")
    _sim_equal(recv_idx, exp_idx, "recv_topk_idx")
    _sim_equal(recv_w, exp_w, "recv_topk_weights")
    assert counts == [-(-c // align) * align for c in exp_counts], f"expert counts {counts} vs {exp_counts}"
    _sim_equal(handle[0], torch.cumsum(matrix, 0, dtype=torch.int32), "rank_prefix_matrix")
    _sim_equal(handle[1], matrix, "num_tokens_matrix")
    _sim_equal(handle[2], (torch.cumsum(matrix[rank], 0) - matrix[rank]).to(torch.int32), "send_offsets")
    _sim_equal(handle[3], exp_src, "recv_src_idx")
    assert handle.num_recv_tokens == n and handle.recv_counts == matrix[:, rank].tolist()
    assert handle.send_counts == matrix[rank].tolist()
    assert handle.max_recv_tokens == int(matrix.sum(0).max()) and handle.max_send_tokens == int(matrix.sum(1).max())

    # Cached dispatch: same routing, new payload.
    inputs2 = [((a.float() * 3 - 1).to(dtype), b, c) for a, b, c in inputs]
    got = buf.dispatch(inputs2[rank][0].to(dev), handle=handle, config=cfg)[0]
    buf._impl.check_error(sync=True)
    _sim_equal(got, ref_dispatch(rank, inputs2, num_experts, world)[0], "cached dispatch")

    # Combine: rows and weights back, fp32 sum in rank order, + bias.
    bias = (torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + rank)) / 4).to(dtype)
    out, out_w, _ = buf.combine(expert_fn(recv_x, rank), handle, topk_weights=recv_w, bias=bias.to(dev), config=cfg)
    buf._impl.check_error(sync=True)
    _sim_equal(out, _sim_ref_combine(rank, inputs, num_experts, world, expert_fn, bias), "combine (+bias)")
    _sim_equal(out_w, torch.where(idx >= 0, w, torch.zeros_like(w)), "combined topk_weights")

    # num_worst_tokens: fixed-size outputs, no host sync; padding rows ignored by the combine.
    worst = world * (num_tokens + 3 * world)
    wx, widx, ww, wcounts, whandle, _ = buf.dispatch(xd, num_worst_tokens=worst, config=cfg, **kw)
    buf._impl.check_error(sync=True)
    assert wcounts == [] and whandle.num_recv_tokens is None and wx.size(0) == worst
    _sim_equal(wx[:n], exp_x, "worst recv_x")
    _sim_equal(widx[:n], exp_idx, "worst recv_topk_idx")
    _sim_equal(ww[:n], exp_w, "worst recv_topk_weights")
    _sim_equal(whandle[3][:n], exp_src, "worst recv_src_idx")
    assert bool((wx[n:] == 0).all() and (widx[n:] == -1).all() and (ww[n:] == 0).all() and (whandle[3][n:] == -1).all())
    got = buf.dispatch(inputs2[rank][0].to(dev), handle=whandle, config=cfg)[0]
    buf._impl.check_error(sync=True)
    _sim_equal(got[:n], ref_dispatch(rank, inputs2, num_experts, world)[0], "worst cached dispatch")
    out, out_w, _ = buf.combine(expert_fn(wx, rank), whandle, topk_weights=ww, config=cfg)
    buf._impl.check_error(sync=True)
    _sim_equal(out, _sim_ref_combine(rank, inputs, num_experts, world, expert_fn), "worst combine")
    _sim_equal(out_w, torch.where(idx >= 0, w, torch.zeros_like(w)), "worst combined topk_weights")

    # FP8 payload with per-128-channel scales (rows compared as bits), then a cached FP8 dispatch.
    q8 = [to_fp8(a.float()) for a, _, _ in inputs]
    (rq, rs), ridx, _, fcounts, fhandle, _ = buf.dispatch(tuple(t.to(dev) for t in q8[rank]), config=cfg,
                                                          **dict(kw, topk_weights=None))
    buf._impl.check_error(sync=True)
    bits = [(q.view(torch.uint8), b, c) for (q, _), (_, b, c) in zip(q8, inputs)]
    scales = [(s, b, c) for (_, s), (_, b, c) in zip(q8, inputs)]
    _sim_equal(rq.view(torch.uint8), ref_dispatch(rank, bits, num_experts, world)[0], "fp8 rows")
    _sim_equal(rs, ref_dispatch(rank, scales, num_experts, world)[0], "fp8 scales")
    _sim_equal(ridx, exp_idx, "fp8 recv_topk_idx")
    assert fcounts == exp_counts
    q8b = [to_fp8(a.float()) for a, _, _ in inputs2]
    rq2, rs2 = buf.dispatch(tuple(t.to(dev) for t in q8b[rank]), handle=fhandle, config=cfg)[0]
    buf._impl.check_error(sync=True)
    bits = [(q.view(torch.uint8), b, c) for (q, _), (_, b, c) in zip(q8b, inputs)]
    scales = [(s, b, c) for (_, s), (_, b, c) in zip(q8b, inputs)]
    _sim_equal(rq2.view(torch.uint8), ref_dispatch(rank, bits, num_experts, world)[0], "fp8 cached rows")
    _sim_equal(rs2, ref_dispatch(rank, scales, num_experts, world)[0], "fp8 cached scales")
    return n


def _sim_errors_body(rank, bufs, world):
    """Capacity errors raise on every rank alike, so no rank is left waiting and later ops stay aligned."""
    small, big = bufs
    num_experts, hidden = 4 * world, 128
    x, idx, _ = (t.to(small.runtime.device) for t in make_inputs(rank, world, 8, num_experts, "one_rank",
                                                                 torch.float32, hidden=hidden))
    n_rank, _, n_expert, in_rank, _ = small.get_dispatch_layout(idx, num_experts)
    kw = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, topk_idx=idx)
    with pytest.raises(ValueError, match="num_nvl_bytes >= "):
        small.dispatch(x, **kw)  # host check after the count exchange, on every rank
    with pytest.raises(ValueError, match="num_nvl_bytes >= "):
        small.dispatch(x, num_worst_tokens=1 << 20, **kw)  # refused before any kernel
    n_rank2, _, n_expert2, in_rank2, _ = small.get_dispatch_layout(idx[:2], num_experts)
    out = small.dispatch(x[:2], num_tokens_per_rank=n_rank2, is_token_in_rank=in_rank2,
                         num_tokens_per_expert=n_expert2, topk_idx=idx[:2])
    small._impl.check_error(sync=True)
    assert out[0].size(0) == (2 * world if rank == world - 1 else 0)
    if rank == world - 1:
        _sim_equal(out[0][2 * (world - 1):], x[:2], "rows after a refused dispatch")
    # num_worst_tokens below what the last rank receives: the device guard trips on every rank alike.
    assert big.dispatch(x, num_worst_tokens=1, **kw)[0].size(0) == 1
    with pytest.raises(ValueError, match="num_worst_tokens"):
        big._impl.check_error(sync=True)
    return True


def test_simulated_ranks_errors(monkeypatch):
    world = 2
    sim = _SimWorld(world, monkeypatch)
    small = sim.make_buffers(Buffer.get_nvl_buffer_size_hint(2, 128, world, 4, dtype=torch.float32))
    big = sim.make_buffers(Buffer.get_nvl_buffer_size_hint(8 + 3 * world, 128, world, 4, dtype=torch.float32))
    assert sim.run(_sim_errors_body, list(zip(small, big)), world) == [True] * world
    assert [n for n, _ in sim.rounds] == ["notify"] + ["notify", "dispatch_send", "dispatch_recv"] * 2


@pytest.mark.parametrize("world,routing,dtype", [
    (2, "random", torch.float16), (2, "one_rank", torch.float32), (2, "empty", torch.float16),
    (4, "random", torch.float32), (4, "skewed", torch.float16), (4, "one_rank", torch.float32),
    (4, "all_dropped", torch.float16)])
def test_simulated_ranks(world, routing, dtype, monkeypatch):
    """World 2 / 4 in one process and on one device (see _SimWorld; the interpreter on CPU): every rank's
    outputs of plain / cached / num_worst_tokens / FP8 dispatch and combine against the plain reference;
    3 channels (an odd count; some get no token)."""
    num_tokens, hidden = 6, 256
    sim = _SimWorld(world, monkeypatch)
    nbytes = Buffer.get_nvl_buffer_size_hint(num_tokens + 3 * world, hidden, world, 4, dtype=torch.float32)
    bufs = sim.make_buffers(nbytes)
    got = sim.run(_sim_body, bufs, world, routing, dtype, num_tokens, 4 * world, hidden, 3)
    assert (sum(got) == 0) == (routing == "all_dropped")
    if routing == "one_rank":
        assert got[:-1] == [0] * (world - 1) and got[-1] > 0
    ops = [name for name, _ in sim.rounds]
    plain, cached, combine = ["notify", "dispatch_send", "dispatch_recv"], ["dispatch_send", "dispatch_recv"], \
        ["combine_send", "combine_recv"]
    assert ops == (plain + cached + combine) * 2 + plain + cached, ops
    epochs = [e for _, e in sim.rounds]
    assert epochs == sorted(epochs) and len(set(epochs)) == 8, epochs  # one epoch per op, the same on every rank


def test_size_hint_with_fp8_sizes_the_combine_by_dtype():
    """fp8=True sizes the FP8 dispatch rows; the combine rows follow `dtype` (an fp32 combine needs twice bf16's),
    as the too-small message advises."""
    bf16 = Buffer.get_nvl_buffer_size_hint(6, 256, 2, 2, fp8=True, dtype=torch.bfloat16)
    fp32 = Buffer.get_nvl_buffer_size_hint(6, 256, 2, 2, fp8=True, dtype=torch.float32)
    assert fp32 > bf16 >= 6 * 2 * 256 * 2
    assert fp32 >= 6 * 2 * 256 * 4


def _destroy_releases(rank, world):
    from turbo_dist.moe.nvlink import NvlinkTransport

    buf = Buffer(None, transport="collective", explicitly_destroy=True)
    buf._impl = NvlinkTransport(buf.runtime, 1 << 16)  # the self-loop (interpreter): one rank, no peer access
    names = {buf._impl.buffer.name, buf._impl.signal.name}
    assert names <= set(buf.runtime._buffers)
    buf.destroy()
    assert not names & set(buf.runtime._buffers), "destroy() left the symmetric buffers allocated"
    return True


@pytest.mark.dist
def test_destroy_releases_the_symmetric_buffers():
    """Each nvlink Buffer allocates buffers under its own names: destroy() frees them (they stayed in the
    runtime for good, e.g. every time Megatron's get_buffer made a bigger Buffer)."""
    assert run_distributed(_destroy_releases, 1) == [True]
