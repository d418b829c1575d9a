"""Low-latency MoE (moe/low_latency.py): the per-token FP8 casts DeepEP's low-latency dispatch applies and the
placement of received tokens into DeepEP's per-expert layout in torch ops (`place_tokens`: the CPU path and the
reference kernels/moe_ll_place.py matches on CUDA). Fixed shapes, no host reads (CUDA-graph capturable)."""
import torch

_FP8_MAX = 448.0
_FP8_INV_MAX = 1.0 / _FP8_MAX  # amax * this == CUDA's amax / 448.0 (see per_token_cast_to_fp8)


# ----------------------------------------------------------------------------- FP8 helpers
def per_token_cast_to_fp8(x, round_scale=False):
    """x [T, H] -> (x_fp8 [T, H] e4m3, scales [T, H / 128] fp32), x ~= x_fp8 * scale per 128 channels.

    round_scale: scales rounded up to a power of 2 (DeepEP's `round_scale`, what UE8M0 can hold).
    Bit-identical on every device: `tensor / python_float` is a true division on CPU but a multiply by the
    fp32 reciprocal on CUDA (PyTorch's scalar-divisor shortcut), so the scale is that product on both;
    the power-of-2 rounding works on the exponent bits (log2/exp2 may round differently per device).
    """
    t, h = x.shape
    xv = x.float().view(t, h // 128, 128)
    scales = xv.abs().amax(dim=2).clamp(min=1e-4) * _FP8_INV_MAX
    if round_scale:
        scales = _pow2_ceil(scales)
    q = (xv / scales.unsqueeze(2)).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(t, h)
    return q, scales.contiguous()


def _pow2_ceil(s):
    """The smallest power of 2 >= s, for positive normal fp32 s, from the bits (exact, device independent)."""
    bits = s.contiguous().view(torch.int32)
    exp = bits & 0x7F800000
    up = torch.where((bits & 0x007FFFFF) != 0, exp + (1 << 23), exp)
    return up.view(torch.float32)


def per_token_cast_back(x_fp8, scales):
    """Inverse of per_token_cast_to_fp8: [T, H] fp32."""
    t, h = x_fp8.shape
    return (x_fp8.float().view(t, h // 128, 128) * scales.float().view(t, h // 128, 1)).view(t, h)


def pack_ue8m0(scales):
    """Power-of-2 fp32 scales [..., G] -> their exponent bytes packed 4 per int32 [..., G / 4] (byte j = group 4i+j)."""
    exp = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    exp = exp.view(*scales.shape[:-1], scales.size(-1) // 4, 4)
    shifts = torch.arange(4, device=scales.device, dtype=torch.int32) * 8
    return (exp << shifts).sum(-1, dtype=torch.int32)


# ----------------------------------------------------------------------------- placement (both paths)
def _bytes(t):
    """A [n, w] tensor's rows as raw bytes [n, w * itemsize] (FP8 has no index_copy on every device)."""
    return t.contiguous().view(torch.uint8).view(t.size(0), t.size(1) * t.element_size())


def _place(rows, target, k, out):
    """out[target[i]] = rows[i // k] where target[i] >= 0. out: [num_out + 1, row] (the last row: a dump)."""
    num_out = out.size(0) - 1
    src = torch.arange(target.numel(), device=target.device) // k
    _bytes(out).index_copy_(0, torch.where(target >= 0, target, num_out), _bytes(rows).index_select(0, src))


def place_tokens(rows_x, rows_s, all_idx, rank, experts_per_rank, num_max, out_x, out_s):
    """Sort the tokens every rank sent into DeepEP's per-expert layout, on the device, fixed shapes.

    rows_x: [R * M, H] payload of slot (source s, token t) at row s * M + t; rows_s: [R * M, G] fp32 or None;
    all_idx: [R, M, K] global expert ids (-1: none / empty slot). out_x: [E_l * R * M + 1, H] and out_s
    [E_l * R * M + 1, G] (or None) are filled (row e * R * M + i: the i-th token of expert e; the last row
    is scratch). Returns (recv_count [E_l] int32, src_info [E_l, R * M] int32 (-1 past the count),
    layout_range [E_l, R] int64, dst [R * M, K] int64: the row of (s, t, k) in out_x, -1 where not ours).
    """
    num_ranks, m, k = all_idx.shape
    e_l, n = experts_per_rank, num_ranks * num_max
    dev = all_idx.device
    flat = all_idx.reshape(-1).to(torch.int64)
    lo = rank * e_l
    local = (flat >= lo) & (flat < lo + e_l)
    expert = torch.where(local, flat - lo, torch.full_like(flat, e_l))  # e_l: the bin of entries not ours
    onehot = torch.zeros(flat.numel(), e_l + 1, dtype=torch.int32, device=dev)
    onehot.scatter_(1, expert.view(-1, 1), 1)
    csum = torch.cumsum(onehot, 0, dtype=torch.int32)
    pos = csum.gather(1, expert.view(-1, 1)).view(-1).to(torch.int64) - 1
    keep = local & (pos < n)  # a row repeating an expert could overflow its R * M slots: dropped
    dst = torch.where(keep, expert * n + pos, torch.full_like(pos, -1))

    _place(rows_x, dst, k, out_x)
    if rows_s is not None:
        _place(rows_s, dst, k, out_s)
    src = torch.full((e_l * n + 1,), -1, dtype=torch.int32, device=dev)
    token = (torch.arange(flat.numel(), device=dev) // k % m).to(torch.int32)
    src.index_copy_(0, torch.where(keep, dst, e_l * n), token)
    src_info = src[:e_l * n].view(e_l, n)
    recv_count = csum[-1, :e_l].clamp(max=n).contiguous()
    per_src = onehot.view(num_ranks, m * k, e_l + 1).sum(1, dtype=torch.int64)[:, :e_l].t()
    begin = torch.cumsum(per_src, 1) - per_src
    layout_range = ((begin << 32) | per_src).contiguous()
    return recv_count, src_info, layout_range, dst.view(num_ranks * m, k)
