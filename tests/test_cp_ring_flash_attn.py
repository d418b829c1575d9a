"""turbo_dist.cp.ring_flash_attn: ring-flash-attn's functions (same names, signatures, layouts) against full-sequence
attention on one process, forward and backward, on 2 / 4 ranks: gloo on the CPU in fp32 (elementwise), and on CUDA
(NCCL, or processes sharing a GPU) in bf16 through the GPU kernels against the fp32 reference computed on the CPU
(relative error); what it does not take raises."""
import pytest
import torch

from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device

B, S, HQ, HKV, D = 2, 16, 4, 2, 16
CU = [0, 8, 24, 32]  # packed lengths 8, 16, 8: divisible by 2 * W for W = 2 and 4


def _dtype():
    return torch.bfloat16 if rank_device().type == "cuda" else torch.float32


def _rand(shape, seed):
    """Inputs on the rank's device in the tested dtype (bf16 on CUDA, fp32 on the CPU)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(rank_device(), _dtype())


def _ref(x):
    """A reference leaf: the same values in fp32 on the CPU (where the reference attention runs)."""
    return x.detach().float().cpu().clone().requires_grad_(True)


def _cpu(x):
    return x.detach().float().cpu()


def _cu(vals):
    return torch.tensor(vals, dtype=torch.int32, device=rank_device())


def _close(got, ref, what):
    got, ref = _cpu(got), _cpu(ref)
    if _dtype() == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4, msg=lambda m: f"{what}: {m}")
        return
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()  # bf16: relative Frobenius error
    assert err < 2e-2, f"{what}: relative error {err:.3g}"


def _dense_case(rank, world, fn, packing, causal, load_balance, return_probs):
    from turbo_dist import ops
    from turbo_dist.cp.layout import shard_local

    q, k, v = _rand((B, S, HQ, D), 1), _rand((B, S, HKV, D), 2), _rand((B, S, HKV, D), 3)
    dout = _rand((B, S, HQ, D), 4)
    if packing != "none":  # packed inputs share one head count: no GQA
        k, v = _rand((B, S, HQ, D), 2), _rand((B, S, HQ, D), 3)
    refs = [_ref(t) for t in (q, k, v)]
    o_ref, lse_ref = ops.attention(*refs, causal=causal, return_lse=True)
    (o_ref * _cpu(dout)).sum().backward()

    def cut(t, dim=1):
        return shard_local(t, rank, world, seq_dim=dim, load_balance=load_balance)

    if packing == "qkv":
        leaf = torch.stack([cut(q), cut(k), cut(v)], dim=2).requires_grad_(True)
        out = fn(leaf, causal=causal, return_attn_probs=return_probs)
    elif packing == "kv":
        ql, leaf = cut(q).requires_grad_(True), torch.stack([cut(k), cut(v)], dim=2).requires_grad_(True)
        out = fn(ql, leaf, causal=causal, return_attn_probs=return_probs)
    else:
        ql, kl, vl = (cut(t).requires_grad_(True) for t in (q, k, v))
        out = fn(ql, kl, vl, 0.0, None, causal, return_attn_probs=return_probs)
    if return_probs:
        assert isinstance(out, tuple) and len(out) == 3 and out[2] is None
        o, lse = out[0], out[1]
        _close(lse, cut(lse_ref.detach(), dim=2), "lse")
    else:
        o = out
    _close(o, cut(o_ref.detach()), "out")
    (o * cut(dout)).sum().backward()
    if packing == "qkv":
        grads = leaf.grad.unbind(2)
    elif packing == "kv":
        grads = (ql.grad, *leaf.grad.unbind(2))
    else:
        grads = (ql.grad, kl.grad, vl.grad)
    for name, g, r in zip("qkv", grads, refs):
        _close(g, cut(r.grad), f"d{name}")
    del grads
    return True


def _dense(rank, world):
    from turbo_dist.cp import ring_flash_attn as rfa

    cases = [(rfa.ring_flash_attn_func, "none", True, False, False),
             (rfa.ring_flash_attn_func, "none", False, False, True),
             (rfa.zigzag_ring_flash_attn_func, "none", True, True, True),
             (rfa.zigzag_ring_flash_attn_qkvpacked_func, "qkv", True, True, False),
             (rfa.zigzag_ring_flash_attn_kvpacked_func, "kv", True, True, False),
             (rfa.ring_flash_attn_qkvpacked_func, "qkv", True, False, False),
             (rfa.ring_flash_attn_kvpacked_func, "kv", False, False, False)]
    return sum(_dense_case(rank, world, *c) for c in cases)


def _varlen(rank, world):
    from turbo_dist import cp, ops
    from turbo_dist.cp import ring_flash_attn as rfa

    t = CU[-1]
    cu, cu_ref = _cu(CU), torch.tensor(CU, dtype=torch.int32)  # the rank's (on its device), the reference's
    q, k, v = _rand((t, HQ, D), 5), _rand((t, HKV, D), 6), _rand((t, HKV, D), 7)
    dout = _rand((t, HQ, D), 8)
    refs = [_ref(x) for x in (q, k, v)]
    o_ref = ops.varlen_attention(*refs, cu_ref, cu_ref, None, None, causal=True)
    (o_ref * _cpu(dout)).sum().backward()
    cu_local = cu // world  # ring-flash-attn's cu_seqlens are the local ones
    max_local = max(b - a for a, b in zip(CU, CU[1:])) // world
    ql, kl, vl = (cp.shard_packed(x, cu).clone().requires_grad_(True) for x in (q, k, v))
    o = rfa.zigzag_ring_flash_attn_varlen_func(ql, kl, vl, cu_local, max_local, causal=True)
    _close(o, cp.shard_packed(o_ref.detach(), cu_ref), "varlen out")
    (o * cp.shard_packed(dout, cu)).sum().backward()
    for name, g, r in zip("qkv", (ql.grad, kl.grad, vl.grad), refs):
        _close(g, cp.shard_packed(r.grad, cu_ref), f"varlen d{name}")
    # ring_flash_attn_varlen_func: chunk r of W of every sequence (ring-flash-attn's per-sequence split)
    def split(x):
        return torch.cat([x[a + rank * (b - a) // world:a + (rank + 1) * (b - a) // world] for a, b in zip(CU, CU[1:])])

    for causal in (True, False):
        refs = [_ref(x) for x in (q, k, v)]
        o_ref, lse_ref = ops.varlen_attention(*refs, cu_ref, cu_ref, None, None, causal=causal, return_lse=True)
        (o_ref * _cpu(dout)).sum().backward()
        ql, kl, vl = (split(x).clone().requires_grad_(True) for x in (q, k, v))
        o, lse, none = rfa.ring_flash_attn_varlen_func(ql, kl, vl, cu_local, max_local, causal=causal, group=None,
                                                       return_attn_probs=True)
        assert none is None and lse.dtype == torch.float32
        _close(lse, split(lse_ref.detach().t()).t(), f"split varlen lse causal={causal}")  # [H, T/W]
        _close(o, split(o_ref.detach()), f"split varlen out causal={causal}")
        (o * split(dout)).sum().backward()
        for name, g, r in zip("qkv", (ql.grad, kl.grad, vl.grad), refs):
            _close(g, split(r.grad), f"split varlen d{name} causal={causal}")
    kv = torch.stack([split(k), split(v)], dim=1)
    o3 = rfa.ring_flash_attn_varlen_kvpacked_func(split(q), kv, cu_local, max_local, causal=True)
    o3_ref = ops.varlen_attention(*map(_cpu, (q, k, v)), cu_ref, cu_ref, None, None, causal=True)
    _close(o3, split(o3_ref), "split varlen kvpacked out")
    # qkv-packed (one head count)
    kq, vq = _rand((t, HQ, D), 6), _rand((t, HQ, D), 7)
    o_ref2 = ops.varlen_attention(*map(_cpu, (q, kq, vq)), cu_ref, cu_ref, None, None, causal=True)
    qkv = torch.stack([cp.shard_packed(x, cu) for x in (q, kq, vq)], dim=1)
    o2 = rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_local, max_local, causal=True)
    _close(o2, cp.shard_packed(o_ref2, cu_ref), "varlen qkvpacked out")
    return True


def test_llama3_prepare_cu_seqlens():
    """ring-flash-attn's llama3 plan: local query pieces cut at the sequence boundaries inside the shard, keys from
    the start of the shard's first sequence to the shard's end (causal) or the last sequence's end."""
    from turbo_dist.cp.ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens as prep

    cu = torch.tensor([0, 5, 21, 32], dtype=torch.int32)
    cq, ck, mq, mk, ks = prep(cu, True, 0, 2)
    assert cq.tolist() == [0, 5, 16] and ck.tolist() == [0, 5, 16] and (mq, mk, ks) == (11, 11, slice(0, 16))
    assert cq.dtype == torch.int32
    cq, ck, mq, mk, ks = prep(cu, True, 1, 2)
    assert cq.tolist() == [0, 5, 16] and ck.tolist() == [0, 16, 27] and (mq, mk, ks) == (11, 16, slice(5, 32))
    cq, ck, mq, mk, ks = prep(cu, False, 0, 2)
    assert ck.tolist() == [0, 5, 21] and (mk, ks) == (16, slice(0, 21))
    cq, ck, mq, mk, ks = prep(torch.tensor([0, 8, 8, 16]), True, 1, 2)  # a boundary on the shard's start
    assert cq.tolist() == [0, 0, 8] and ck.tolist() == [0, 0, 8] and ks == slice(8, 16)
    with pytest.raises(ValueError, match="divisible"):
        prep(torch.tensor([0, 5, 31]), True, 0, 2)
    with pytest.raises(ValueError, match="start at 0"):  # decreasing boundaries
        prep(torch.tensor([0, 9, 6, 16]), True, 0, 2)


