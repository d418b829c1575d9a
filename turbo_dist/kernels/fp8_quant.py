"""Triton FP8 quantization of x [R, C] (or a batch [E, R, C]) along C (the GEMM contraction dim), one pass.

Scales are dequantization factors (x ~= x_q * scale), fp32, with a leading [E] dim for a batch:
  tensorwise: [1] (one per batch entry: [E]; from a separate amax reduction), rowwise: [R, 1],
  1 x B blocks: [R, cdiv(C, B)], B x B blocks: [cdiv(R, B), cdiv(C, B)].
x may have any strides (a transposed view quantizes along its other dim); x_q is written row-major.
"""
import torch
import triton
import triton.language as tl

from .gemm import interpreting

MODE_TENSOR, MODE_ROW, MODE_1XB, MODE_BXB = 0, 1, 2, 3
EPS = 1e-12


@triton.jit
def _round_to_fp8_grid(y, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 y (already clamped to the fp8 range) to the nearest fp8 value, ties to even, in fp32.

    The Triton interpreter's fp32 -> fp8 cast drops the carry when rounding overflows the mantissa
    (7.9 -> 4.0 in e4m3), so under TRITON_INTERPRET=1 we round here and the cast is then exact.
    """
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)  # subnormals share the smallest normal exponent's step
    step = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |x| < 2**22 to an integer, ties to even
    return ((y / step + magic) - magic) * step


@triton.jit
def _quant_tile_kernel(
    x_ptr, q_ptr, s_ptr, R, C,
    stride_xe, stride_xr, stride_xc, stride_qe, stride_qr, stride_qc, stride_se, stride_sr, stride_sc,
    FP8_MAX: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    EXACT_ROUND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    x_ptr += pid_e * stride_xe
    q_ptr += pid_e * stride_qe
    s_ptr += pid_e * stride_se
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None].to(tl.int64) * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if MODE == 0:
        scale = tl.load(s_ptr)
        y = x / scale
    elif MODE == 2:
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum(amax, 1e-12) / FP8_MAX
        tl.store(s_ptr + offs_r * stride_sr + pid_c * stride_sc, scale, mask=offs_r < R)
        y = x / scale[:, None]
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.maximum(amax, 1e-12) / FP8_MAX
        tl.store(s_ptr + pid_r * stride_sr + pid_c * stride_sc, scale)
        y = x / scale
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if EXACT_ROUND:
        y = _round_to_fp8_grid(y, MBITS, EMIN)
    tl.store(q_ptr + offs_r[:, None].to(tl.int64) * stride_qr + offs_c[None, :] * stride_qc,
             y.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_row_kernel(
    x_ptr, q_ptr, s_ptr, R, C,
    stride_xe, stride_xr, stride_xc, stride_qe, stride_qr, stride_qc, stride_se, stride_sr,
    FP8_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    EXACT_ROUND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
):
    # Two sweeps over the row block: amax, then scale and cast (the second mostly hits L2).
    pid = tl.program_id(0)
    pid_e = tl.program_id(1).to(tl.int64)
    x_ptr += pid_e * stride_xe
    q_ptr += pid_e * stride_qe
    s_ptr += pid_e * stride_se
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    base = x_ptr + offs_r[:, None].to(tl.int64) * stride_xr
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(base + offs_c[None, :] * stride_xc, mask=mask_r[:, None] & (offs_c[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.maximum(amax, 1e-12) / FP8_MAX
    tl.store(s_ptr + offs_r * stride_sr, scale, mask=mask_r)
    qbase = q_ptr + offs_r[:, None].to(tl.int64) * stride_qr
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (offs_c[None, :] < C)
        x = tl.load(base + offs_c[None, :] * stride_xc, mask=m, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
        if EXACT_ROUND:
            y = _round_to_fp8_grid(y, MBITS, EMIN)
        tl.store(qbase + offs_c[None, :] * stride_qc, y.to(q_ptr.dtype.element_ty), mask=m)


def quantize(x, fp8_dtype, mode, block_size=128, scale=None):
    """Quantize x [R, C] or [E, R, C] along C. mode: MODE_TENSOR (pass `scale` [1] / [E] or it is computed
    from amax), MODE_ROW, MODE_1XB, MODE_BXB. Returns (x_q row-major fp8 of x's shape, fp32 scale)."""
    batched = x.dim() == 3
    x3 = x if batched else x.unsqueeze(0)
    E, R, C = x3.shape
    fp8_max = float(torch.finfo(fp8_dtype).max)
    q = torch.empty((E, R, C), dtype=fp8_dtype, device=x.device)
    small = interpreting()
    # (mantissa bits, smallest normal exponent) of the format, for the interpreter's exact rounding
    mbits, emin = (3, -6) if fp8_dtype == torch.float8_e4m3fn else (2, -14)
    rnd = dict(EXACT_ROUND=small, MBITS=mbits, EMIN=emin)
    if mode == MODE_ROW:
        s = torch.empty((E, R, 1), dtype=torch.float32, device=x.device)
        if R and C and E:
            br, bc = (16, 64) if small else (16, 512)
            _quant_row_kernel[(triton.cdiv(R, br), E)](
                x3, q, s, R, C, *x3.stride(), *q.stride(), s.stride(0), s.stride(1),
                FP8_MAX=fp8_max, BLOCK_R=br, BLOCK_C=bc, **rnd)
        elif E and R:
            s.fill_(EPS / fp8_max)
        return (q, s) if batched else (q[0], s[0])
    if mode == MODE_TENSOR:
        if scale is None:
            if x3.numel():
                amax = x3.abs().amax(dim=(1, 2)).float()
            else:
                amax = torch.zeros((E,), device=x.device)
            scale = torch.clamp(amax, min=EPS) / fp8_max
        s = scale.reshape(E).to(torch.float32)
        br, bc = (32, 64) if small else (32, 128)
        s_strides = (s.stride(0), 0, 0)
    elif mode == MODE_1XB:
        s = torch.empty((E, R, triton.cdiv(C, block_size)), dtype=torch.float32, device=x.device)
        br, bc = (16, block_size) if small else (32, block_size)
        s_strides = s.stride()
    elif mode == MODE_BXB:
        s = torch.empty((E, triton.cdiv(R, block_size), triton.cdiv(C, block_size)), dtype=torch.float32,
                        device=x.device)
        br, bc = block_size, block_size
        s_strides = s.stride()
    else:
        raise ValueError(f"unknown quantization mode {mode}")
    if R and C and E:
        grid = (triton.cdiv(R, br), triton.cdiv(C, bc), E)
        _quant_tile_kernel[grid](x3, q, s, R, C, *x3.stride(), *q.stride(), *s_strides,
                                 FP8_MAX=fp8_max, MODE=mode, BLOCK_R=br, BLOCK_C=bc, **rnd,
                                 num_warps=4 if br * bc <= 8192 else 8)
    if mode == MODE_TENSOR:
        return (q, s) if batched else (q[0], s)
    return (q, s) if batched else (q[0], s[0])


@triton.jit
def _grouped_m_major_kernel(src_ptr, dst_ptr, offs_ptr, G, KB, stride_sm, stride_sk,
                            G_POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gi = tl.arange(0, G_POW2)
    ends = tl.load(offs_ptr + gi, mask=gi < G, other=0).to(tl.int64)
    total = tl.max(ends, 0)  # cumulative ends: the last is the largest
    ends = tl.where(gi < G, ends, total + 1)  # padding never counts as an end <= row
    g = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), 1)  # the group of each row
    live = rows < total
    start = tl.load(offs_ptr + g - 1, mask=live & (g > 0), other=0).to(tl.int64)
    m = tl.load(offs_ptr + g, mask=live, other=0).to(tl.int64) - start
    for k0 in range(0, KB, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = live[:, None] & (ks < KB)[None, :]
        v = tl.load(src_ptr + rows[:, None].to(tl.int64) * stride_sm + ks[None, :] * stride_sk, mask=mask)
        dst = KB * start[:, None] + ks[None, :] * m[:, None] + (rows - start)[:, None]
        tl.store(dst_ptr + dst, v, mask=mask)


def grouped_m_major(scale_a, group_offs):
    """1x128 activation scales scale_a [M, kb] (any strides) -> a flat fp32 buffer holding, for each group g
    (rows group_offs[g-1]:group_offs[g], cumulative ends on scale_a's device), its [kb, rows_g] block with the
    rows contiguous, starting at element kb * (first row of g): the per-group layout cuBLASLt's VEC128 scales
    take. Rows past group_offs[-1] are not copied."""
    M, kb = scale_a.shape
    G = group_offs.shape[0]
    out = torch.empty(M * kb, dtype=scale_a.dtype, device=scale_a.device)
    if M == 0 or G == 0:
        return out
    block_r = 32 if interpreting() else 128
    _grouped_m_major_kernel[(triton.cdiv(M, block_r),)](
        scale_a, out, group_offs, G, kb, scale_a.stride(0), scale_a.stride(1),
        G_POW2=max(triton.next_power_of_2(G), 2), BLOCK_R=block_r, BLOCK_K=16)
    return out
