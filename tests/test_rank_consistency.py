"""Arguments that differ between the ranks of a group: with TURBO_DIST_CHECK_RANKS=1 (or torch's
TORCH_DISTRIBUTED_DEBUG=DETAIL) TP's fused ops, CP attention and MoE dispatch / combine raise ValueError on every
rank, naming what differs, before any collective (without it gloo aborts the process, NCCL may hang, and an option
that differs returns wrong results). Packed CP always raises a refusal found on one rank on every rank (its checks
read cu_seqlens on the host anyway)."""
import os

import pytest
import torch

from turbo_dist.testing import run_distributed


def test_switch_reads_the_environment(monkeypatch):
    from turbo_dist.runtime import consistency

    monkeypatch.delenv("TURBO_DIST_CHECK_RANKS", raising=False)
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG", raising=False)
    assert not consistency.enabled()
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    assert consistency.enabled()
    monkeypatch.setenv("TURBO_DIST_CHECK_RANKS", "0")  # ours wins
    assert not consistency.enabled()
    monkeypatch.setenv("TURBO_DIST_CHECK_RANKS", "1")
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "OFF")
    assert consistency.enabled()
    assert consistency.tensor_sig(torch.zeros(2, 3, dtype=torch.bfloat16)) == ((2, 3), "bfloat16")
    assert consistency.tensor_sig([torch.zeros(1), None]) == (((1,), "float32"), None)


def _raises(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _mismatches(rank, world):
    from turbo_dist import cp, moe, tp

    os.environ["TURBO_DIST_CHECK_RANKS"] = "1"
    got = {}
    torch.manual_seed(0)
    rows = 4 if rank == 0 else 3
    got["ag"] = _raises(lambda: tp.all_gather_matmul(torch.randn(rows, 8), [torch.randn(8, 6)]))
    got["rs"] = _raises(lambda: tp.matmul_reduce_scatter(torch.randn(4, 1, 8), torch.randn(8, 6),
                                                         scatter_dim=0 if rank == 0 else 1))
    q = torch.randn(1, 4, 2, 8)
    got["cp"] = _raises(lambda: cp.context_parallel_attention(q, q, q, causal=True, load_balance=True,
                                                               cp_comm_type="ring" if rank == 0 else "a2a"))
    buf = moe.Buffer(None, transport="collective")
    x = torch.randn(5, 16 if rank == 0 else 32)
    idx = torch.randint(0, 4, (5, 2))
    layout = buf.get_dispatch_layout(idx, 4)
    got["moe"] = _raises(lambda: buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                              num_tokens_per_expert=layout[2], topk_idx=idx))
    # the same arguments everywhere still run
    _, outs = tp.all_gather_matmul(torch.randn(4, 8), [torch.randn(8, 6)])
    got["ok"] = tuple(outs[0].shape)
    return got


@pytest.mark.dist
def test_differing_arguments_raise_on_every_rank():
    res = run_distributed(_mismatches, 2, backend="gloo")
    for got in res:
        assert "all_gather_matmul: the ranks of the group passed different arguments (a_shard: rank 0 ((4, 8)" in \
            got["ag"] and "rank 1 ((3, 8)" in got["ag"]
        assert "matmul_reduce_scatter" in got["rs"] and "scatter_dim: rank 0 0, rank 1 1" in got["rs"]
        assert "cp_comm_type: rank 0 'ring', rank 1 'a2a'" in got["cp"]
        assert "Buffer.dispatch" in got["moe"] and "x: rank 0 ((16,), 'float32'), rank 1 ((32,)" in got["moe"]
        assert got["ok"] == (8, 6)


def _packed_refusal(rank, world):
    from turbo_dist import cp

    os.environ.pop("TURBO_DIST_CHECK_RANKS", None)  # always on: no switch needed
    n = 16 if rank == 0 else 8  # rank 1's shard is not the plan's length
    q, k = torch.randn(n, 4, 8), torch.randn(n, 2, 8)
    cu = torch.tensor([0, 8, 20, 32], dtype=torch.int32)
    try:
        cp.context_parallel_attention(q, k, k, causal=True, cp_comm_type="a2a", load_balance=False,
                                      cu_seqlens_q=cu, cu_seqlens_k=cu)
    except ValueError as exc:
        return "another rank" in str(exc) or "cu_seqlens_q must end" in str(exc)
    return "no error"


@pytest.mark.dist
def test_packed_cp_refusal_on_one_rank_raises_on_every_rank():
    assert run_distributed(_packed_refusal, 2, backend="gloo") == [True, True]
