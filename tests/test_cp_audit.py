"""Context-parallel behaviours the rest of the suite did not pin down, found by a mutation audit (2026-12-05: each
test here fails on a plausible bug every other CP test let through): packed cross-attention (cu_seqlens_q !=
cu_seqlens_k, an empty key sequence) in every mode, unshard's backward and the layouts' defaults, ring-flash-attn's
softmax_scale and window refusals, llama3's plan checks, and the reference backend under autocast."""
import pytest
import torch

from turbo_dist import cp
from turbo_dist.ops.attention import reference_forward
from turbo_dist.testing import run_distributed

from test_varlen_attention import per_sequence_dense


def _cross_packed(rank, world, lq, lk):
    """Packed cross-attention (cu_q != cu_k, incl. an empty key sequence) through every mode vs one process."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(sum(lq), 4, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(sum(lk), 2, 8, generator=g) for _ in range(2))
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    for causal in (False, True):
        o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu_q, cu_k, causal)
        for mode in ("ring", "a2a", "allgather"):
            if mode == "ring" and causal:
                continue  # refused (tested elsewhere)
            ql, kl, vl = (cp.shard(x, None, 0, load_balance=False).detach().requires_grad_() for x in (q, k, v))
            o, lse = cp.context_parallel_attention(ql, kl, vl, causal=causal, cp_comm_type=mode, cu_seqlens_q=cu_q,
                                                   cu_seqlens_k=cu_k, return_lse=True)
            o.backward(cp.shard(do, None, 0, load_balance=False))
            lse_loc = cp.shard(lse_ref, None, 1, load_balance=False)
            assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_loc)), mode
            fin = torch.isfinite(lse_loc)
            torch.testing.assert_close(lse[fin], lse_loc[fin], atol=1e-4, rtol=1e-4)
            for got, want in ((o.detach(), o_ref), (ql.grad, dq_ref), (kl.grad, dk_ref), (vl.grad, dv_ref)):
                torch.testing.assert_close(cp.unshard(got, None, 0, load_balance=False), want, atol=1e-4, rtol=1e-4,
                                           msg=f"{mode} causal={causal}")
    return True


@pytest.mark.dist
@pytest.mark.parametrize("lq,lk", [([5, 0, 11, 8], [9, 3, 6, 6]), ([6, 4, 6], [6, 0, 10])])
def test_cp_packed_cross_attention(lq, lk):
    assert run_distributed(_cross_packed, 2, args=(lq, lk)) == [True, True]


def _layout_defaults(rank, world):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 8 * world, 2, 4, generator=g, requires_grad=True)
    # unshard's backward: each rank's part of the gradient, in the shard's layout (zigzag and contiguous)
    for lb in (True, False):
        x = cp.shard(full.detach(), None, 1, lb).requires_grad_()
        w = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))
        (cp.unshard(x, None, 1, lb) * w).sum().backward()
        assert torch.equal(x.grad, cp.shard(w, None, 1, lb)), lb
    # local_positions of the contiguous layout
    assert cp.local_positions(8, None, load_balance=False).tolist() == list(range(4 * rank, 4 * rank + 4))
    # the documented default layout (load_balance=None) is zigzag
    q, k, v = (torch.randn(1, 4 * world, 2, 8, generator=g) for _ in range(3))
    o_ref, _ = reference_forward(q, k, v, True)
    for mode in ("ring", "a2a", "allgather"):
        o = cp.context_parallel_attention(*(cp.shard(t, None) for t in (q, k, v)), causal=True, cp_comm_type=mode)
        torch.testing.assert_close(o, cp.shard(o_ref, None), atol=1e-5, rtol=1e-5, msg=mode)
    return True


@pytest.mark.dist
def test_layout_defaults_and_unshard_backward():
    assert run_distributed(_layout_defaults, 2) == [True, True]


def _rfa_scale_and_window(rank, world):
    from turbo_dist import ops
    from turbo_dist.cp import ring_flash_attn as rfa
    from turbo_dist.cp.layout import shard_local

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 16, 4, 8, generator=g) for _ in range(3))
    o_ref = ops.attention(q, k, v, causal=True, softmax_scale=0.3)
    for fn, lb in ((rfa.zigzag_ring_flash_attn_func, True), (rfa.ring_flash_attn_func, False)):
        loc = [shard_local(t, rank, world, 1, lb) for t in (q, k, v)]
        o = fn(*loc, softmax_scale=0.3, causal=True)
        torch.testing.assert_close(o, shard_local(o_ref, rank, world, 1, lb), atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    ov_ref = ops.varlen_attention(q[0], k[0], v[0], cu, cu, causal=True, softmax_scale=0.3)
    loc = [cp.shard_packed(t[0], cu) for t in (q, k, v)]
    ov = rfa.zigzag_ring_flash_attn_varlen_func(*loc, cu // world, 8 // world, softmax_scale=0.3, causal=True)
    torch.testing.assert_close(ov, cp.shard_packed(ov_ref, cu), atol=1e-5, rtol=1e-5)
    cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    per = 16 // world
    ol = rfa.llama3_flash_attn_varlen_func(*(t[0, rank * per:(rank + 1) * per] for t in (q, k, v)), cq, ck, mq, mk, 1,
                                           ks, softmax_scale=0.3, causal=True)
    torch.testing.assert_close(ol, ov_ref[rank * per:(rank + 1) * per], atol=1e-5, rtol=1e-5)
    # flash-attn's (-1, 0) window means causal; with causal=False it must not silently run non-causal attention
    with pytest.raises(NotImplementedError, match="sliding"):
        rfa.zigzag_ring_flash_attn_func(*[shard_local(t, rank, world, 1, True) for t in (q, k, v)], causal=False,
                                        window_size=(-1, 0))
    return True


@pytest.mark.dist
def test_ring_flash_attn_scale_and_window():
    assert run_distributed(_rfa_scale_and_window, 2) == [True, True]


def _llama3_and_unshard_checks(rank, world):
    from turbo_dist.cp import ring_flash_attn as rfa

    torch.set_num_threads(1)
    cu = torch.tensor([0, 5, 21, 32], dtype=torch.int32)
    per = 32 // world
    q = torch.randn(per, 4, 8)
    cq, ck, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    bad = ck.clone()
    if bad.numel() > 2:
        bad[1] += 1  # an inner key boundary moved, same total: keys of another document
    with pytest.raises(ValueError, match="do not cut the same sequences|another rank"):
        rfa.llama3_flash_attn_varlen_func(q, q, q, cq, bad, mq, mk + 1, 1, ks, causal=True)
    one = torch.tensor([0, 32], dtype=torch.int32)  # one document: no inner boundary to cross-check
    cq1, ck1, mq1, mk1, ks1 = rfa.llama3_flash_attn_prepare_cu_seqlens(one, True, rank, world)
    if rank == 1:  # keys starting past the shard's start (cu_seqlens_k made to match): truncated keys, must be refused
        ks1 = slice(ks1.stop - 12, ks1.stop)
        ck1, mk1 = torch.tensor([0, 12], dtype=torch.int32), 12
    with pytest.raises(ValueError, match="not rank|another rank"):
        rfa.llama3_flash_attn_varlen_func(q, q, q, cq1, ck1, mq1, mk1, 1, ks1, causal=True)
    with pytest.raises(ValueError, match="even local length"):
        cp.unshard(torch.randn(1, 3, 2), None, 1, load_balance=True)
    return True


@pytest.mark.dist
def test_llama3_plan_and_unshard_checks():
    assert run_distributed(_llama3_and_unshard_checks, 2) == [True, True]


def _autocast_body(rank, world):
    """Under torch.autocast the reference backend still computes in fp32 and returns an fp32 lse (einsum is on
    autocast's lower-precision list: it returned bf16 and the backward raised 'lse must be float32'), for
    ops.attention and CP a2a / ring alike."""
    from turbo_dist import ops

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5 + rank)
    q, k, v = (torch.randn(1, 8, 2, 8, generator=g) for _ in range(3))
    runs = {}
    for auto in (False, True):
        for name in ("ops", "a2a", "ring"):
            qq = q.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
                if name == "ops":
                    o, lse = ops.attention(qq, k, v, causal=True, return_lse=True)
                else:
                    o, lse = cp.context_parallel_attention(qq, k, v, causal=True, cp_comm_type=name,
                                                           return_lse=True)
            assert lse.dtype == torch.float32, (name, auto, lse.dtype)
            o.float().sum().backward()
            runs[(name, auto)] = (o.detach().float(), lse, qq.grad)
    for name in ("ops", "a2a", "ring"):
        for a, b in zip(runs[(name, True)], runs[(name, False)]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_reference_backend_under_autocast(world):
    assert all(run_distributed(_autocast_body, world, backend="gloo"))  # the CPU reference backend, on any machine
