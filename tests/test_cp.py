"""Context-parallel attention (turbo_dist.cp): every mode against full single-process attention."""
import contextlib

import pytest
import torch
import torch.distributed as dist

from turbo_dist import cp
from turbo_dist.cp.layout import chunk_ids, gathered_to_natural, natural_to_scattered, shard_local
from turbo_dist.cp.ring import DIAG, FULL, KV_FRONT, Q_BACK, SKIP, block_plan
from turbo_dist.ops import flash_attn_func
from turbo_dist.ops.attention import reference_backward, reference_forward
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device, seeded

MODES = ("ring", "a2a", "allgather")


@contextlib.contextmanager
def _rank_setup(exercise_single_rank=False):
    """One intra-op thread per rank: 4 gloo ranks on 2 cores otherwise spin-wait each other
    (OpenMP), which made the ring 60x slower here. Optionally force real collectives at cp=1."""
    from turbo_dist.cp import _comm

    threads, exercise = torch.get_num_threads(), _comm.EXERCISE_SINGLE_RANK
    torch.set_num_threads(1)
    _comm.EXERCISE_SINGLE_RANK = exercise_single_rank
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _comm.EXERCISE_SINGLE_RANK = exercise


def _assert_close(got, ref, dtype, what):
    """fp32: elementwise; bf16/fp16: relative Frobenius error (elementwise bounds mean little there)."""
    got, ref = got.float(), ref.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4, msg=what)
        return
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    assert err < 2e-2, f"{what}: relative error {err:.3g}"


# ---------------------------------------------------------------- layout (single process)

@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("seq_dim", [0, 1, 2])
def test_layout_roundtrip(cp_size, zigzag, seq_dim):
    shape = [3, 5, 4]
    shape[seq_dim] = 4 * cp_size
    x = torch.randn(shape)
    shards = [shard_local(x, r, cp_size, seq_dim, zigzag) for r in range(cp_size)]
    buf = torch.stack(shards)  # what an all-gather delivers
    assert torch.equal(gathered_to_natural(buf, cp_size, zigzag, seq_dim), x)
    assert torch.equal(natural_to_scattered(x, cp_size, zigzag, seq_dim), buf)


def test_zigzag_chunks_balance_causal_work():
    for cp_size in (2, 4, 8):
        # Visible (query chunk, key chunk) pairs per rank: equal under zigzag.
        work = [sum(c + 1 for c in chunk_ids(r, cp_size, True)) for r in range(cp_size)]
        assert len(set(work)) == 1, work
        assert sorted(c for r in range(cp_size) for c in chunk_ids(r, cp_size, True)) == list(range(2 * cp_size))


def test_ring_plan_covers_causal_mask_exactly():
    """Per rank, the ring's blocks cover each visible (q chunk, k chunk) pair once and no masked one."""
    for cp_size in (1, 2, 3, 4, 5, 8):
        for lb in (True, False):
            for rank in range(cp_size):
                mine = chunk_ids(rank, cp_size, lb)
                covered = []
                for step in range(cp_size):
                    src = chunk_ids((rank - step) % cp_size, cp_size, lb)
                    kind = block_plan(step, rank, cp_size, True, lb)
                    qs = {DIAG: mine, FULL: mine, KV_FRONT: mine, Q_BACK: mine[1:], SKIP: ()}[kind]
                    ks = {DIAG: src, FULL: src, KV_FRONT: src[:1], Q_BACK: src, SKIP: ()}[kind]
                    covered += [(a, b) for a in qs for b in ks if kind != DIAG or b <= a]
                    if kind != DIAG:
                        assert all(b < a for a in qs for b in ks), (cp_size, lb, rank, step, kind)
                expect = [(a, b) for a in mine for b in range(max(mine) + 1) if b <= a]
                assert sorted(covered) == sorted(expect), (cp_size, lb, rank)


# ---------------------------------------------------------------- multi-rank

CONFIGS = [
    # (causal, hq, hkv, load_balance, num_chunks)
    (True, 4, 4, True, 2),
    (True, 4, 2, True, 1),
    (True, 4, 1, True, 2),
    (True, 4, 2, False, 2),
    (False, 4, 2, True, 2),
    (False, 4, 4, False, 1),
    (False, 4, 1, False, 2),
]


def _check_modes(rank, world_size, modes, dtype_name, configs, seq_per_rank, batch, head_dim=16,
                 exercise_single_rank=False):
    with _rank_setup(exercise_single_rank):
        return _check_modes_impl(rank, world_size, modes, dtype_name, configs, seq_per_rank, batch, head_dim)


