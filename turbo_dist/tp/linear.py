"""Tensor-parallel linear layers (Megatron-style) whose forward and backward both overlap communication.

With sequence parallelism (the default) activations between TP blocks are sharded along the
sequence dim `seq_dim`:
- ColumnParallelLinear: y = all_gather(x) @ W_local^T. Forward is all_gather_matmul; backward's
  dx is matmul_reduce_scatter(dy, W_local) (GEMM + reduce-scatter); dW gathers again the 1/W of the
  input the forward kept (its feature slice, see turbo_dist.tp.wgrad) under the weight-gradient GEMM.
- RowParallelLinear: y = reduce_scatter(x @ W_local^T) + b. Forward is matmul_reduce_scatter;
  backward's all_gather_matmul(dy, [W_local]) returns both the gathered dy (for dW) and dx.
Without sequence parallelism they are the classic pair: Column takes the replicated x and all-reduces dx
(asynchronously, under its weight-gradient GEMM); Row all-reduces y.

Not drop-ins for Megatron's classes: no gather_output / input_is_parallel / skip_bias_add (Megatron users take
turbo_dist.integrations.megatron, which keeps Megatron's own modules), but the parameters carry the attributes
Megatron's gradient clipping reads (tensor_model_parallel, partition_dim, partition_stride; the row bias's
sequence_parallel). Memory: the column layer keeps 1/W of the gathered input for dW (as much as Megatron, which
keeps the shard and gathers it again in backward).
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from turbo_dist.ops._autograd import first_order_only
from turbo_dist.runtime import get_runtime

from . import _common as C
from . import wgrad
from .ag_matmul import all_gather_matmul
from .matmul_rs import matmul_reduce_scatter


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def _weight_grad(dy, x):
    """dW = dy^T x over all tokens: dy [..., out], x [..., in] -> [out, in]."""
    return C.gemm(_flat(dy).t(), _flat(x))


def _bias_grad(dy):
    return _flat(dy).sum(0)


class _AllGatherLinear(torch.autograd.Function):
    """y = all_gather(x, seq_dim) @ w^T (+ b); backward dx = reduce_scatter(dy @ w)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, seq_dim, algo, keep):
        x_full, (y,) = all_gather_matmul(x, [weight.t()], gather_dim=seq_dim, group=group, algo=algo)
        if bias is not None:
            y = y + bias
        kept, ctx.kept_how = wgrad.keep_input(group, x, x_full, seq_dim) if keep else (None, None)
        ctx.save_for_backward(kept, weight)
        ctx.has_bias = bias is not None
        ctx.group, ctx.seq_dim, ctx.algo = group, seq_dim, algo
        return y

    @staticmethod
    @first_order_only("turbo_dist.tp linear")
    def backward(ctx, dy):
        kept, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul_reduce_scatter(dy, weight, scatter_dim=ctx.seq_dim, group=ctx.group, algo=ctx.algo)
        if ctx.needs_input_grad[1]:
            (dw,) = wgrad.weight_grads(ctx.group, kept, ctx.kept_how, [_flat(dy).contiguous()], ctx.seq_dim,
                                       ctx.algo)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _bias_grad(dy)
        return dx, dw, db, None, None, None, None


class _LinearReduceScatter(torch.autograd.Function):
    """y = reduce_scatter(x @ w^T, seq_dim) (+ b, replicated); backward via all_gather_matmul(dy, [w])."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, seq_dim, algo):
        y = matmul_reduce_scatter(x, weight.t(), scatter_dim=seq_dim, group=group, algo=algo)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.group, ctx.seq_dim, ctx.algo = group, seq_dim, algo
        return y

    @staticmethod
    @first_order_only("turbo_dist.tp linear")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy_full, (dx,) = all_gather_matmul(dy.contiguous(), [weight], gather_dim=ctx.seq_dim, group=ctx.group,
                                           algo=ctx.algo)
        dw = _weight_grad(dy_full, x) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # The bias is replicated but each rank saw only its sequence shard: sum over the group.
            db = _bias_grad(dy).contiguous()
            dist.all_reduce(db, group=ctx.group)
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None, None


class _LinearAllReduceDgrad(torch.autograd.Function):
    """y = x @ w^T (+ b) on a replicated input (a non-SP column layer); backward: dx's all-reduce runs
    asynchronously under the weight-gradient GEMM (Megatron's allreduce_dgrad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias, ctx.group = bias is not None, group
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    @first_order_only("turbo_dist.tp linear")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = _flat(dy)
        dx = work = None
        if ctx.needs_input_grad[0]:
            dx = C.gemm(dy2, weight).view(*dy.shape[:-1], weight.shape[1])
            work = dist.all_reduce(dx, group=ctx.group, async_op=True)
        dw = C.gemm(dy2.t(), _flat(x)) if ctx.needs_input_grad[1] else None
        db = _bias_grad(dy) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return dx, dw, db, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (output of a non-SP row layer)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, dy):  # the identity: differentiable as it is (no first_order_only)
        return dy, None