def _llama3(rank, world):
    from turbo_dist import ops
    from turbo_dist.cp import ring_flash_attn as rfa

    cu_ref = torch.tensor([0, 5, 21, 32], dtype=torch.int32)  # sequences cross the shards' edges
    cu = cu_ref.to(rank_device())
    t = 32
    per = t // world
    q, k, v = _rand((t, HQ, D), 9), _rand((t, HKV, D), 10), _rand((t, HKV, D), 11)
    dout = _rand((t, HQ, D), 12)
    mine = slice(rank * per, (rank + 1) * per)
    for causal in (True, False):
        refs = [_ref(x) for x in (q, k, v)]
        o_ref, lse_ref = ops.varlen_attention(*refs, cu_ref, cu_ref, None, None, causal=causal, return_lse=True)
        (o_ref * _cpu(dout)).sum().backward()
        for stride in (1, HKV):
            cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world)
            ql, kl, vl = (x[mine].clone().requires_grad_(True) for x in (q, k, v))
            o, lse, none = rfa.llama3_flash_attn_varlen_func(ql, kl, vl, cq, ck, mq, mk, stride, ks, causal=causal,
                                                             return_attn_probs=True)
            what = f"llama3 causal={causal} stride={stride}"
            _close(o, o_ref.detach()[mine], f"{what} out")
            _close(lse, lse_ref.detach()[:, mine], f"{what} lse")
            (o * dout[mine]).sum().backward()
            for name, g, r in zip("qkv", (ql.grad, kl.grad, vl.grad), refs):
                _close(g, r.grad[mine], f"{what} d{name}")
    return True