def _check_modes_impl(rank, world_size, modes, dtype_name, configs, seq_per_rank, batch, d):
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    report = []
    for ci, (causal, hq, hkv, lb, nc) in enumerate(configs):
        g = seeded(1234 + ci)
        s = seq_per_rank * world_size
        q = torch.randn(batch, s, hq, d, generator=g).to(dev, dtype)
        k = torch.randn(batch, s, hkv, d, generator=g).to(dev, dtype)
        v = torch.randn(batch, s, hkv, d, generator=g).to(dev, dtype)
        do = torch.randn(batch, s, hq, d, generator=g).to(dev, dtype)
        # Reference: the whole sequence on one process, fp32 math (whatever the device's kernels are).
        qr, kr, vr = (t.float() for t in (q, k, v))
        o_ref, lse_ref = reference_forward(qr, kr, vr, causal)
        grads_ref = reference_backward(do.float(), qr, kr, vr, o_ref, lse_ref, causal)
        for mode in modes:
            ql, kl, vl = (cp.shard(t, None, 1, lb).detach().requires_grad_() for t in (q, k, v))
            o, lse = cp.context_parallel_attention(ql, kl, vl, causal=causal, cp_comm_type=mode, load_balance=lb,
                                                   num_chunks=nc, return_lse=True)
            assert o.shape == ql.shape and o.dtype == dtype
            o.backward(cp.shard(do, None, 1, lb))
            what = f"{mode} causal={causal} hq={hq} hkv={hkv} lb={lb} nc={nc} rank={rank}"
            assert lse.dtype == torch.float32 and not lse.requires_grad, what
            torch.testing.assert_close(lse, cp.shard(lse_ref, None, 2, lb), atol=1e-3, rtol=1e-3,
                                       msg=f"{what} lse")  # [B, Hq, S/cp]: this rank's rows, its token order
            _assert_close(cp.unshard(o.detach(), None, 1, lb), o_ref, dtype, what)
            for name, got, ref in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), grads_ref):
                assert got.dtype == dtype, (what, name, got.dtype)
                _assert_close(cp.unshard(got, None, 1, lb), ref, dtype, f"{what} {name}")
            report.append(what)
    return report


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("mode", MODES)
def test_cp_attention_matches_full_attention(world_size, mode):
    results = run_distributed(_check_modes, world_size, args=((mode,), "float32", CONFIGS, 8, 2))
    assert all(len(r) == len(CONFIGS) for r in results)


def _errors(rank, world_size):
    with _rank_setup():
        return _errors_impl(rank, world_size)


def _errors_impl(rank, world_size):
    dev = rank_device()
    q = torch.randn(1, 4, 3, 8, device=dev)
    k = v = torch.randn(1, 4, 3, 8, device=dev)
    out = []
    with pytest.raises(ValueError, match="q heads divisible"):
        cp.context_parallel_attention(q, k, v, cp_comm_type="a2a")
    q4, k3 = torch.randn(1, 4, 6, 8, device=dev), torch.randn(1, 4, 3, 8, device=dev)
    if world_size == 2:
        with pytest.raises(ValueError, match="kv heads divisible"):
            cp.context_parallel_attention(q4, k3, k3, cp_comm_type="a2a")
    with pytest.raises(TypeError, match="cu_seqlens_q/cu_seqlens_k"):
        cp.context_parallel_attention(q, k, v, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="unexpected"):
        cp.context_parallel_attention(q, k, v, bogus=1)
    with pytest.raises(ValueError, match="cp_comm_type"):
        cp.context_parallel_attention(q, k, v, cp_comm_type="tree")
    with pytest.raises(ValueError, match="even"):
        odd = torch.randn(1, 3, 2, 8, device=dev)
        cp.context_parallel_attention(odd, odd, odd, causal=True)
    with pytest.raises(ValueError, match="same length"):
        longer = torch.randn(1, 6, 3, 8, device=dev)
        cp.context_parallel_attention(q, longer, longer)
    with pytest.raises(ValueError, match="divisible by 4"):
        cp.shard(torch.randn(1, 6, 2), None)
    pos = cp.local_positions(8, None)
    out.append(pos.tolist())
    return out


@pytest.mark.dist
def test_cp_input_errors():
    results = run_distributed(_errors, 2)
    assert results[0] == [[0, 1, 6, 7]] and results[1] == [[2, 3, 4, 5]]