def _init_weight(weight, fan_in, tp_rank):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's bound for the full layer, drawn for this rank's shard from
    its own generator: a base seed taken from the global RNG (the same on every rank when the ranks seed alike, and
    advancing it alike), offset by the TP rank. Drawn from the global RNG directly, every rank got the same shard
    (as Megatron, which forks a model-parallel RNG per TP rank, the shards must differ). load_full() takes the
    shards of one given full weight instead."""
    bound = 1.0 / math.sqrt(fan_in)
    base = int(torch.randint(0, 2 ** 62, (1,)).item())
    gen = torch.Generator().manual_seed(base + 1_000_003 * (tp_rank + 1))
    with torch.no_grad():
        shard = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        weight.copy_(shard)


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _mark_tp(param, partition_dim):
    """The attributes Megatron's gradient clipping / finalize_model_grads read on tensor-parallel parameters."""
    if param is not None:
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, partition_dim, 1


class _TPLinearBase(nn.Module):
    def __init__(self, group, sequence_parallel, seq_dim, algo):
        super().__init__()
        rt = get_runtime(group)
        self.group = group
        self.tp_size = rt.world_size
        self.tp_rank = rt.rank
        self.sequence_parallel = bool(sequence_parallel)
        if not isinstance(seq_dim, int):
            raise TypeError(f"seq_dim must be an int, got {type(seq_dim).__name__}")
        self.seq_dim = seq_dim
        self.algo = C.check_algo(algo)
        self._device = rt.device

    def _run(self, x, forward):
        """forward(x, weight, bias); under torch.autocast in its dtype, as nn.Linear: the input and parameters
        are cast first (differentiable casts: gradients come back in each one's own dtype) and the layer runs
        with autocast off (its backward, outside autocast, then sees one dtype)."""
        dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        if not torch.is_autocast_enabled(dev):
            return forward(x, self.weight, self.bias)
        dt = torch.get_autocast_dtype(dev)
        cast = [t if t is None or not t.is_floating_point() else t.to(dt) for t in (x, self.weight, self.bias)]
        with torch.autocast(dev, enabled=False):
            return forward(*cast)

    def _check_input(self, x, in_features, weight):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"input must be at least 2-D [..., {in_features}], got {tuple(x.shape)}")
        if x.shape[-1] != in_features:
            raise ValueError(f"input has last dim {x.shape[-1]}, expected {in_features} (shape {tuple(x.shape)})")
        if x.dtype != weight.dtype:
            raise TypeError(f"input is {x.dtype} but the weight is {weight.dtype}")
        seq_dim = C.normalize_dim(self.seq_dim, x.dim(), "seq_dim")
        if self.sequence_parallel and seq_dim == x.dim() - 1:
            raise ValueError(f"seq_dim={self.seq_dim} is the feature (last) dim of the input {tuple(x.shape)}: the "
                             "sequence must be another dim")
        return seq_dim


