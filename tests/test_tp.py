"""Async TP (turbo_dist.tp) against a plain reference: gather everything, matmul, scatter.

Every rank builds every rank's inputs from seeds, so it computes its expected outputs locally.
CPU (gloo) runs the collective path; GPU tests force each algorithm ('ring', 'direct' over
symmetric memory, 'collective'), also at world size 1, where a rank signals and copies to itself
(that exercises the pipelines and the signal kernels on one GPU), and compare with
torch.ops.symm_mem's fused ops.
"""
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from turbo_dist import tp
from turbo_dist.kernels import tp_signal
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import rank_device, saved_activation_numel

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0


# ------------------------------------------------------------------------------------- helpers
def rand(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def check_close(out, ref, dtype, what, tol=1e-2):
    """fp32: elementwise; bf16/fp16/fp8 inputs: relative error of the whole tensor below `tol`."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    out, ref = out.float(), ref.float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
    else:
        err = ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()
        assert err < tol, f"{what}: relative error {err:.3e} (tolerance {tol:.0e})"


def quantize(x, rowwise):
    """x fp32 [..., K] -> (fp8, fp32 dequantization scale [..., 1] or [1])."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax().reshape(1)
    scale = amax.clamp_min(1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale.float()


def quantize_weight(b, colwise):
    """b fp32 [K, N] -> (fp8 column-major [K, N] (a [N, K] row-major's transpose), scale [1, N] or [1])."""
    q, s = quantize(b.t().contiguous(), colwise)  # [N, K], scale [N, 1] or [1]
    return q.t(), (s.reshape(1, -1) if colwise else s)


def torch_fused_ops():
    """torch.ops.symm_mem (its ops are registered when torch.distributed._symmetric_memory is imported) or None."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return None
    ops = getattr(torch.ops, "symm_mem", None)
    return ops if ops is not None and hasattr(ops, "fused_all_gather_matmul") else None


def group_name(group=None):
    group = group or dist.group.WORLD
    name = group.group_name
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(name)
    return name


# ------------------------------------------------------------------------------ all_gather_matmul
# (full A shape, gather_dim, [N of each b], column-major b?) ; shapes scale with `m` (rows per rank).
def ag_cases(w, m, k):
    return [
        ((w * m, k), 0, [16, 24], False),
        ((w * m, k), 0, [32], True),              # b = weight.t() (column-major, no copy)
        ((2, w * m, k), 1, [16], False),          # 3-D, gather the sequence dim
        ((w * 2, m, k), 0, [24], True),           # 3-D, gather the batch dim
        ((m, w * k), 1, [16, 8], False),          # 2-D, gather the contraction dim
        ((2, m, w * k), -1, [16], True),          # 3-D, contraction dim, negative index
    ]


def _all_gather_matmul(rank, world, dtype_name, algo, m, k, calls=1):
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    n_checked = 0
    for ci, (full_shape, gdim, ns, colmajor) in enumerate(ag_cases(world, m, k)):
        a_full = rand(full_shape, 100 + ci, dtype, dev)
        k_full = full_shape[-1]
        bs = [(rand((n, k_full), 200 + ci * 10 + j, dtype, dev).t() if colmajor
               else rand((k_full, n), 200 + ci * 10 + j, dtype, dev)) for j, n in enumerate(ns)]
        a_shard = a_full.chunk(world, dim=gdim)[rank].contiguous()
        refs = [(a_full.float() @ b.float()) for b in bs]
        for call in range(calls):  # repeated calls cycle the double-buffered symmetric buffers
            for return_a in (True, False):
                a_out, outs = tp.all_gather_matmul(a_shard, bs, gather_dim=gdim, return_a=return_a, algo=algo)
                ran = tp.last_algo()
                assert ran == algo if algo not in (None, "auto") else ran in ("ring", "direct", "collective")
                if dev.type == "cpu":
                    assert ran == "collective", ran  # gloo: no peer access, whatever was asked
                if return_a:
                    assert torch.equal(a_out, a_full), f"case {ci}: gathered A differs"
                else:
                    assert a_out is None
                assert len(outs) == len(bs)
                for j, (o, r) in enumerate(zip(outs, refs)):
                    assert o.dtype == dtype
                    check_close(o, r, dtype, f"case {ci} (gather_dim {gdim}) out[{j}] call {call}")
                n_checked += 1
            out_dtype = torch.bfloat16 if dtype == torch.float32 else torch.float32  # e.g. dW into fp32
            _, outs = tp.all_gather_matmul(a_shard, bs, gather_dim=gdim, return_a=False, algo=algo,
                                           out_dtype=out_dtype)
            for j, (o, r) in enumerate(zip(outs, refs)):
                assert o.dtype == out_dtype, f"case {ci}: out[{j}] is {o.dtype}, asked for {out_dtype}"
                check_close(o, r, torch.bfloat16, f"case {ci} (gather_dim {gdim}) out[{j}] as {out_dtype}")
    if dev.type == "cuda":
        tp.check_errors()
    return n_checked


# --------------------------------------------------------------------------- matmul_reduce_scatter
def rs_cases(w, m, k):
    return [
        ((w * m, k), 24, 0, False),
        ((w * m, k), 16, 0, True),
        ((2, w * m, k), 16, 1, False),            # 3-D, scatter the sequence dim
        ((w * 2, m, k), 8, 0, True),              # 3-D, scatter the batch dim
        ((m, k), w * 8, 1, False),                # scatter the output features (last dim)
        ((2, m, k), w * 8, -1, True),
    ]


def _matmul_reduce_scatter(rank, world, dtype_name, algo, m, k, calls=1):
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    n_checked = 0
    for ci, (a_shape, n, sdim, colmajor) in enumerate(rs_cases(world, m, k)):
        # every rank holds its own partial input a_r and weight b_r; the result is sum_r a_r @ b_r
        a_all = [rand(a_shape, 300 + ci * 16 + r, dtype, dev) for r in range(world)]
        b_all = [(rand((n, k), 400 + ci * 16 + r, dtype, dev).t() if colmajor else rand((k, n), 400 + ci * 16 + r,
                                                                                        dtype, dev))
                 for r in range(world)]
        total = sum(a.float() @ b.float() for a, b in zip(a_all, b_all))
        for call in range(calls):
            for reduce_op in ("sum", "avg"):
                out = tp.matmul_reduce_scatter(a_all[rank], b_all[rank], scatter_dim=sdim, reduce_op=reduce_op,
                                               algo=algo)
                ref = (total / world if reduce_op == "avg" else total).chunk(world, dim=sdim)[rank]
                assert out.dtype == dtype and out.is_contiguous()
                check_close(out, ref, dtype, f"case {ci} (scatter_dim {sdim}, {reduce_op}) call {call}")
                n_checked += 1
    if dev.type == "cuda":
        tp.check_errors()
    return n_checked


# ----------------------------------------------------------------------------------------- FP8
def _fp8(rank, world, algo, m, k, out_dtype_name):
    out_dtype = getattr(torch, out_dtype_name)
    dev = rank_device()
    n_checked = 0
    # all-gather + scaled GEMM: a_scale row-wise sharded, row-wise replicated, tensor-wise; b per column / tensor
    for ci, (full_shape, gdim) in enumerate([((world * m, k), 0), ((2, world * m, k), 1)]):
        x = rand(full_shape, 500 + ci, torch.float32, dev)
        for scale_kind in ("row_sharded", "row_replicated", "tensor"):
            rowwise = scale_kind != "tensor"
            a_q, a_s = quantize(x, rowwise)
            b_q, b_s = [], []
            for j, (n, colwise) in enumerate([(32, True), (16, False)]):
                q, s = quantize_weight(rand((k, n), 600 + ci * 10 + j, torch.float32, dev), colwise)
                b_q.append(q)
                b_s.append(s)
            a_shard = a_q.chunk(world, dim=gdim)[rank].contiguous()
            if scale_kind == "row_sharded":
                s_arg = a_s.chunk(world, dim=gdim)[rank].contiguous()
            elif scale_kind == "row_replicated":
                s_arg = a_s
            else:
                s_arg = a_s
            a_out, outs = tp.all_gather_scaled_matmul(a_shard, b_q, s_arg, b_s, gather_dim=gdim, out_dtype=out_dtype,
                                                      algo=algo)
            assert a_out.dtype == E4M3 and torch.equal(a_out.view(torch.uint8), a_q.view(torch.uint8))
            for j, (o, bq, bs) in enumerate(zip(outs, b_q, b_s)):
                ref = (a_q.float() * a_s) @ (bq.float() * bs)
                assert o.dtype == out_dtype
                check_close(o, ref, out_dtype if dev.type == "cuda" else torch.float32,
                            f"AG fp8 case {ci} {scale_kind} out[{j}]")
            n_checked += 1
    # scaled GEMM + reduce-scatter: row-wise / tensor-wise a_scale x per-column / tensor-wise b_scale
    for ci, (a_shape, n, sdim) in enumerate([((world * m, k), 32, 0), ((m, k), world * 16, 1),
                                             ((2, world * m, k), 16, 1)]):
        for rowwise, colwise in ((True, True), (False, False), (False, True)):
            xs = [rand(a_shape, 700 + ci * 16 + r, torch.float32, dev) for r in range(world)]
            ws = [rand((k, n), 800 + ci * 16 + r, torch.float32, dev) for r in range(world)]
            qa = [quantize(x_, rowwise) for x_ in xs]
            qb = [quantize_weight(w_, colwise) for w_ in ws]
            total = sum((aq.float() * s) @ (bq.float() * bs) for (aq, s), (bq, bs) in zip(qa, qb))
            for reduce_op in ("sum", "avg"):
                out = tp.scaled_matmul_reduce_scatter(qa[rank][0], qb[rank][0], qa[rank][1], qb[rank][1],
                                                      scatter_dim=sdim, reduce_op=reduce_op, out_dtype=out_dtype,
                                                      algo=algo)
                ref = (total / world if reduce_op == "avg" else total).chunk(world, dim=sdim)[rank]
                assert out.dtype == out_dtype
                check_close(out, ref, out_dtype if dev.type == "cuda" else torch.float32,
                            f"RS fp8 case {ci} rowwise={rowwise} colwise={colwise} {reduce_op}")
                n_checked += 1
    if dev.type == "cuda":
        tp.check_errors()
    return n_checked


# ---------------------------------------------------------------------------------- linear layers
def _mlp(rank, world, dtype_name, algo, seq_dim, sequence_parallel, tokens, hidden, ffn):
    """Column -> gelu -> Row against a single-process nn.Linear MLP: outputs and every gradient."""
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    tol = 3e-2  # low precision: activations are rounded between the layers, the fp32 reference's are not
    torch.manual_seed(0)
    lin1 = nn.Linear(hidden, ffn).to(dev)
    lin2 = nn.Linear(ffn, hidden).to(dev)
    with torch.no_grad():  # round the reference's weights to the test dtype so both see the same values
        for p in list(lin1.parameters()) + list(lin2.parameters()):
            p.copy_(p.to(dtype).float())
    shape = [2, 2]
    shape[seq_dim] = tokens
    x_full = rand(shape + [hidden], 11, dtype, dev).float()
    dy_full = rand(shape + [hidden], 12, dtype, dev).float()
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = lin2(torch.nn.functional.gelu(lin1(x_ref)))
    (y_ref * dy_full).sum().backward()

    col = tp.ColumnParallelLinear(hidden, ffn, sequence_parallel=sequence_parallel, seq_dim=seq_dim, dtype=dtype,
                                  algo=algo).load_full(lin1.weight, lin1.bias)
    row = tp.RowParallelLinear(ffn, hidden, sequence_parallel=sequence_parallel, seq_dim=seq_dim, dtype=dtype,
                               algo=algo).load_full(lin2.weight, lin2.bias)
    if sequence_parallel:
        x = x_full.chunk(world, dim=seq_dim)[rank].to(dtype).contiguous().requires_grad_(True)
        dy = dy_full.chunk(world, dim=seq_dim)[rank].to(dtype)
        y_exp = y_ref.detach().chunk(world, dim=seq_dim)[rank]
        dx_exp = x_ref.grad.chunk(world, dim=seq_dim)[rank]
    else:
        x = x_full.to(dtype).requires_grad_(True)
        dy = dy_full.to(dtype)
        y_exp, dx_exp = y_ref.detach(), x_ref.grad
    for step in range(2):  # twice: the second backward accumulates into .grad like a training step
        h, kept = saved_activation_numel(lambda: col(x), col.parameters())
        # the column layer keeps 1/W of its gathered input for dW (x's size), never the gathered input
        assert kept == x.numel(), f"column layer saved {kept} activation elements, its input has {x.numel()}"
        y = row(torch.nn.functional.gelu(h))
        (y * dy).sum().backward()
        check_close(y, y_exp, dtype, f"forward step {step}", tol)
    f_per = ffn // world  # the column layer's output rows = the row layer's input columns
    rows = cols = slice(rank * f_per, (rank + 1) * f_per)
    check_close(x.grad, 2 * dx_exp, dtype, "grad of the input", tol)
    check_close(col.weight.grad, 2 * lin1.weight.grad[rows], dtype, "column weight grad", tol)
    check_close(col.bias.grad, 2 * lin1.bias.grad[rows], dtype, "column bias grad", tol)
    check_close(row.weight.grad, 2 * lin2.weight.grad[:, cols], dtype, "row weight grad", tol)
    check_close(row.bias.grad, 2 * lin2.bias.grad, dtype, "row bias grad", tol)
    if dev.type == "cuda":
        tp.check_errors()
    return True


# --------------------------------------------------------------------------------------- errors
def _errors(rank, world):
    a = torch.randn(4, 8)
    b = torch.randn(8, 6)
    with pytest.raises(TypeError, match="float16"):
        tp.all_gather_matmul(a, [b.half()])
    with pytest.raises(TypeError, match="list"):
        tp.all_gather_matmul(a, b)
    with pytest.raises(ValueError, match=r"\[8, N\]"):
        tp.all_gather_matmul(a, [torch.randn(7, 6)])
    with pytest.raises(ValueError, match="gather_dim"):
        tp.all_gather_matmul(a, [b], gather_dim=2)
    with pytest.raises(ValueError, match="at least 2"):
        tp.all_gather_matmul(torch.randn(8), [b])
    with pytest.raises(TypeError, match="all_gather_scaled_matmul"):
        tp.all_gather_matmul(a.to(E4M3), [b.to(E4M3)])
    with pytest.raises(TypeError, match="out_dtype"):
        tp.all_gather_matmul(a, [b], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="not divisible"):
        tp.matmul_reduce_scatter(torch.randn(world * 2 + 1, 8), b, scatter_dim=0)
    with pytest.raises(ValueError, match="not divisible"):
        tp.matmul_reduce_scatter(torch.randn(4, 8), torch.randn(8, world * 3 + 1), scatter_dim=-1)
    with pytest.raises(TypeError, match="bfloat16"):
        tp.matmul_reduce_scatter(a, b.bfloat16())
    with pytest.raises(ValueError, match="reduce_op"):
        tp.matmul_reduce_scatter(a, b, reduce_op="max")
    with pytest.raises(ValueError, match="algo"):
        tp.matmul_reduce_scatter(a, b, algo="fastest")
    with pytest.raises(ValueError, match="peer access"):  # CPU has no symmetric memory
        tp.all_gather_matmul(a, [b], algo="ring")
    with pytest.raises(TypeError, match="FP8"):
        tp.scaled_matmul_reduce_scatter(a, b, torch.ones(1), torch.ones(1))
    a8, b8 = a.to(E4M3), b.to(E4M3)
    with pytest.raises(ValueError, match="a_scale"):
        tp.scaled_matmul_reduce_scatter(a8, b8, torch.ones(3, 1), torch.ones(1))
    with pytest.raises(ValueError, match="b_scale"):
        tp.scaled_matmul_reduce_scatter(a8, b8, torch.ones(1), torch.ones(1, 5))
    with pytest.raises(ValueError, match="b_scales"):
        tp.all_gather_scaled_matmul(a8, [b8], torch.ones(1), [torch.ones(1), torch.ones(1)])
    with pytest.raises(TypeError, match="b_scales\\[0\\] must be float32"):  # before anything is gathered
        tp.all_gather_scaled_matmul(a8, [b8], torch.ones(1), [torch.ones(1, dtype=torch.int64)])
    with pytest.raises(TypeError, match="a_scale must be float32"):
        tp.scaled_matmul_reduce_scatter(a8, b8, torch.ones(1, dtype=torch.float16), torch.ones(1))
    e5 = torch.float8_e5m2
    with pytest.raises(NotImplementedError, match="e5m2 x float8_e5m2"):
        tp.scaled_matmul_reduce_scatter(a.to(e5), b.to(e5), torch.ones(1), torch.ones(1))
    with pytest.raises(NotImplementedError, match="last"):
        tp.all_gather_scaled_matmul(a8, [torch.randn(8 * world, 6).to(E4M3)], torch.ones(1), [torch.ones(1)],
                                    gather_dim=1)
    with pytest.raises(ValueError, match="divisible"):
        tp.ColumnParallelLinear(8, world * 3 + 1)
    with pytest.raises(ValueError, match="divisible"):
        tp.RowParallelLinear(world * 3 + 1, 8)
    col = tp.ColumnParallelLinear(8, 4 * world)
    with pytest.raises(ValueError, match="last dim"):
        col(torch.randn(4, 9))
    with pytest.raises(TypeError, match="weight"):
        col(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="feature \\(last\\) dim"):  # it would scatter the output features
        tp.RowParallelLinear(8 * world, 8, seq_dim=-1)(torch.randn(4, 8))
    for bad in (0, -4, 8.0):
        with pytest.raises(ValueError, match="positive int"):
            tp.ColumnParallelLinear(bad, 4 * world)
    with pytest.raises(ValueError, match="full \\[" + str(4 * world) + ", 8\\]"):
        col.load_full(torch.randn(4 * world + 3, 8))
    with pytest.raises(ValueError, match="has none"):
        tp.ColumnParallelLinear(8, 4 * world, bias=False).load_full(torch.randn(4 * world, 8), torch.zeros(4 * world))
    # default init: each rank its own shard (ranks seeded alike drew the same one), within nn.Linear's bound, and
    # the parameters carry Megatron's tensor-parallel attributes
    torch.manual_seed(5)
    col, row = tp.ColumnParallelLinear(8, 4 * world), tp.RowParallelLinear(4 * world, 8)
    shards = [torch.empty_like(col.weight) for _ in range(world)]
    dist.all_gather(shards, col.weight.detach().contiguous())
    assert world == 1 or not torch.equal(shards[0], shards[1]), "every rank drew the same column shard"
    assert float(col.weight.abs().max()) <= 8 ** -0.5 and float(row.weight.abs().max()) <= (4 * world) ** -0.5
    assert (col.weight.tensor_model_parallel, col.weight.partition_dim, row.weight.partition_dim) == (True, 0, 1)
    assert row.bias.sequence_parallel is True
    # a group this rank is not a member of
    only_zero = dist.new_group([0])
    if rank != 0:
        with pytest.raises(ValueError, match="not a member"):
            tp.all_gather_matmul(a, [b], group=only_zero)
        with pytest.raises(ValueError, match="not a member"):
            tp.matmul_reduce_scatter(a, b, group=only_zero)
    else:  # rank 0 alone in its group: a world-size-1 all-gather is the identity
        a_out, (o,) = tp.all_gather_matmul(a, [b], group=only_zero)
        assert torch.equal(a_out, a)
        torch.testing.assert_close(o, a @ b)
    dist.barrier()
    return True


# ------------------------------------------------------------------------------------- CPU tests
@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_all_gather_matmul(world_size):
    results = run_distributed(_all_gather_matmul, world_size, args=("float32", None, 3, 8))
    assert results == [len(ag_cases(world_size, 3, 8)) * 2] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_matmul_reduce_scatter(world_size):
    results = run_distributed(_matmul_reduce_scatter, world_size, args=("float32", None, 3, 8))
    assert results == [len(rs_cases(world_size, 3, 8)) * 2] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_fp8_variants(world_size):
    if torch.cuda.is_available():
        pytest.skip("GPU FP8 is covered by test_gpu_fp8")
    results = run_distributed(_fp8, world_size, args=(None, 2, 16, "float32"))
    assert results == [6 + 3 * 3 * 2] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("seq_dim,sequence_parallel,hidden", [(0, True, 8), (1, True, 8), (0, False, 8),
                                                                 (1, True, 9)])
def test_parallel_linear_mlp(world_size, seq_dim, sequence_parallel, hidden):
    # hidden 9: in_features not divisible by W, the column layer keeps its sequence shard and gathers it again
    results = run_distributed(_mlp, world_size, args=("float32", None, seq_dim, sequence_parallel, 4 * world_size,
                                                       hidden, 4 * world_size))
    assert all(results)


@pytest.mark.dist
def test_errors():
    assert all(run_distributed(_errors, 2, backend="gloo"))


def test_signal_kernels_bounded_wait():
    """put/wait on a local pad; a wait on a flag nobody raises gives up and records the peer (interpreter on CPU)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    pad = torch.zeros(16, dtype=torch.int32, device=dev)
    ptrs = torch.tensor([pad.data_ptr()], dtype=torch.int64, device=dev)
    err = torch.zeros(tp_signal.ERR_NUMEL, dtype=torch.int32, device=dev)
    tp_signal.put_signal(ptrs, 3, 5, 0, 1, 1)
    tp_signal.wait_signal(pad, err, 3, 5, 0, 1, 1, 1.0)  # already there: returns at once
    assert pad[3].item() == 5 and err.tolist() == [0, 0, 0, 0]
    t0 = time.perf_counter()
    # Under the interpreter the wait is bounded by an iteration budget: it must stay near the timeout
    # (a budget of 1e8 iterations per second took ~90 s for these 2 ms there).
    tp_signal.wait_signal(pad, err, 3, 6, 0, 1, 1, 2e-3 if dev.type == "cpu" else 0.05)
    assert err.tolist() == [1, 0, 3, 6]
    assert time.perf_counter() - t0 < 10
    msg = tp_signal.describe_error(err.tolist(), 0.05)
    assert "peer rank 0" in msg and "TURBO_DIST_TIMEOUT_S" in msg
    tp_signal.wait_signal(pad, err, 3, 7, 0, 1, 1, 100.0)  # an earlier failure short-circuits later waits
    assert err.tolist() == [1, 0, 3, 6]


# ------------------------------------------------------------------------------------- GPU tests
GPU_WORLDS = [pytest.param(1, marks=pytest.mark.gpu(min_gpus=1)), pytest.param(2, marks=pytest.mark.gpu(min_gpus=2)),
              pytest.param(4, marks=pytest.mark.gpu(min_gpus=4))]
ALGOS = ["ring", "direct", "collective"]


@pytest.mark.dist
@pytest.mark.parametrize("world_size", GPU_WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_all_gather_matmul(world_size, algo):
    # 3 calls per case cycle the double-buffered symmetric buffers; growing shapes grow them
    for m, k in ((16, 64), (128, 256)):
        results = run_distributed(_all_gather_matmul, world_size, args=("bfloat16", algo, m, k, 3))
        assert results == [len(ag_cases(world_size, m, k)) * 2 * 3] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", GPU_WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_matmul_reduce_scatter(world_size, algo):
    for m, k in ((16, 64), (128, 256)):
        results = run_distributed(_matmul_reduce_scatter, world_size, args=("bfloat16", algo, m, k, 3))
        assert results == [len(rs_cases(world_size, m, k)) * 2 * 3] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", GPU_WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_fp8(world_size, algo):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need SM89+")
    results = run_distributed(_fp8, world_size, args=(algo, 32, 64, "bfloat16"))
    assert results == [6 + 3 * 3 * 2] * world_size


@pytest.mark.dist
@pytest.mark.parametrize("world_size", GPU_WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_parallel_linear_mlp(world_size, algo):
    for seq_dim in (0, 1):
        results = run_distributed(_mlp, world_size, args=("bfloat16", algo, seq_dim, True, 64 * world_size, 128,
                                                           128 * world_size))
        assert all(results)


def _vs_torch_fused(rank, world, m, k, n):
    """Ours (every algo) against torch.ops.symm_mem.fused_all_gather_matmul / fused_matmul_reduce_scatter."""
    ops = torch_fused_ops()
    dev = rank_device()
    name = group_name()
    a_shard = rand((2, m, k), 900 + rank, torch.bfloat16, dev)
    b = rand((k, n), 901, torch.bfloat16, dev)
    for gdim in (0, 1):
        a_t, (o_t,) = ops.fused_all_gather_matmul(a_shard, [b], gdim, name)
        for algo in ALGOS:
            a_o, (o,) = tp.all_gather_matmul(a_shard, [b], gather_dim=gdim, algo=algo)
            assert torch.equal(a_o, a_t), f"gathered A differs from torch's (gather_dim {gdim}, {algo})"
            check_close(o, o_t, torch.bfloat16, f"AG+GEMM vs torch (gather_dim {gdim}, {algo})")
    a = rand((2, world * m, k), 950 + rank, torch.bfloat16, dev)
    for sdim in (0, 1):
        if a.shape[sdim] % world:
            continue
        o_t = ops.fused_matmul_reduce_scatter(a, b, "sum", sdim, name)
        for algo in ALGOS:
            o = tp.matmul_reduce_scatter(a, b, scatter_dim=sdim, algo=algo)
            check_close(o, o_t, torch.bfloat16, f"GEMM+RS vs torch (scatter_dim {sdim}, {algo})")
    tp.check_errors()
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_gpu_vs_torch_fused_ops(world_size):
    if torch_fused_ops() is None:
        pytest.skip("this torch has no torch.ops.symm_mem fused ops")
    assert all(run_distributed(_vs_torch_fused, world_size, args=(64, 256, 128)))


def _pipeline_timeout(rank, world):
    """A wait on a signal nobody raises ends after the timeout and the host raises, naming the peer."""
    from turbo_dist import get_runtime
    from turbo_dist.tp import pipeline

    rt = get_runtime()
    state = pipeline.get_state(rt)
    saved = state.timeout_s
    state.timeout_s = 0.05
    try:
        t0 = time.perf_counter()
        with torch.cuda.stream(rt.comm_stream):
            state.wait(pipeline.CH_AG_READY, state.epochs["ag"] + 10, 0, 1)
        state.record_errors(rt.comm_stream)
        with pytest.raises(RuntimeError, match="peer rank 0 timed out"):
            tp.check_errors()
        assert time.perf_counter() - t0 < 30
    finally:  # leave the pooled process usable
        state.timeout_s = saved
        state.err.zero_()
        state.err_host.zero_()
        state.err_event = None
        torch.cuda.synchronize()
    a = rand((16, 64), 1, torch.bfloat16, rank_device())
    b = rand((64, 32), 2, torch.bfloat16, rank_device())
    _, (o,) = tp.all_gather_matmul(a, [b], algo="ring")  # still works afterwards
    check_close(o, a.float() @ b.float(), torch.bfloat16, "after timeout")
    return True


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_gpu_pipeline_timeout_raises():
    assert all(run_distributed(_pipeline_timeout, 1))


def _gpu_buffer_reuse(rank, world):
    """Two consecutive pipeline calls of different sizes while rank 1 lags: the second call's bytes must
    not land where the first call's are still read. Rank 1's comm stream (all-gather) or compute stream
    (reduce-scatter) sleeps inside call 1; the others run on into call 2. Fails on a layout that sizes
    the buffer halves per call (see tests/test_tp_schedule.py for the same check with simulated ranks)."""
    from turbo_dist import get_runtime
    from turbo_dist.tp import pipeline

    rt = get_runtime()
    state = pipeline.get_state(rt)
    dev = rank_device()
    sleep_cycles = int(2e8)  # ~0.1 s

    if state.epochs["ag"] % 2 == 1:  # make call 1 odd: with per-call halves, odd then even overlapped
        pipeline.all_gather_consume(rt, [torch.zeros(4, 16, device=dev)], lambda c, s: None)
    for call, (m, k) in enumerate([(4, 16), (16, 16)], start=1):
        got = {}

        def consume(chunks, src, call=call, got=got):
            if call == 1 and rank == 1 and src == rank:  # host order: before this rank's pulls are queued
                with torch.cuda.stream(rt.comm_stream):
                    torch.cuda._sleep(sleep_cycles)
            got[src] = chunks[0].clone()

        pipeline.all_gather_consume(rt, [torch.full((m, k), 100.0 * call + rank, device=dev)], consume, order="ring")
        for src in range(world):
            assert torch.equal(got[src].cpu(), torch.full((m, k), 100.0 * call + src)), f"AG call {call}, chunk {src}"

    if state.epochs["rs"] % 2 == 1:
        pipeline.produce_reduce_scatter(rt, lambda d: torch.zeros(4, 16, device=dev), 4, 16, torch.float32, "sum",
                                        torch.float32)
    for call, (m, n) in enumerate([(4, 16), (8, 32)], start=1):
        def produce(dst, call=call, m=m, n=n):
            if call == 1 and rank == 1 and dst == rank:  # the own partial (produced last) comes late
                torch.cuda._sleep(sleep_cycles)
            return torch.full((m, n), 1000.0 * call + 10.0 * rank + dst, device=dev)

        out = pipeline.produce_reduce_scatter(rt, produce, m, n, torch.float32, "sum", torch.float32, order="ring")
        expected = sum(1000.0 * call + 10.0 * r + rank for r in range(world))
        assert torch.equal(out.cpu(), torch.full((m, n), expected)), f"RS call {call}: {out[0, 0].item()} != {expected}"
    tp.check_errors()
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.gpu(min_gpus=2)),
                                        pytest.param(4, marks=pytest.mark.gpu(min_gpus=4))])