def _modes_agree(rank, world_size):
    """The same sharded inputs through every mode, via flash_attn_func's cp_param_bundle, give the same
    outputs and gradients (each other and the whole sequence on one process). CPU: fp32, elementwise;
    GPU: bf16 through the CUDA kernels (whose tilings differ between modes), relative error."""
    dev = rank_device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def close(a, b, what):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)
        else:
            _assert_close(a, b, dtype, what)

    with _rank_setup():
        results = []
        for ci, (causal, hkv, lb) in enumerate([(True, 2, True), (True, 1, False), (False, 4, True)]):
            g = seeded(7 + ci)
            full = [torch.randn(1, 8 * world_size, h, 16, generator=g).to(dev, dtype) for h in (4, hkv, hkv, 4)]
            q, k, v, do = (cp.shard(t, None, 1, lb) for t in full)
            res = {}
            for mode in MODES:
                ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
                bundle = {"cp_group": dist.group.WORLD, "cp_comm_type": mode, "load_balance": lb}
                o = flash_attn_func(ql, kl, vl, softmax_scale=0.3, causal=causal, cp_param_bundle=bundle)
                o.backward(do)
                res[mode] = (o.detach(), ql.grad, kl.grad, vl.grad)
            for mode in MODES[1:]:
                for name, a, b in zip(("o", "dq", "dk", "dv"), res[mode], res["ring"]):
                    close(a, b, f"{mode} vs ring {name} cfg {ci}")
            qf, kf, vf = (t.detach().requires_grad_() for t in full[:3])
            of = flash_attn_func(qf, kf, vf, softmax_scale=0.3, causal=causal)  # no bundle: one process
            of.backward(full[3])
            for name, a, b in zip(("o", "dq", "dk", "dv"), res["ring"], (of, qf.grad, kf.grad, vf.grad)):
                close(cp.unshard(a, None, 1, lb), b.detach(), f"ring vs full {name} cfg {ci}")
            results.append(ci)
        return results


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4, 1))
def test_modes_agree_and_flash_attn_func(world_size):
    assert all(r == [0, 1, 2] for r in run_distributed(_modes_agree, world_size))


# ---------------------------------------------------------------- GPU (NCCL, bf16)
GPU_CONFIGS = [(True, 8, 2, True, 2), (True, 8, 8, False, 2), (False, 8, 4, True, 1), (True, 8, 1, True, 1)]


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_cp_attention_gpu_bf16_single_rank():
    """One GPU, cp=1: the CUDA attention kernels in bf16 through every mode, with the all-to-all,
    all-gather and reduce-scatter really issued (NCCL to itself, on the comm stream)."""
    results = run_distributed(_check_modes, 1, args=(MODES, "bfloat16", GPU_CONFIGS, 512, 2, 64, True))
    assert len(results[0]) == len(GPU_CONFIGS) * len(MODES)


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=2)
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_cp_attention_gpu_bf16(world_size):
    results = run_distributed(_check_modes, world_size, args=(MODES, "bfloat16", GPU_CONFIGS, 256, 1, 64))
    assert all(len(r) == len(GPU_CONFIGS) * len(MODES) for r in results)


# ---------------------------------------------------------------- flash_attn_func as flash-attn / Primus-Turbo call it
def _facade_compat(rank, world_size):
    g = seeded(11)
    full = [torch.randn(1, 4 * world_size, h, 8, generator=g) for h in (4, 2, 2)]
    # flash-attn's positions: the 4th argument is dropout_p, never the scale
    ref, ref_lse = flash_attn_func(*full, causal=True, return_lse=True)
    torch.testing.assert_close(flash_attn_func(*full, 0.0, None, True), ref, rtol=0, atol=0)
    assert ref_lse.shape == (1, 4, 4 * world_size) and ref_lse.dtype == torch.float32
    for kw, what in ((dict(dropout_p=0.1), "dropout"), (dict(window_size=(8, 0)), "sliding-window"),
                     (dict(alibi_slopes=torch.ones(4)), "alibi"), (dict(deterministic=True), "deterministic"),
                     (dict(return_attn_probs=True), "return_attn_probs")):
        with pytest.raises(NotImplementedError, match=what):
            flash_attn_func(*full, causal=True, **kw)
    # Primus-Turbo's bundle: cp_stream accepted, "all2all" spelled its way; the layout must be named for causal
    local = [cp.shard(t, None, 1, False) for t in full]
    primus = {"cp_group": dist.group.WORLD, "cp_stream": None, "cp_comm_type": "all2all", "load_balance": False}
    o = flash_attn_func(*local, causal=True, cp_param_bundle=primus)
    torch.testing.assert_close(cp.unshard(o, None, 1, False), ref, rtol=1e-5, atol=1e-5)
    if world_size > 1:
        with pytest.raises(ValueError, match="name the shards' layout"):
            flash_attn_func(*local, causal=True, cp_param_bundle={"cp_group": None, "cp_comm_type": "ring"})
    flash_attn_func(*local, causal=False, cp_param_bundle={"cp_group": None, "cp_comm_type": "ring"})  # no layout
    with pytest.raises(TypeError, match="unknown keys \\['cp_size'\\]"):
        flash_attn_func(*local, cp_param_bundle={"cp_group": None, "cp_size": world_size})
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 1))
def test_flash_attn_func_flash_attn_and_primus_compat(world_size):
    assert all(run_distributed(_facade_compat, world_size))


