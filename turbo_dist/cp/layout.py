"""Sequence layouts for context parallelism: which chunks of the full sequence a rank holds.

The full sequence of length S is cut into `num_chunks` equal chunks:
  - load_balance=True ("zigzag"): 2*cp chunks, rank r holds chunks (r, 2*cp-1-r) in that order, so
    under a causal mask every rank has the same amount of work (one early chunk, one late chunk);
  - load_balance=False ("contiguous"): cp chunks, rank r holds chunk r.
A local shard is the concatenation of its chunks along the sequence dimension.

Collectives over a group deliver rank-major buffers `[cp, *shard_shape]`; `gathered_to_natural`
turns one into the full sequence in natural order and `natural_to_scattered` does the reverse
(one copy each).
"""
import torch
import torch.distributed as dist

from ._comm import _all_gather

_INDEX_CACHE = {}


def num_chunks(cp, load_balance):
    return 2 * cp if load_balance else cp


def chunk_ids(rank, cp, load_balance):
    """Global chunk indices held by `rank`, in local order."""
    return (rank, 2 * cp - 1 - rank) if load_balance else (rank,)


def _reversed(cp, device):
    key = (cp, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        idx = _INDEX_CACHE[key] = torch.arange(cp - 1, -1, -1, device=device)
    return idx


def _norm_dim(dim, ndim):
    if not -ndim <= dim < ndim:
        raise ValueError(f"seq_dim {dim} out of range for a {ndim}-d tensor")
    return dim % ndim


def gathered_to_natural(buf, cp, zigzag, seq_dim):
    """buf: [cp, *shard_shape] (rank-major) -> shard_shape with seq_dim of length cp*S_local, natural order.

    `seq_dim` indexes shard_shape. Without zigzag this is a view where the layout allows it; with
    zigzag it is one copy: natural chunks 0..cp-1 are the ranks' first halves in rank order,
    chunks cp..2cp-1 their second halves in reverse rank order.
    """
    x = buf.movedim(0, seq_dim)  # [..., cp, S_local, ...]
    if not zigzag:
        return x.flatten(seq_dim, seq_dim + 1)
    half = x.shape[seq_dim + 1] // 2
    x = x.unflatten(seq_dim + 1, (2, half))  # [..., cp, 2, half, ...]
    shape = list(x.shape)
    res = torch.empty(shape[:seq_dim] + [2 * cp, half] + shape[seq_dim + 3:], dtype=buf.dtype, device=buf.device)
    res.narrow(seq_dim, 0, cp).copy_(x.select(seq_dim + 1, 0))
    res.narrow(seq_dim, cp, cp).index_copy_(seq_dim, _reversed(cp, buf.device), x.select(seq_dim + 1, 1))
    return res.flatten(seq_dim, seq_dim + 1)


def natural_to_scattered(x, cp, zigzag, seq_dim, dtype=None):
    """x: full sequence in natural order along seq_dim -> new contiguous [cp, *shard_shape] (rank-major)."""
    shape = list(x.shape)
    s_loc = shape[seq_dim] // cp
    out = torch.empty([cp] + shape[:seq_dim] + [s_loc] + shape[seq_dim + 1:], dtype=dtype or x.dtype, device=x.device)
    ov = out.movedim(0, seq_dim)  # [..., cp, S_local, ...], a view of out
    if not zigzag:
        ov.copy_(x.unflatten(seq_dim, (cp, s_loc)))
        return out
    half = s_loc // 2
    ov = ov.unflatten(seq_dim + 1, (2, half))  # [..., cp, 2, half, ...], still a view of out
    xc = x.unflatten(seq_dim, (2 * cp, half))
    ov.select(seq_dim + 1, 0).copy_(xc.narrow(seq_dim, 0, cp))
    ov.select(seq_dim + 1, 1).index_copy_(seq_dim, _reversed(cp, x.device), xc.narrow(seq_dim, cp, cp).to(out.dtype))
    return out


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group() before cp.shard/unshard")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group it was "
                         "given (cp.shard / unshard take the CP group this rank belongs to)")
    return rank, dist.get_world_size(group)


