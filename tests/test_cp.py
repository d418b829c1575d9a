"""Context-parallel attention (turbo_dist.cp): every mode against full single-process attention."""
import pytest
import torch
import torch.distributed as dist

from turbo_dist import cp
from turbo_dist.cp.layout import chunk_ids, gathered_to_natural, natural_to_scattered, shard_local
from turbo_dist.cp.ring import DIAG, FULL, KV_FRONT, Q_BACK, SKIP, block_plan
from turbo_dist.ops import attention, flash_attn_func
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device, seeded

MODES = ("ring", "a2a", "allgather")


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
    for cp_size in (1, 2, 3, 4):
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


def _check_modes(rank, world_size, modes, dtype_name, configs, seq_per_rank, batch):
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    report = []
    for ci, (causal, hq, hkv, lb, nc) in enumerate(configs):
        g = seeded(1234 + ci)
        s, d = seq_per_rank * world_size, 16
        q = torch.randn(batch, s, hq, d, generator=g).to(dev, dtype)
        k = torch.randn(batch, s, hkv, d, generator=g).to(dev, dtype)
        v = torch.randn(batch, s, hkv, d, generator=g).to(dev, dtype)
        do = torch.randn(batch, s, hq, d, generator=g).to(dev, dtype)
        # Reference: the whole sequence on one process, fp32 math.
        qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
        o_ref = attention(qr, kr, vr, causal=causal)
        o_ref.backward(do.float())
        for mode in modes:
            ql, kl, vl = (cp.shard(t, None, 1, lb).detach().requires_grad_() for t in (q, k, v))
            o = cp.context_parallel_attention(ql, kl, vl, causal=causal, cp_comm_type=mode, load_balance=lb,
                                              num_chunks=nc)
            assert o.shape == ql.shape and o.dtype == dtype
            o.backward(cp.shard(do, None, 1, lb))
            what = f"{mode} causal={causal} hq={hq} hkv={hkv} lb={lb} nc={nc} rank={rank}"
            torch.testing.assert_close(cp.unshard(o.detach(), None, 1, lb).float(), o_ref.detach(), **tol, msg=what)
            for name, got, ref in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
                assert got.dtype == dtype, (what, name, got.dtype)
                full = cp.unshard(got, None, 1, lb).float()
                torch.testing.assert_close(full, ref, **tol, msg=f"{what} {name}")
            report.append(what)
    return report


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("mode", MODES)
def test_cp_attention_matches_full_attention(world_size, mode):
    results = run_distributed(_check_modes, world_size, args=((mode,), "float32", CONFIGS, 8, 2))
    assert all(len(r) == len(CONFIGS) for r in results)


def _modes_agree(rank, world_size):
    """The same sharded inputs through every mode (and flash_attn_func's cp_param_bundle) give the same output."""
    g = seeded(7)
    q = torch.randn(1, 8, 4, 16, generator=g)
    k = torch.randn(1, 8, 2, 16, generator=g)
    v = torch.randn(1, 8, 2, 16, generator=g)
    outs = {}
    for mode in MODES:
        outs[mode] = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True,
                                     cp_param_bundle={"cp_group": dist.group.WORLD, "cp_comm_type": mode})
    for mode in MODES[1:]:
        torch.testing.assert_close(outs[mode], outs["ring"], atol=1e-5, rtol=1e-5, msg=mode)
    full = cp.unshard(outs["ring"], None)
    qf, kf, vf = (cp.unshard(t, None) for t in (q, k, v))
    torch.testing.assert_close(full, attention(qf, kf, vf, causal=True, softmax_scale=0.3), atol=1e-5, rtol=1e-5)
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(1, 2))
def test_modes_agree_and_flash_attn_func(world_size):
    assert all(run_distributed(_modes_agree, world_size))


def _errors(rank, world_size):
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 4, 3, 8)
    out = []
    with pytest.raises(ValueError, match="q heads divisible"):
        cp.context_parallel_attention(q, k, v, cp_comm_type="a2a")
    q4, k3 = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 3, 8)
    if world_size == 2:
        with pytest.raises(ValueError, match="kv heads divisible"):
            cp.context_parallel_attention(q4, k3, k3, cp_comm_type="a2a")
    with pytest.raises(NotImplementedError, match="variable-length"):
        cp.context_parallel_attention(q, k, v, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="unexpected"):
        cp.context_parallel_attention(q, k, v, bogus=1)
    with pytest.raises(ValueError, match="cp_comm_type"):
        cp.context_parallel_attention(q, k, v, cp_comm_type="tree")
    with pytest.raises(ValueError, match="even"):
        cp.context_parallel_attention(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8),
                                      causal=True)
    with pytest.raises(ValueError, match="same length"):
        cp.context_parallel_attention(q, torch.randn(1, 6, 3, 8), torch.randn(1, 6, 3, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        cp.shard(torch.randn(1, 6, 2), None)
    pos = cp.local_positions(8, None)
    out.append(pos.tolist())
    return out


@pytest.mark.dist
def test_cp_input_errors():
    results = run_distributed(_errors, 2)
    assert results[0] == [[0, 1, 6, 7]] and results[1] == [[2, 3, 4, 5]]


# ---------------------------------------------------------------- GPU (NCCL, bf16)

@pytest.mark.dist
@pytest.mark.gpu(min_gpus=2)
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_cp_attention_gpu_bf16(world_size):
    configs = [(True, 8, 2, True, 2), (True, 8, 8, False, 2), (False, 8, 4, True, 1)]
    results = run_distributed(_check_modes, world_size, args=(MODES, "bfloat16", configs, 128, 1))
    assert all(len(r) == len(configs) * len(MODES) for r in results)
