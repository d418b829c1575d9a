"""Second derivatives (differentiating a gradient taken with create_graph=True: gradient penalties, Hessian-vector
products) through turbo_dist's autograd ops: exact where the gradients are the op itself again (gemm, grouped_gemm:
tests in test_ops_gemm.py), refused with NotImplementedError where the backward runs kernels or communication with
no derivative of its own (FP8 GEMMs, async-TP linears, MoE dispatch / combine; attention: test_ops_attention.py,
test_cp.py), on every rank, before any communication of that backward. A plain backward is unchanged."""
import pytest
import torch

from turbo_dist.testing import run_distributed


def test_fp8_gemm_refuses_second_derivatives():
    from turbo_dist import ops
    from turbo_dist.ops import Float8QuantConfig, ScalingGranularity

    a = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(32, 16, requires_grad=True)
    cfg = Float8QuantConfig(granularity=ScalingGranularity.ROWWISE)
    out = ops.gemm_fp8(a, b, config=cfg, out_dtype=torch.float32)
    (da,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(NotImplementedError, match="gemm_fp8: second derivatives"):
        torch.autograd.grad(da.square().sum(), a)
    out = ops.gemm_fp8(a, b, config=cfg, out_dtype=torch.float32)
    (da,) = torch.autograd.grad(out.square().sum(), a)  # first order: as before
    assert da.shape == a.shape and not da.requires_grad


def _tp_and_moe(rank, world):
    import torch.distributed as dist

    from turbo_dist import moe, tp

    got = []
    torch.manual_seed(0)
    # sequence parallel, sequence first: the column layer takes this rank's S/W rows of the full input features,
    # the row layer all S rows of its 1/W of the input features
    for layer, x in ((tp.ColumnParallelLinear(8, 8 * world, group=None), torch.randn(4, 1, 8)),
                     (tp.RowParallelLinear(8 * world, 8, group=None), torch.randn(4 * world, 1, 8))):
        x.requires_grad_(True)
        y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        try:
            torch.autograd.grad(gx.square().sum(), x)
            got.append(f"{type(layer).__name__}: no error")
        except NotImplementedError as exc:
            got.append("second derivatives" in str(exc))
    buf = moe.Buffer(None, transport="collective")
    x = torch.randn(6, 16, requires_grad=True)
    idx = torch.randint(0, 2 * world, (6, 2))
    w = torch.rand(6, 2)
    recv_x, _, _, _, handle = moe.dispatch(buf, x, idx, w, num_experts=2 * world)
    (gx,) = torch.autograd.grad(recv_x.square().sum(), x, create_graph=True)
    try:
        torch.autograd.grad(gx.square().sum(), x)
        got.append("moe.dispatch: no error")
    except NotImplementedError as exc:
        got.append("second derivatives" in str(exc))
    dist.barrier()  # every rank got here: none waits in a collective
    return got


@pytest.mark.dist
def test_tp_and_moe_refuse_second_derivatives_on_every_rank():
    assert run_distributed(_tp_and_moe, 2, backend="gloo") == [[True, True, True]] * 2