def _llama3_bad_plans(rank, world):
    """Arguments are per rank: a plan refused on one rank makes every rank raise (none waits in the all-gather),
    and another rank's valid-looking plan is refused."""
    from turbo_dist.cp import ring_flash_attn as rfa

    cu = _cu([0, 5, 21, 32])
    per = 32 // world
    q, k = _rand((per, HQ, D), 13), _rand((per, HKV, D), 14)
    cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    if rank == world - 1:  # one rank's cu_seqlens_k off by one
        ck = ck.clone()
        ck[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens_k|another rank"):
        rfa.llama3_flash_attn_varlen_func(q, k, k, cq, ck, mq, mk, 1, ks, causal=True)
    plan0 = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, world)  # rank 0's plan everywhere
    with pytest.raises(ValueError, match="not rank|another rank"):
        rfa.llama3_flash_attn_varlen_func(q, k, k, *plan0[:4], 1, plan0[4], causal=True)
    with pytest.raises(ValueError, match="not rank"):  # past the gathered rows: never clipped
        rfa.llama3_flash_attn_varlen_func(q, k, k, cq, ck, mq, mk, 1, slice(ks.start, ks.stop + 100), causal=True)
    o = rfa.llama3_flash_attn_varlen_func(q, k, k, *rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)[:4],
                                          1, ks, causal=True)  # the group still works afterwards
    return tuple(o.shape)


