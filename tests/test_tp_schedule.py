"""The async-TP symmetric-memory pipelines (turbo_dist/tp/pipeline.py) with W ranks simulated on CPU.

No GPU and no multi-GPU machine is needed: every rank is a thread, its symmetric buffers are CPU
tensors (a peer view is the other thread's tensor), signals are the same epoch flags written into
those tensors (a condition variable replaces the Triton spin kernels) and streams/events are
no-ops (work runs eagerly in host order). What runs is the production code: chunk offsets,
ring/direct orders, buffer halves, epochs, the flags each step waits for, the fp32 reduction, and
the fused ops' layouts (gather/scatter dims, 3-D inputs, FP8 scales, SP linears' backward).
What this cannot check: stream ordering on a GPU (every wait_stream/wait_event is a no-op
here), the Triton signal kernels' memory ordering, copy-engine transfers.
"""
import contextlib
import threading
import types
from collections import defaultdict

import pytest
import torch

from turbo_dist import tp
from turbo_dist.kernels import tp_signal
from turbo_dist.runtime import symm
from turbo_dist.tp import _common as C
from turbo_dist.tp import ag_matmul, linear, matmul_rs, pipeline, wgrad

from test_tp import ag_cases, check_close, quantize, quantize_weight, rand, rs_cases

SIM_TIMEOUT_S = 20.0
_TLS = threading.local()


# ----------------------------------------------------------------------------- the simulation
class _SimAbort(RuntimeError):
    pass


