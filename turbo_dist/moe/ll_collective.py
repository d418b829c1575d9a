"""The `collective` path of the low-latency mode (moe/low_latency.py): dispatch is one all_gather of fixed-size
slots [M, row] (a token's row goes to every rank: with top-8 routing it needs most of them anyway, and a
fixed-slot all_to_all would move the same bytes); combine all_gathers the top-k weights, each rank sums its
experts' rows per source token (fp32, weighted), and one equal-split all_to_all returns those partial sums.
NCCL or gloo; fixed shapes, no host reads."""
import torch
import torch.distributed as dist

from .collective import _columns, _pack, _unpack


def dispatch_send(rt, payload, scales, topk_idx, num_max, hidden, async_op):
    """Every rank's fixed-size slots [M, row] (expert ids, payload, scales) gathered to every rank; returns
    `pending()` -> (rows_x [R * M, H], rows_s or None, all_idx [R, M, K], "collective")."""
    t, k = topk_idx.shape
    dev = payload.device
    x_bytes = payload.contiguous().view(torch.uint8).view(t, -1) if t else \
        torch.empty(0, hidden * payload.element_size(), dtype=torch.uint8, device=dev)
    specs = [("idx", k, torch.int64), ("x", x_bytes.size(1), torch.uint8),
             ("s", scales.size(1) if scales is not None else 0, torch.float32)]
    cols, row_bytes = _columns(specs)
    idx = torch.full((num_max, k), -1, dtype=torch.int64, device=dev)
    idx[:t] = topk_idx
    parts = {"idx": idx, "x": _pad_rows(x_bytes, num_max)}
    if scales is not None:
        parts["s"] = _pad_rows(scales, num_max)
    send = _pack(num_max, cols, row_bytes, parts, dev)
    recv = torch.empty(rt.world_size, num_max, row_bytes, dtype=torch.uint8, device=dev)
    work = _all_gather(rt, recv, send, async_op)

    def pending():
        if work is not None:
            work.wait()
        rows = recv.view(-1, row_bytes)
        rows_x = _unpack(rows, cols, "x").view(payload.dtype)
        rows_s = _unpack(rows, cols, "s") if scales is not None else None
        return rows_x, rows_s, _unpack(rows, cols, "idx").view(rt.world_size, num_max, k), "collective"
    return pending


def combine_send(rt, x, weights, handle, num_max, hidden, async_op):
    """Each rank sums its experts' rows per source token (fp32, weighted) and returns them with one equal-split
    all_to_all; returns `pending()` -> ("partial", [R, M, H] fp32)."""
    t, k = weights.shape
    dev = x.device
    w = torch.zeros(num_max, k, dtype=torch.float32, device=dev)
    w[:t] = weights
    all_w = torch.empty(rt.world_size, num_max, k, dtype=torch.float32, device=dev)
    work = _all_gather(rt, all_w, w, False)
    all_w = all_w.view(-1, k)
    dst = handle.dst
    y = x.view(-1, hidden)
    partial = torch.zeros(rt.world_size * num_max, hidden, dtype=torch.float32, device=dev)
    for j in range(k):
        rows = y.index_select(0, dst[:, j].clamp(min=0)).float()
        partial += torch.where(dst[:, j:j + 1] >= 0, rows * all_w[:, j:j + 1], 0.0)
    back = torch.empty_like(partial)
    work = _all_to_all(rt, back, partial, async_op)

    def pending():
        if work is not None:
            work.wait()
        return "partial", back.view(rt.world_size, num_max, hidden)
    return pending


def _pad_rows(t, rows):
    if t.size(0) == rows:
        return t
    out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.size(0)] = t
    return out


def _all_gather(rt, out, inp, async_op):
    """out [R, ...] <- every rank's inp; returns the Work when async_op (None otherwise)."""
    if rt.world_size == 1:
        out[0].copy_(inp)
        return None
    if out.is_cuda:
        work = dist.all_gather_into_tensor(out.view(-1, *inp.shape[1:]), inp, group=rt.group, async_op=async_op)
    else:
        work = dist.all_gather(list(out.unbind(0)), inp, group=rt.group, async_op=async_op)
    return work if async_op else None


def _all_to_all(rt, out, inp, async_op):
    if rt.world_size == 1:
        out.copy_(inp)
        return None
    work = dist.all_to_all_single(out, inp, group=rt.group, async_op=async_op)
    return work if async_op else None