def _check_seq(n, cp, load_balance, what):
    nch = num_chunks(cp, load_balance)
    if n % nch:
        raise ValueError(
            f"{what}: sequence length {n} must be divisible by {nch} "
            f"({'2*cp' if load_balance else 'cp'} chunks, cp={cp}, load_balance={load_balance})"
        )


def shard_local(x, rank, cp, seq_dim=1, load_balance=True):
    """This rank's shard of the full-sequence tensor `x` (no communication; differentiable)."""
    seq_dim = _norm_dim(seq_dim, x.dim())
    s = x.shape[seq_dim]
    load_balance = load_balance and cp > 1  # one rank: both layouts are the natural order
    _check_seq(s, cp, load_balance, "shard")
    size = s // num_chunks(cp, load_balance)
    pieces = [x.narrow(seq_dim, c * size, size) for c in chunk_ids(rank, cp, load_balance)]
    return torch.cat(pieces, dim=seq_dim) if len(pieces) > 1 else pieces[0].contiguous()


def shard(x, group=None, seq_dim=1, load_balance=True):
    """This rank's shard of `x`, the full sequence (same on every rank), e.g. [B, S, H, D] -> [B, S/cp, H, D].

    load_balance=True: zigzag layout (chunks r and 2cp-1-r of 2cp chunks), what causal CP expects for
    equal work per rank; False: contiguous chunk r of cp. Differentiable (a slice of x).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard expects a tensor, got {type(x).__name__}")
    rank, cp = _group_info(group)
    return shard_local(x, rank, cp, seq_dim, load_balance)


def local_positions(seq_len, group=None, load_balance=True, device=None):
    """Global positions [S/cp] (int64) of this rank's tokens in a sequence of `seq_len` (e.g. for RoPE)."""
    rank, cp = _group_info(group)
    load_balance = load_balance and cp > 1  # one rank: both layouts are the natural order
    _check_seq(seq_len, cp, load_balance, "local_positions")
    size = seq_len // num_chunks(cp, load_balance)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunk_ids(rank, cp, load_balance)])


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, seq_dim, load_balance, rank, cp):
        ctx.args = (rank, cp, seq_dim, load_balance)
        # gloo on CUDA tensors (the shared-GPU test mode): gather through host memory
        staged = x.is_cuda and str(dist.get_backend(group)).lower() == "gloo"
        src = x.detach().cpu() if staged else x.contiguous()
        buf = torch.empty((cp * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
        _all_gather(buf, src.contiguous(), group=group)
        buf = buf.to(x.device) if staged else buf
        return gathered_to_natural(buf.view((cp,) + tuple(x.shape)), cp, load_balance, seq_dim).contiguous()

    @staticmethod
    def backward(ctx, grad):  # a slice of the gradient: differentiable as it is (no first_order_only)
        rank, cp, seq_dim, load_balance = ctx.args
        # Every rank sees the whole output; each one takes the gradient of the part it owns
        # (the convention for a loss computed identically on all ranks).
        return shard_local(grad, rank, cp, seq_dim, load_balance), None, None, None, None, None


def unshard(x, group=None, seq_dim=1, load_balance=True):
    """Inverse of `shard`: all-gather the local shards into the full sequence in natural order.

    Differentiable: the gradient of a rank's shard is its part of the full gradient (the loss is
    assumed to be computed the same way on every rank).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"unshard expects a tensor, got {type(x).__name__}")
    group = group if group is not None else dist.group.WORLD
    rank, cp = _group_info(group)
    seq_dim = _norm_dim(seq_dim, x.dim())
    if cp == 1:  # one rank: both layouts are the natural order
        return x
    if load_balance and x.shape[seq_dim] % 2:
        raise ValueError(f"unshard: a zigzag shard has an even local length, got {x.shape[seq_dim]} (seq_dim={seq_dim})")
    return _Unshard.apply(x, group, seq_dim, load_balance, rank, cp)