def test_gpu_pipeline_buffer_reuse_across_shapes(world_size):
    assert all(run_distributed(_gpu_buffer_reuse, world_size))


def _gpu_fresh_buffer_race(rank, world):
    """The first reduce-scatter on a new group allocates (and zeroes) its receive buffer while rank 1's
    stream is still busy: a peer's push must not be wiped by that late zeroing."""
    dev = rank_device()
    g = dist.new_group(list(range(world)))
    a = [rand((world * 64, 64), 30 + r, torch.float32, dev) for r in range(world)]
    b = [rand((64, 32), 40 + r, torch.float32, dev) for r in range(world)]
    tp.all_gather_matmul(a[rank][:64].contiguous(), [b[rank]], group=g, algo="ring")  # TP state
    if rank == 1:
        torch.cuda._sleep(int(2e8))  # queued before the RS buffer's zeroing on this rank's stream
    out = tp.matmul_reduce_scatter(a[rank], b[rank], group=g, algo="ring")
    ref = sum(x @ y for x, y in zip(a, b)).chunk(world)[rank]
    # bf16-level tolerance (the GEMM backend may use TF32); a wiped partial is off by ~50%
    check_close(out, ref, torch.bfloat16, "first reduce-scatter on a fresh group")
    tp.check_errors(g)
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.gpu(min_gpus=2))])
def test_gpu_fresh_buffer_first_push(world_size):
    assert all(run_distributed(_gpu_fresh_buffer_race, world_size))