def _double_backward(rank, world_size):
    """Every mode, dense and packed, and llama3: differentiating a gradient taken with create_graph=True through
    CP attention raises NotImplementedError on every rank, before any communication of that backward (no rank
    waits on another)."""
    from turbo_dist.cp import ring_flash_attn as rfa

    got = []
    with _rank_setup():
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, 4, 2, 8, generator=g).requires_grad_(True) for _ in range(3))
        for mode in MODES:
            for packed in (False, True):
                if packed:
                    qq, kk, vv = (t.detach()[0].clone().requires_grad_(True) for t in (q, k, v))
                    cu = torch.tensor([0, 3, 4 * world_size], dtype=torch.int32)
                    o = cp.context_parallel_attention(qq, kk, vv, causal=True, cp_comm_type=mode, load_balance=False,
                                                      cu_seqlens_q=cu, cu_seqlens_k=cu)
                    wrt = qq
                else:
                    o = cp.context_parallel_attention(q, k, v, causal=True, cp_comm_type=mode, load_balance=True)
                    wrt = q
                try:  # a2a keeps no input to tie the refusal to: it refuses the create_graph backward itself
                    (g,) = torch.autograd.grad(o.sum(), wrt, create_graph=True)
                    torch.autograd.grad(g.square().sum(), wrt)
                    got.append(f"{mode} packed={packed}: no error")
                except NotImplementedError as exc:
                    got.append("second derivatives" in str(exc))
        cu = torch.tensor([0, 3, 4 * world_size], dtype=torch.int32)
        cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world_size)
        ql, kl, vl = (t.detach()[0].clone().requires_grad_(True) for t in (q, k, v))
        o = rfa.llama3_flash_attn_varlen_func(ql, kl, vl, cq, ck, mq, mk, 1, ks, causal=True)
        (g,) = torch.autograd.grad(o.sum(), ql, create_graph=True)
        try:
            torch.autograd.grad(g.square().sum(), ql)
            got.append("llama3: no error")
        except NotImplementedError as exc:
            got.append("second derivatives" in str(exc))
        dist.barrier()  # every rank got here: none is left in a collective
    return got


@pytest.mark.dist
def test_double_backward_raises_on_every_rank():
    assert run_distributed(_double_backward, 2, backend="gloo") == [[True] * 7] * 2


def _shard_outside_group(rank, world_size):
    g = dist.new_group([0])  # every rank creates it; rank 1 is not in it
    x = torch.randn(1, 8, 2, 4)
    if rank == 0:
        return tuple(cp.shard(x, g).shape)
    with pytest.raises(ValueError, match="not a member of the process group"):
        cp.shard(x, g)
    return "refused"


@pytest.mark.dist
def test_shard_refuses_a_group_without_this_rank():
    """cp.shard with a group this rank is not in: a clear ValueError (was narrow()'s 'length must be
    non-negative')."""
    assert run_distributed(_shard_outside_group, 2, backend="gloo") == [(1, 8, 2, 4), "refused"]


def _shard_packed_checks(rank, world_size):
    x = torch.randn(32, 2)
    for cu, match in (([0, 24, 8, 32], "start at 0 and not decrease"), ([8, 16, 32], "start at 0"),
                      ([[0, 8], [8, 32]], "1-D integer boundaries"), ([0.0, 32.0], "1-D integer boundaries")):
        with pytest.raises(ValueError, match=match):
            cp.shard_packed(x, torch.tensor(cu))
    with pytest.raises(ValueError, match="seq_dim 5 is not a dim of x"):
        cp.shard_packed(x, torch.tensor([0, 32]), seq_dim=5)
    return tuple(cp.shard_packed(x, torch.tensor([0, 8, 32])).shape)


@pytest.mark.dist
def test_shard_packed_refuses_malformed_boundaries():
    """cp.shard_packed's cu_seqlens: 1-D integer boundaries from 0, not decreasing; seq_dim a dim of x (were
    arange's 'bound inconsistent with step sign', int() of a list, a tuple IndexError, or accepted floats)."""
    assert run_distributed(_shard_packed_checks, 2, backend="gloo") == [(16, 2)] * 2


def _single_rank_odd_causal(rank, world_size):
    x = torch.randn(1, 7, 2, 8)
    ref = flash_attn_func(x, x, x, causal=True)
    for mode in MODES:  # one rank: the layout does not matter, an odd length is fine
        o = cp.context_parallel_attention(x, x, x, causal=True, cp_group=None, cp_comm_type=mode)
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.dist
def test_single_rank_odd_length_causal():
    assert run_distributed(_single_rank_odd_causal, 1) == [True]