@pytest.mark.dist
def test_llama3_refuses_bad_plans_on_every_rank():
    assert run_distributed(_llama3_bad_plans, 2, backend="gloo") == [(16, HQ, D)] * 2


def _llama3_host_reads(rank, world):
    """The llama3 path checks its arguments (and all-reduces the refusal flag) once per plan, not once per layer:
    a repeat call with the same cu_seqlens tensors and arguments reads nothing back and runs no check; tensors
    made by llama3_flash_attn_prepare_cu_seqlens are never read back (it made them from host values); a user's own
    tensors are read once per state (an in-place write reads them again); never per kv-head group or in the
    backward. Counted: check_varlen_inputs calls, the Tensor.tolist calls on the cu_seqlens tensors made inside
    them (the CPU's reference backend reads them too, by design; the GPU kernels do not) and raise_together's
    all-reduces."""
    from unittest import mock

    from turbo_dist.cp import ring_flash_attn as rfa
    from turbo_dist.ops import attention_varlen as av
    from turbo_dist.runtime import consistency

    cu = _cu([0, 5, 21, 32])
    per = 32 // world
    hkv = 4  # four kv-head groups at stride 1
    q, k, v = (_rand((per, 8, D), s).requires_grad_(True) for s in (15, 16, 17))
    k, v = k.detach()[:, :hkv].contiguous().requires_grad_(True), v.detach()[:, :hkv].contiguous().requires_grad_(True)
    cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    host = (cq.tolist(), ck.tolist())
    mine = (cq.clone(), ck.clone())  # the user's own tensors: no values known on the host
    counts = {"checks": 0, "reads": 0, "flags": 0}
    real_check, real_tolist, real_together = av.check_varlen_inputs, torch.Tensor.tolist, consistency.raise_together
    cu_ids, inside = {id(cq), id(ck), id(mine[0]), id(mine[1])}, []

    def check(*args, **kwargs):
        counts["checks"] += 1
        inside.append(1)
        try:
            return real_check(*args, **kwargs)
        finally:
            inside.pop()

    def tolist(t):
        if id(t) in cu_ids and inside:
            counts["reads"] += 1
        return real_tolist(t)

    def together(*args, **kwargs):
        counts["flags"] += 1
        return real_together(*args, **kwargs)

    results, outs = [], []
    with mock.patch.object(av, "check_varlen_inputs", check), mock.patch.object(torch.Tensor, "tolist", tolist), \
            mock.patch.object(consistency, "raise_together", together):
        for tensors, host_cu, write in (((cq, ck), None, False), ((cq, ck), None, False), ((cq, ck), host, False),
                                        (mine, None, False), (mine, None, False), (mine, None, True)):
            if write:
                mine[1].add_(0)  # an in-place write: same values, a new version
            counts.update(checks=0, reads=0, flags=0)
            for t in (q, k, v):
                t.grad = None
            o = rfa._llama3(q, k, v, *tensors, mq, mk, 1, ks, 0.0, None, True, (-1, -1), None, False, False, None,
                            host_cu=host_cu)
            o.float().sum().backward()
            outs.append((o.detach(), q.grad, k.grad, v.grad))
            results.append(dict(counts))
    for got in outs[1:]:  # the same plan, the same results
        for a, b in zip(got, outs[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a host copy that is not the tensors' length is refused, not trusted
    with pytest.raises(ValueError, match="host copy"):
        av.check_varlen_inputs(q, k, v, cq, ck, total_k=ks.stop - ks.start, host_cu=(host[0][:-1], host[1]))
    return results


@pytest.mark.dist
def test_llama3_checks_once_per_plan():
    once = {"checks": 1, "reads": 0, "flags": 1}
    none = {"checks": 0, "reads": 0, "flags": 0}
    want = [once, none, once, {"checks": 1, "reads": 2, "flags": 1}, none, {"checks": 1, "reads": 1, "flags": 1}]
    assert run_distributed(_llama3_host_reads, 2, backend="gloo") == [want] * 2


def test_varlen_check_takes_the_host_copy():
    """check_varlen_inputs with host_cu checks those values (the tensors' own are not read back) and still the
    tensors' dtype, shape and device."""
    from turbo_dist.ops.attention_varlen import check_varlen_inputs

    q = torch.randn(8, 2, 4)
    stale = torch.tensor([0, 1, 2], dtype=torch.int32)  # values a read-back would refuse: not read
    assert check_varlen_inputs(q, q, q, stale, stale, host_cu=([0, 3, 8], [0, 3, 8]), return_cu=True) == \
        (5, 5, [0, 3, 8], [0, 3, 8])
    with pytest.raises(ValueError, match="must end at the packed length 8"):
        check_varlen_inputs(q, q, q, stale, stale, host_cu=([0, 3, 7], [0, 3, 8]))
    with pytest.raises(TypeError, match="int32 or int64"):
        check_varlen_inputs(q, q, q, stale.float(), stale, host_cu=([0, 3, 8], [0, 3, 8]))
    with pytest.raises(ValueError, match="must end at the packed length 8"):  # without it: read back
        check_varlen_inputs(q, q, q, stale, stale)


def _refusals(rank, world):
    from turbo_dist.cp import ring_flash_attn as rfa

    q = _rand((B, S // world, HQ, D), 1)
    with pytest.raises(NotImplementedError, match="dropout"):
        rfa.zigzag_ring_flash_attn_func(q, q, q, dropout_p=0.1, causal=True)
    with pytest.raises(NotImplementedError, match="sliding"):
        rfa.ring_flash_attn_func(q, q, q, window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="alibi"):
        rfa.ring_flash_attn_func(q, q, q, alibi_slopes=torch.ones(HQ))
    with pytest.raises(NotImplementedError, match="deterministic"):
        rfa.ring_flash_attn_func(q, q, q, deterministic=True)
    with pytest.raises(NotImplementedError, match="stripe"):
        rfa.stripe_flash_attn_func(q, q, q, causal=True)
    with pytest.raises(ValueError, match="must end at q.shape"):  # local cu_seqlens end at the local length
        rfa.ring_flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 3, 6], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="heads_k_stride"):
        rfa.llama3_flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8, 3,
                                          slice(0, 8))
    with pytest.raises(TypeError, match="cu_seqlens"):  # the Hugging Face adapter's (turbo_dist.cp.hf_adapter)
        rfa.update_ring_flash_attn_params([0, 8], None)
    # flash-attn's causal window (-1, 0) is the causal mask: taken
    o = rfa.zigzag_ring_flash_attn_func(q, q, q, causal=True, window_size=(-1, 0))
    assert o.shape == q.shape
    with pytest.raises(ValueError, match="LOCAL"):  # the global cu_seqlens passed by mistake
        rfa.zigzag_ring_flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 8 * world], dtype=torch.int32),
                                               8 * world, causal=True)
    with pytest.raises(ValueError, match="qkv"):
        rfa.zigzag_ring_flash_attn_qkvpacked_func(torch.stack([q, q], dim=2), causal=True)
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("check,expected", [(_dense, 7), (_varlen, True), (_llama3, True)],
                         ids=["dense", "varlen", "llama3"])
def test_functions_match_full_attention(check, expected, world):
    """Every function family against full-sequence attention (dense: 7 cases per rank): fp32 on gloo, bf16 through
    the GPU kernels on CUDA (TURBO_DIST_TEST_SHARE_GPU=1: 2 / 4 processes on fewer GPUs)."""
    assert run_distributed(check, world) == [expected] * world


@pytest.mark.dist
def test_ring_flash_attn_refuses_what_it_does_not_do():
    assert run_distributed(_refusals, 2, backend="gloo") == [True, True]