def test_pipelines_are_not_captured_in_cuda_graphs(monkeypatch):
    """The symmetric-memory pipelines' flag epochs are host counters (a replay would not wait for peers): under
    CUDA-graph capture 'auto' takes the collective path and an explicit 'ring' / 'direct' raises."""
    from types import SimpleNamespace

    from turbo_dist.tp import _common as C

    rt = SimpleNamespace(has_peer_access=True, device=torch.device("cuda", 0), comm_stream=object(),
                         shmem_backend="torch")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert C.choose_algo(rt, "auto", 64 << 20, 4096) == "ring"
    assert C.choose_algo(rt, "direct", 64 << 20, 4096) == "direct"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert C.choose_algo(rt, "auto", 64 << 20, 4096) == "collective"
    assert C.choose_algo(rt, "collective", 64 << 20, 4096) == "collective"
    for algo in ("ring", "direct"):
        with pytest.raises(NotImplementedError, match="CUDA graph"):
            C.choose_algo(rt, algo, 64 << 20, 4096)


def _autocast_and_no_grad(rank, world):
    """Under torch.autocast the layers compute in its dtype like nn.Linear (fp32 parameters get fp32 gradients);
    under no_grad the column layer keeps nothing for dW (no slice copied)."""
    from turbo_dist.tp import wgrad

    dev = rank_device()
    hidden, ffn, tokens = (8, 4 * world, 4 * world) if dev.type == "cpu" else (64, 64 * world, 32 * world)
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(hidden, ffn).to(dev), nn.Linear(ffn, hidden).to(dev)
    x_full = rand((tokens, 2, hidden), 31, device=dev)
    dy_full = rand((tokens, 2, hidden), 32, device=dev)
    for sp in (True, False):
        col = tp.ColumnParallelLinear(hidden, ffn, sequence_parallel=sp).to(dev).load_full(lin1.weight, lin1.bias)
        row = tp.RowParallelLinear(ffn, hidden, sequence_parallel=sp).to(dev).load_full(lin2.weight, lin2.bias)
        x_ref = x_full.clone().requires_grad_(True)
        ref = lin2(torch.nn.functional.gelu(lin1(x_ref)))
        (ref * dy_full).sum().backward()
        x = (x_full.chunk(world)[rank] if sp else x_full).clone().requires_grad_(True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            h = col(x)
            y = row(torch.nn.functional.gelu(h))
        assert h.dtype == y.dtype == torch.bfloat16, (sp, h.dtype, y.dtype)
        (y.float() * (dy_full.chunk(world)[rank] if sp else dy_full)).sum().backward()
        assert col.weight.grad.dtype == row.weight.grad.dtype == x.grad.dtype == torch.float32
        rows = slice(rank * ffn // world, (rank + 1) * ffn // world)
        check_close(y, ref.detach().chunk(world)[rank] if sp else ref.detach(), torch.bfloat16, f"sp={sp} out", 3e-2)
        check_close(col.weight.grad, lin1.weight.grad[rows], torch.bfloat16, f"sp={sp} dW1", 3e-2)
        check_close(row.weight.grad, lin2.weight.grad[:, rows], torch.bfloat16, f"sp={sp} dW2", 3e-2)
        check_close(x.grad, x_ref.grad.chunk(world)[rank] if sp else x_ref.grad, torch.bfloat16, f"sp={sp} dx", 3e-2)
        lin1.zero_grad()
        lin2.zero_grad()
    kept = []
    real = wgrad.keep_input
    wgrad.keep_input = lambda *a: kept.append(1) or real(*a)
    try:
        col = tp.ColumnParallelLinear(hidden, ffn).to(dev)
        with torch.no_grad():
            col(x_full.chunk(world)[rank].contiguous())
        assert not kept, "keep_input ran under no_grad"
        col(x_full.chunk(world)[rank].contiguous())
        assert kept == [1]
    finally:
        wgrad.keep_input = real
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
def test_parallel_linear_autocast_and_no_grad(world_size):
    """CPU: gloo, CPU autocast; CUDA: CUDA autocast through the GPU paths (NCCL, or processes sharing a GPU)."""
    assert run_distributed(_autocast_and_no_grad, world_size) == [True] * world_size