def _check_full(layer, weight, bias):
    full = (layer.out_features, layer.in_features)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != full:
        raise ValueError(f"load_full: weight must be the full [{full[0]}, {full[1]}], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if bias is not None:
        if layer.bias is None:
            raise ValueError("load_full: a bias was given but this layer has none (bias=False)")
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (layer.out_features,):
            raise ValueError(f"load_full: bias must be the full [{layer.out_features}], got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")


class ColumnParallelLinear(_TPLinearBase):
    """y_local = x @ W[rows of this rank]^T (+ b_local): the output features are split over the group.

    in_features, out_features: the full (unsharded) sizes; out_features must divide by the group size.
    weight: [out_features / W, in_features]; bias: [out_features / W].
    sequence_parallel=True: input [..., S / W, ..., in] sharded along `seq_dim`, output [..., S, ..., out / W]
    (all_gather_matmul forward, matmul_reduce_scatter backward). False: input replicated [..., in].
    algo: passed to the fused ops ('auto', 'ring', 'direct', 'collective').
    """

    def __init__(self, in_features, out_features, bias=True, group=None, sequence_parallel=True, seq_dim=0,
                 device=None, dtype=None, algo=None):
        super().__init__(group, sequence_parallel, seq_dim, algo)
        _check_size("in_features", in_features)
        _check_size("out_features", out_features)
        if out_features % self.tp_size:
            raise ValueError(f"out_features={out_features} is not divisible by the TP size {self.tp_size}")
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = out_features // self.tp_size
        kw = dict(device=device or self._device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(self.out_per_rank, **kw)) if bias else None
        _init_weight(self.weight, in_features, self.tp_rank)
        _mark_tp(self.weight, 0)
        _mark_tp(self.bias, 0)

    @torch.no_grad()
    def load_full(self, weight, bias=None):
        """Take this rank's rows of a full [out_features, in_features] weight (and [out_features] bias)."""
        _check_full(self, weight, bias)
        sl = slice(self.tp_rank * self.out_per_rank, (self.tp_rank + 1) * self.out_per_rank)
        self.weight.copy_(weight[sl])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias[sl])
        return self

    def forward(self, x):
        return self._run(x, self._forward)

    def _forward(self, x, weight, bias):
        seq_dim = self._check_input(x, self.in_features, weight)
        if self.sequence_parallel:
            return _AllGatherLinear.apply(x, weight, bias, self.group, seq_dim, self.algo, wgrad.needed(weight))
        return _LinearAllReduceDgrad.apply(x, weight, bias, self.group)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features} ({self.out_per_rank}/rank), "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, seq_dim={self.seq_dim}")


class RowParallelLinear(_TPLinearBase):
    """y = sum over ranks of x_local @ W[:, cols of this rank]^T (+ b): the input features are split.

    in_features, out_features: full sizes; in_features must divide by the group size.
    weight: [out_features, in_features / W]; bias: [out_features], replicated (its gradient is
    all-reduced over the group in backward under sequence parallelism).
    sequence_parallel=True: input [..., S, ..., in / W], output [..., S / W, ..., out] sharded along
    `seq_dim` (matmul_reduce_scatter forward, all_gather_matmul backward). False: output all-reduced.
    """

    def __init__(self, in_features, out_features, bias=True, group=None, sequence_parallel=True, seq_dim=0,
                 device=None, dtype=None, algo=None):
        super().__init__(group, sequence_parallel, seq_dim, algo)
        _check_size("in_features", in_features)
        _check_size("out_features", out_features)
        if in_features % self.tp_size:
            raise ValueError(f"in_features={in_features} is not divisible by the TP size {self.tp_size}")
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = in_features // self.tp_size
        kw = dict(device=device or self._device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        _init_weight(self.weight, in_features, self.tp_rank)
        _mark_tp(self.weight, 1)
        if self.bias is not None:  # replicated; Megatron all-reduces its gradient under sequence parallelism
            self.bias.sequence_parallel = self.sequence_parallel

    @torch.no_grad()
    def load_full(self, weight, bias=None):
        """Take this rank's columns of a full [out_features, in_features] weight (and the full bias)."""
        _check_full(self, weight, bias)
        sl = slice(self.tp_rank * self.in_per_rank, (self.tp_rank + 1) * self.in_per_rank)
        self.weight.copy_(weight[:, sl])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self

    def forward(self, x):
        return self._run(x, self._forward)

    def _forward(self, x, weight, bias):
        seq_dim = self._check_input(x, self.in_per_rank, weight)
        if self.sequence_parallel:
            return _LinearReduceScatter.apply(x, weight, bias, self.group, seq_dim, self.algo)
        y = _ReduceFromTP.apply(nn.functional.linear(x, weight), self.group)
        return y + bias if bias is not None else y

    def extra_repr(self):
        return (f"in_features={self.in_features} ({self.in_per_rank}/rank), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, seq_dim={self.seq_dim}")