class SimWorld:
    """What the W simulated ranks share: their symmetric buffers, one lock/condition for the flags."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.cond = threading.Condition()
        self.barrier = threading.Barrier(world_size, timeout=SIM_TIMEOUT_S)
        self.allocs = defaultdict(dict)  # (name, generation) -> {rank: uint8 tensor}
        self.aborted = False

    def abort(self):
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        self.barrier.abort()


class _SimHandle:
    def __init__(self, tensors):
        self.tensors = tensors
        self.buffer_ptrs = tensors

    def get_buffer(self, rank, shape, dtype, offset):
        assert dtype == torch.uint8 and offset == 0 and tuple(shape) == tuple(self.tensors[rank].shape)
        return self.tensors[rank]


class _SimStream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


class _SimEvent:
    def record(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


_COMPUTE = _SimStream()
SIM_CUDA = types.SimpleNamespace(current_stream=lambda *a: _COMPUTE, stream=lambda s: contextlib.nullcontext(),
                                 Event=_SimEvent, synchronize=lambda *a: None)


class SimRuntime:
    """The parts of turbo_dist.runtime.Runtime the pipelines use, for one simulated rank."""

    shmem_backend = "sim"
    has_peer_access = True
    backend = "sim"
    group = None

    def __init__(self, world, rank):
        self.world, self.rank, self.world_size = world, rank, world.world_size
        self.device = torch.device("cpu")
        self.comm_stream = _SimStream()
        self.generation = defaultdict(int)

    def check_tensor(self, t, name="tensor"):
        pass

    def barrier(self):
        self.world.barrier.wait()

    def symm_buffer(self, name, nbytes):
        # Generous minimum (like the runtime's power-of-two rounding): consecutive small calls share one
        # allocation, so nothing but the pipeline's own layout keeps their bytes apart.
        nbytes = max(int(nbytes), 1 << 16)
        gen = self.generation[name]
        self.generation[name] += 1
        table = self.world.allocs[(name, gen)]
        table[self.rank] = torch.zeros(nbytes, dtype=torch.uint8)
        self.barrier()
        tensors = [table[r] for r in range(self.world_size)]
        assert len({t.numel() for t in tensors}) == 1, f"ranks asked for different sizes of {name!r}"
        return symm.SymmBuffer(name, nbytes, tensors[self.rank], _SimHandle(tensors), tensors, self.rank,
                               self.world_size)


def _slot(pad_bytes, slot):
    return pad_bytes.view(torch.int32)[slot]


def _sim_signal_module(world):
    def put_signal(pad_ptrs, slot, value, first_peer, num_peers, world_size):
        with world.cond:
            for i in range(num_peers):
                _slot(pad_ptrs[(first_peer + i) % world_size], slot).fill_(value)
            world.cond.notify_all()

    def wait_signal(pad, err, slot_base, expected, first_peer, num_peers, world_size, timeout_s):
        ranks = [(first_peer + i) % world_size for i in range(num_peers)]
        wait_until(world, lambda: all(int(pad[slot_base + r]) >= expected for r in ranks),
                   f"flags {[slot_base + r for r in ranks]} to reach epoch {expected}")

    return types.SimpleNamespace(ERR_NUMEL=tp_signal.ERR_NUMEL, put_signal=put_signal, wait_signal=wait_signal,
                                 describe_error=tp_signal.describe_error)


def wait_until(world, pred, what):
    with world.cond:
        ok = world.cond.wait_for(lambda: world.aborted or pred(), timeout=SIM_TIMEOUT_S)
        if world.aborted:
            raise _SimAbort("another simulated rank failed")
        if not ok:
            raise AssertionError(f"simulated rank waited {SIM_TIMEOUT_S}s for {what}: deadlock or a missing signal")


@pytest.fixture
def sim(monkeypatch):
    """sim(world_size, fn, *args) runs fn(rank, world_size, *args) on simulated ranks; returns the results."""
    monkeypatch.setattr(C, "choose_algo", lambda rt, algo, *a: C.check_algo(algo))
    for mod in (ag_matmul, matmul_rs, linear, wgrad):
        monkeypatch.setattr(mod, "get_runtime", lambda group=None: _TLS.rt)
    monkeypatch.setattr(pipeline, "_cuda", SIM_CUDA)

    def run(world_size, fn, *args):
        world = SimWorld(world_size)
        monkeypatch.setattr(pipeline, "tp_signal", _sim_signal_module(world))
        results, errors = [None] * world_size, []

        def body(rank):
            _TLS.rt = SimRuntime(world, rank)
            _TLS.world = world
            try:
                results[rank] = fn(rank, world_size, *args)
            except _SimAbort:
                pass
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
                errors.append((rank, exc))
                world.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * SIM_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), "a simulated rank hung"
        if errors:
            rank, exc = errors[0]
            raise AssertionError(f"simulated rank {rank} of {world_size} failed: {exc!r}") from exc
        return results

    return run


def _pad(rt):
    return pipeline.get_state(rt).pad


# ------------------------------------------------------------------------ pure schedule/layout
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_ring_peers_is_a_permutation_per_step(w):
    orders = [pipeline.ring_peers(r, w) for r in range(w)]
    for r, order in enumerate(orders):
        assert sorted(order) == [q for q in range(w) if q != r], f"rank {r}: {order}"
    for step in range(w - 1):
        assert sorted(o[step] for o in orders) == list(range(w)), f"step {step}: two ranks share a peer"


@pytest.mark.parametrize("buf_nbytes", [4096, 65536, 3 * 4096 + 100])
def test_consecutive_epochs_use_disjoint_aligned_halves(buf_nbytes):
    cap = pipeline.half_capacity(buf_nbytes)
    assert 2 * cap <= buf_nbytes and cap % 256 == 0
    sizes = [[1], [cap], [100, 300], [cap // 2, 1], [17] * 5]
    for e in range(1, 5):
        for s1 in sizes:
            for s2 in sizes:
                o1, t1 = pipeline.packed_offsets(s1, pipeline.half_base(e, buf_nbytes))
                o2, t2 = pipeline.packed_offsets(s2, pipeline.half_base(e + 1, buf_nbytes))
                if t1 > cap or t2 > cap:
                    continue
                assert all(o % 256 == 0 for o in o1 + o2)
                lo1, lo2 = o1[0], o2[0]
                assert lo1 + t1 <= lo2 or lo2 + t2 <= lo1, f"epochs {e},{e + 1} overlap: {s1} {s2}"
                assert lo1 + t1 <= buf_nbytes and lo2 + t2 <= buf_nbytes


@pytest.mark.parametrize("w", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,dim", [((6, 5), 0), ((2, 6, 5), 1), ((6, 3, 5), 0), ((2, 3, 6, 5), 2),
                                       ((3, 6, 2, 5), 1)])
def test_row_layouts_match_cat_and_chunk(w, shape, dim):
    shards = [rand(shape, 10 * w + r) for r in range(w)]
    rows = [C.to_rows(s, dim) for s in shards]
    gathered = torch.cat([r[0] for r in rows])
    assert torch.equal(C.gathered_from_rows(gathered, w, rows[0][1], dim), torch.cat(shards, dim))
    assert torch.equal(C.from_rows(rows[0][0], rows[0][1], dim), shards[0])


# ------------------------------------------------------------------- fused ops, simulated ranks
def _sim_ag_cases(rank, w, algo, m, k):
    n = 0
    for call in range(2):  # cases differ in size: consecutive calls of different shapes share the buffer
        for ci, (full_shape, gdim, ns, colmajor) in enumerate(ag_cases(w, m, k)):
            a_full = rand(full_shape, 100 + ci)
            bs = [rand((nn, full_shape[-1]), 200 + ci * 10 + j).t() if colmajor
                  else rand((full_shape[-1], nn), 200 + ci * 10 + j) for j, nn in enumerate(ns)]
            a_shard = a_full.chunk(w, dim=gdim)[rank].contiguous()
            a_out, outs = tp.all_gather_matmul(a_shard, bs, gather_dim=gdim, algo=algo)
            assert torch.equal(a_out, a_full), f"case {ci} call {call}: gathered A differs"
            for j, (o, b) in enumerate(zip(outs, bs)):
                check_close(o, a_full @ b, torch.float32, f"{algo} case {ci} (gather_dim {gdim}) out[{j}] call {call}")
            if call == 1:  # outputs in another dtype than A (written by each chunk's GEMM)
                _, outs = tp.all_gather_matmul(a_shard, bs, gather_dim=gdim, algo=algo, return_a=False,
                                               out_dtype=torch.bfloat16)
                for j, (o, b) in enumerate(zip(outs, bs)):
                    assert o.dtype == torch.bfloat16
                    check_close(o, a_full @ b, torch.bfloat16, f"{algo} case {ci} out[{j}] as bf16")
            n += 1
    return n


def _sim_rs_cases(rank, w, algo, m, k):
    n = 0
    for call in range(2):
        for ci, (a_shape, nn, sdim, colmajor) in enumerate(rs_cases(w, m, k)):
            a_all = [rand(a_shape, 300 + ci * 16 + r) for r in range(w)]
            b_all = [rand((nn, k), 400 + ci * 16 + r).t() if colmajor else rand((k, nn), 400 + ci * 16 + r)
                     for r in range(w)]
            total = sum(a @ b for a, b in zip(a_all, b_all))
            for reduce_op in ("sum", "avg"):
                out = tp.matmul_reduce_scatter(a_all[rank], b_all[rank], scatter_dim=sdim, reduce_op=reduce_op,
                                               algo=algo)
                ref = (total / w if reduce_op == "avg" else total).chunk(w, dim=sdim)[rank]
                assert out.is_contiguous()
                check_close(out, ref, torch.float32, f"{algo} case {ci} (scatter_dim {sdim}, {reduce_op}) call {call}")
                n += 1
    return n


@pytest.mark.parametrize("algo", ["ring", "direct"])
@pytest.mark.parametrize("w", [2, 3, 4])
def test_sim_all_gather_matmul(sim, w, algo):
    assert sim(w, _sim_ag_cases, algo, 3, 8) == [2 * len(ag_cases(w, 3, 8))] * w


@pytest.mark.parametrize("algo", ["ring", "direct"])
@pytest.mark.parametrize("w", [2, 3, 4])
def test_sim_matmul_reduce_scatter(sim, w, algo):
    assert sim(w, _sim_rs_cases, algo, 3, 8) == [4 * len(rs_cases(w, 3, 8))] * w


def test_sim_eight_ranks(sim):
    assert sim(8, _sim_ag_cases, "ring", 2, 8) == [2 * len(ag_cases(8, 2, 8))] * 8
    assert sim(8, _sim_rs_cases, "direct", 2, 8) == [4 * len(rs_cases(8, 2, 8))] * 8


def _sim_fp8(rank, w, algo):
    m, k, n = 4, 32, 8 * w
    checked = 0
    for rowwise in (True, False):
        for gdim, full_shape in ((0, (w * m, k)), (1, (2, w * m, k))):
            a_full = rand(full_shape, 500 + gdim)
            aq, a_scale = quantize(a_full, rowwise)
            bq, b_scale = quantize_weight(rand((k, n), 600), rowwise)
            ref = (aq.float() * a_scale) @ (bq.float() * b_scale)
            shard = aq.chunk(w, gdim)[rank].contiguous()
            scales = [a_scale.chunk(w, gdim)[rank].contiguous(), a_scale] if rowwise else [a_scale]
            for s in scales:  # row-wise: sharded like A (gathered with it) and replicated
                a_out, (o,) = tp.all_gather_scaled_matmul(shard, [bq], s, [b_scale], gather_dim=gdim,
                                                          out_dtype=torch.float32, algo=algo)
                assert torch.equal(a_out.view(torch.uint8), aq.view(torch.uint8))
                check_close(o, ref, torch.float32, f"fp8 ag rowwise={rowwise} gdim={gdim}")
                checked += 1
            # reduce-scatter: every rank's partial is the same A (shard of nothing), summed over W
            for sdim in (gdim, -1):  # the last dim scatters N (per-column scales cut with it)
                rs = tp.scaled_matmul_reduce_scatter(aq, bq, a_scale, b_scale, scatter_dim=sdim,
                                                     out_dtype=torch.float32, algo=algo)
                check_close(rs, (w * ref).chunk(w, sdim)[rank], torch.float32,
                            f"fp8 rs rowwise={rowwise} scatter_dim={sdim}")
                checked += 1
    return checked


@pytest.mark.parametrize("algo", ["ring", "direct"])
def test_sim_fp8(sim, algo):
    assert sim(3, _sim_fp8, algo) == [14] * 3


def _sim_mlp(rank, w, algo, seq_dim):
    """Column(SP) -> gelu -> Row(SP) forward and backward against the unsharded MLP."""
    tokens, hidden, ffn = 4 * w, 8, 4 * w
    shape = (tokens, 2, hidden) if seq_dim == 0 else (2, tokens, hidden)
    x_full = rand(shape, 700).requires_grad_()
    w1, b1, w2 = rand((ffn, hidden), 701), rand((ffn,), 702), rand((hidden, ffn), 703)
    ref = torch.nn.functional.gelu(x_full @ w1.t() + b1) @ w2.t()
    dy_full = rand(ref.shape, 704)
    ref.backward(dy_full)

    col = tp.ColumnParallelLinear(hidden, ffn, bias=True, seq_dim=seq_dim, algo=algo).load_full(w1, b1)
    row = tp.RowParallelLinear(ffn, hidden, bias=False, seq_dim=seq_dim, algo=algo).load_full(w2)
    x = x_full.detach().chunk(w, seq_dim)[rank].contiguous().requires_grad_()
    y = row(torch.nn.functional.gelu(col(x)))
    check_close(y, ref.detach().chunk(w, seq_dim)[rank], torch.float32, "mlp forward")
    y.backward(dy_full.chunk(w, seq_dim)[rank])
    check_close(x.grad, x_full.grad.chunk(w, seq_dim)[rank], torch.float32, "mlp dx")
    rows = slice(rank * ffn // w, (rank + 1) * ffn // w)
    dw1, db1, dw2 = _full_grad(x_full, w1, b1, w2, dy_full)
    check_close(col.weight.grad, dw1[rows], torch.float32, "dW1")
    check_close(col.bias.grad, db1[rows], torch.float32, "db1")
    check_close(row.weight.grad, dw2[:, rows], torch.float32, "dW2")
    return True


def _full_grad(x_full, w1, b1, w2, dy):
    params = [p.clone().requires_grad_() for p in (w1, b1, w2)]
    out = torch.nn.functional.gelu(x_full.detach() @ params[0].t() + params[1]) @ params[2].t()
    return torch.autograd.grad(out, params, dy)


@pytest.mark.parametrize("algo,seq_dim", [("ring", 0), ("direct", 1)])
def test_sim_parallel_linear_mlp(sim, algo, seq_dim):
    assert sim(2, _sim_mlp, algo, seq_dim) == [True, True]


def _sim_wgrad(rank, w, algo):
    """tp.wgrad on the pipelines: the kept [K/W, M] slice gathered back into contiguous dW column blocks."""
    tokens, k = 3 * w, 4 * w
    x_full = rand((tokens, k), 800)
    dys = [rand((tokens, n), 801 + n) for n in (5, 7)]
    x_shard = x_full.chunk(w)[rank].contiguous()
    kept, how = wgrad.keep_input(None, x_shard, x_full, 0)
    assert how == wgrad.K_SHARD and kept.shape == (k // w, tokens) and kept.numel() == x_shard.numel()
    for out_dtype in (None, torch.bfloat16):
        dws = wgrad.weight_grads(None, kept, how, dys, algo=algo, out_dtype=out_dtype)
        for dy, dw in zip(dys, dws):
            assert dw.is_contiguous() and dw.dtype == (out_dtype or torch.float32)
            check_close(dw, dy.t() @ x_full, out_dtype or torch.float32, f"{algo} dW {tuple(dw.shape)}")
    return True


@pytest.mark.parametrize("algo", ["ring", "direct"])
@pytest.mark.parametrize("w", [2, 3])
def test_sim_weight_grad_from_kept_slices(sim, w, algo):
    assert sim(w, _sim_wgrad, algo) == [True] * w


# ----------------------------------------------------------- buffer reuse across calls (W = 2)
def _ag_reuse(rank, w):
    """Rank 1 is held inside call 1 (before it pulls rank 0's shard) until rank 0 has started call 2
    (its READY flag for epoch 2 is up): rank 0's call-2 shard, larger, must not overwrite call 1's."""
    rt = _TLS.rt
    for call, (m, k) in enumerate([(4, 16), (16, 16)], start=1):  # fp32: 256 B, then 1 KiB per shard
        got = {}

        def consume(chunks, src, call=call, got=got):
            if call == 1 and rank == 1 and src == 1:
                wait_until(_TLS.world, lambda: int(_pad(rt)[pipeline.CH_AG_READY * pipeline.MAX_RANKS]) >= 2,
                           "rank 0 to start call 2")
            got[src] = chunks[0].clone()

        shard = torch.full((m, k), 100.0 * call + rank)
        (gathered,) = pipeline.all_gather_consume(rt, [shard], consume, order="ring")
        for src in range(w):
            assert torch.equal(got[src], torch.full((m, k), 100.0 * call + src)), f"call {call}: chunk of {src}"
            assert torch.equal(gathered[src * m:(src + 1) * m], got[src])
    return True


def _rs_reuse(rank, w):
    """Rank 1 is held before producing its own partial of call 1 until rank 0 has pushed call 2's
    (larger) partial into rank 1's buffer: that push must not land on call 1's slots."""
    rt = _TLS.rt
    for call, (m, n) in enumerate([(4, 16), (8, 32)], start=1):
        def produce(dst, call=call, m=m, n=n):
            if call == 1 and rank == 1 and dst == 1:
                wait_until(_TLS.world, lambda: int(_pad(rt)[pipeline.CH_RS_READY * pipeline.MAX_RANKS]) >= 2,
                           "rank 0 to push call 2")
            return torch.full((m, n), 1000.0 * call + 10.0 * rank + dst)

        out = pipeline.produce_reduce_scatter(rt, produce, m, n, torch.float32, "sum", torch.float32, order="ring")
        expected = sum(1000.0 * call + 10.0 * r + rank for r in range(w))
        assert torch.equal(out, torch.full((m, n), expected)), f"call {call}: {out[0, 0].item()} != {expected}"
    return True


def test_sim_all_gather_buffer_reuse_across_shapes(sim):
    assert sim(2, _ag_reuse) == [True, True]


def test_sim_reduce_scatter_buffer_reuse_across_shapes(sim):
    assert sim(2, _rs_reuse) == [True, True]


def _timeout_raised_once(rank, world_size):
    rt = _TLS.rt
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    tp.all_gather_matmul(a, [b], algo="ring")  # creates the state
    state = pipeline.get_state(rt)
    record = torch.tensor([1, 0, 3, 6], dtype=state.err.dtype)  # what a timed-out wait leaves behind
    state.err.copy_(record)
    state.record_errors(None)
    with pytest.raises(RuntimeError, match="peer rank 0 timed out .* output of the call whose wait timed out is "
                                           "invalid"):
        tp.all_gather_matmul(a, [b], algo="ring")
    _, (o,) = tp.all_gather_matmul(a, [b], algo="ring")  # raised once: the record is cleared, calls run again
    torch.testing.assert_close(o, a @ b)
    return True


def test_sim_timeout_raises_once_then_clears(sim):
    assert sim(1, _timeout_raised_once) == [True]
