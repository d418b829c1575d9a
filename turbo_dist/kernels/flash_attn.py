"""Flash attention forward/backward in Triton, on [B, S, H, D] with GQA and the log-sum-exp.

    o, lse = flash_attn_forward(q, k, v, causal, softmax_scale)          # lse [B, Hq, Sq] fp32
    dq, dk, dv = flash_attn_backward(do, q, k, v, o, lse, causal, softmax_scale)

    o, lse = flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)  # packed
    dq, dk, dv = flash_attn_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)

q: [B, Sq, Hq, D], k/v: [B, Sk, Hkv, D] with Hq % Hkv == 0 (kv are read through their own head,
never repeated in memory); any strides. Causal masks align bottom-right: query i sees key j iff
j <= i + Sk - Sq (top-left when Sq == Sk). A query row with no visible key gets o = 0, lse = -inf.

The backward uses the (o, lse) it is given, not a recomputation: with a context-parallel ring
those are the merged output and the global lse, and delta = rowsum(do * o) must use them.
Kernels: forward (online softmax in base 2) here; delta preprocess, dk/dv (one program per key block
and kv head, looping over the head's whole query group, so no atomics) and dq (one program per
query block) in kernels/flash_attn_bwd.py. They also run under TRITON_INTERPRET=1 (fp16/fp32) for CPU tests.

Offsets inside one batch entry are int32 unless a tensor spans >= 2**31 elements there (e.g. a packed
varlen batch of 1M tokens x 16 heads x 128): then WIDE=True (a constexpr) switches the row / head index
math to int64; smaller calls compile exactly as before.

Packed variable-length sequences (VARLEN=True, a constexpr: dense calls compile exactly as before)
run the same kernels on the B=1 view of q [Tq, Hq, D] / k, v [Tk, Hkv, D] with cu_seqlens and
per-token sequence ids: a query tile loops only over the keys of the sequences its rows belong to
(cu_k[seq(first row)] .. cu_k[seq(last row) + 1], causal: cut at the last row's diagonal), masking
keys of other sequences and, causal, keys past the row's bottom-right diagonal within its sequence;
a dk/dv key tile does the same over queries. lse is [Hq, Tq].
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._device import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class FlashConfig:
    """Tile sizes of one kernel: BLOCK_M queries x BLOCK_N keys per step."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Chosen on an H100 (bench_ops_attention.py --attn-tune; D=128 bwd from
# benchmarks/results/ops_attention_tune_h100.json: 4.41 ms vs 4.86 ms for the whole backward at
# B=4 S=4096 H=32 causal bf16); keyed by head-dim bucket. Data, not code paths.
FWD_CONFIGS = {
    64: FlashConfig(128, 64, num_warps=4, num_stages=3),
    128: FlashConfig(128, 64, num_warps=8, num_stages=3),
    256: FlashConfig(64, 32, num_warps=4, num_stages=2),
}
BWD_DKDV_CONFIGS = {
    64: FlashConfig(64, 128, num_warps=8, num_stages=3),
    128: FlashConfig(32, 64, num_warps=4, num_stages=3),
    256: FlashConfig(32, 64, num_warps=4, num_stages=2),
}
BWD_DQ_CONFIGS = {
    64: FlashConfig(128, 64, num_warps=8, num_stages=3),
    128: FlashConfig(128, 64, num_warps=8, num_stages=3),
    256: FlashConfig(64, 32, num_warps=4, num_stages=2),
}
INTERPRET_CONFIG = FlashConfig(16, 16, num_warps=1, num_stages=1)


def _pick(table, block_d, elem_size=2):
    """The tuned config for this head-dim bucket. The tables are for 16-bit inputs; fp32 tiles take twice
    the shared memory (a D=128 dq tile of 128x64, 3 stages, needs 288 KiB in fp32 > 227 KiB on H100/H200),
    so fp32 halves both tile sides and keeps at most 2 stages."""
    if interpreting():
        return INTERPRET_CONFIG
    for d in sorted(table):
        if block_d <= d:
            cfg = table[d]
            if elem_size >= 4:
                cfg = FlashConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps,
                                  min(cfg.num_stages, 2))
            return cfg
    raise NotImplementedError(f"flash attention (triton) supports head_dim <= {max(table)}, got {block_d}")


MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, start_n, offs_m, offs_n, offs_d, mask_d,
               SEQ_K, diag, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               PRECISION: tl.constexpr, kstart=0, kend=0, VARLEN: tl.constexpr = False):
    cols = start_n + offs_n
    kt_ptrs = k_base + cols[None, :] * sks + offs_d[:, None] * skd   # [D, N]
    v_ptrs = v_base + cols[:, None] * svs + offs_d[None, :] * svd    # [N, D]
    if MASK:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < SEQ_K) & mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < SEQ_K) & mask_d[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # log2 units
    if MASK:
        if VARLEN:  # per row: the keys of its own sequence [kstart, kend), diag is per row
            valid = (cols[None, :] >= kstart[:, None]) & (cols[None, :] < kend[:, None])
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag[:, None])
        else:
            valid = cols[None, :] < SEQ_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _varlen_rows(CU_Q, CU_K, SID_Q, start_m, offs_m, mask_m, SEQ_Q, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_N: tl.constexpr = 16):
    """Packed (varlen) query tile: per row, the key range [kstart, kend) of its sequence and its causal
    diagonal (query i sees key j <= i + diag: bottom-right within the sequence); for the tile, the key
    range [lo, hi) its rows can see (from the first row's sequence start to the last row's end), and `full`:
    when every row of the tile belongs to one sequence, the key tiles [lo, full) (whole BLOCK_N steps from lo)
    are visible to every row and need no mask (full = lo otherwise)."""
    sid = tl.load(SID_Q + offs_m, mask=mask_m, other=0)
    kstart = tl.load(CU_K + sid, mask=mask_m, other=0)
    kend = tl.load(CU_K + sid + 1, mask=mask_m, other=0)  # padded rows: empty range, see nothing
    diag = kend - tl.load(CU_Q + sid + 1, mask=mask_m, other=0)
    last_row = tl.minimum(start_m + BLOCK_M, SEQ_Q) - 1
    sid_first = tl.load(SID_Q + start_m)
    sid_last = tl.load(SID_Q + last_row)
    lo = tl.load(CU_K + sid_first)
    hi = tl.load(CU_K + sid_last + 1)
    seq_end = hi
    diag_last = hi - tl.load(CU_Q + sid_last + 1)
    if CAUSAL:  # the last sequence's rows see keys up to last_row + its diag; earlier ones end before it
        hi = tl.maximum(tl.minimum(hi, last_row + diag_last + 1), tl.load(CU_K + sid_last))
        hi = tl.maximum(hi, lo)
        seen_by_all = tl.minimum(start_m + diag_last + 1, seq_end)  # the first row's last key + 1
    else:
        seen_by_all = seq_end
    full = lo + (tl.maximum(seen_by_all - lo, 0) // BLOCK_N) * BLOCK_N
    full = tl.where(sid_first == sid_last, full, lo)
    return kstart, kend, diag, lo, hi, full


# Sequence lengths and head counts vary call to call (CP blocks): do not compile a variant per
# divisibility class of them. Strides stay specialised (aligned, vectorised loads).
_DYNAMIC = ["GROUP", "SEQ_Q", "SEQ_K"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
                slb, slh, sls,
                GROUP, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale, CU_Q, CU_K, SID_Q,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr, WIDE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if WIDE:  # a batch entry spans >= 2**31 elements: row and head offsets in int64
        h = h.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SEQ_Q
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if VARLEN:
        kstart, kend, diag, lo, hi, full = _varlen_rows(CU_Q, CU_K, SID_Q, start_m, offs_m, mask_m, SEQ_Q,
                                                        BLOCK_M, CAUSAL, BLOCK_N)
        for start_n in range(lo, full, BLOCK_N):  # inside one sequence, below every row's diagonal
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                                       offs_n, offs_d, mask_d, SEQ_K, diag, qk_scale, False, CAUSAL, EVEN_D,
                                       PRECISION)
        for start_n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                                       offs_n, offs_d, mask_d, SEQ_K, diag, qk_scale, True, CAUSAL, EVEN_D,
                                       PRECISION, kstart, kend, True)
    else:
        diag = SEQ_K - SEQ_Q  # query i sees keys j <= i + diag
        if CAUSAL:
            full_end = tl.minimum(tl.maximum(start_m + diag + 1, 0), SEQ_K)  # every row sees keys below this
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), SEQ_K)  # no row sees keys from here on
        else:
            full_end = SEQ_K
            hi = SEQ_K
        full_end = (full_end // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                                       offs_n, offs_d, mask_d, SEQ_K, diag, qk_scale, False, CAUSAL, EVEN_D,
                                       PRECISION)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                                       offs_n, offs_d, mask_d, SEQ_K, diag, qk_scale, True, CAUSAL, EVEN_D,
                                       PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m * sls, lse, mask=mask_m)


# ---------------------------------------------------------------------------------------- launchers
def _block_d(d):
    return max(16, triton.next_power_of_2(d))


WIDE_INDEX_MIN = 2 ** 31  # element offsets inside one batch entry reaching this need int64 index math


def _wide(*tensors):
    """Whether some tensor's offsets within one batch entry (rows a tile may touch included) reach
    WIDE_INDEX_MIN: then the kernels compute row / head offsets in int64 (WIDE=True; else int32, as before)."""
    span = 0
    for t in tensors:
        dims = range(1, t.dim())
        span = max(span, sum(t.shape[i] * abs(t.stride(i)) for i in dims) + 512 * max(abs(t.stride(i)) for i in dims))
    return span >= WIDE_INDEX_MIN


def _precision(dtype):
    # fp32 inputs: exact fp32 products (tf32 would cost ~3 digits); fp16/bf16 ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attn_forward(q, k, v, causal=False, softmax_scale=None, config=None):
    """o [B, Sq, Hq, D] (q's dtype), lse [B, Hq, Sq] fp32. Inputs are assumed validated by the caller."""
    return _forward(q, k, v, causal, softmax_scale, config, None)


def flash_attn_backward(do, q, k, v, o, lse, causal=False, softmax_scale=None, dkdv_config=None, dq_config=None):
    """dq, dk, dv from the given o and lse (global ones under context parallelism)."""
    from .flash_attn_bwd import backward  # the kernels live there (it imports this module's helpers)

    return backward(do, q, k, v, o, lse, causal, softmax_scale, dkdv_config, dq_config, None)


def _varlen_meta(cu_seqlens_q, cu_seqlens_k, tq, tk):
    """int32 (cu_q, cu_k, per-token sequence ids of q and of k). A token of a packed tensor belongs to the
    last sequence starting at or before it (empty sequences own no token)."""
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    sid_q = (torch.searchsorted(cu_q, torch.arange(tq, device=cu_q.device, dtype=torch.int32), right=True) - 1)
    sid_k = (torch.searchsorted(cu_k, torch.arange(tk, device=cu_k.device, dtype=torch.int32), right=True) - 1)
    return cu_q, cu_k, sid_q.to(torch.int32), sid_k.to(torch.int32)


def flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, config=None):
    """Packed sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens [B+1] (validated by the caller) ->
    o [Tq, Hq, D], lse [Hq, Tq] fp32. Sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] of each; causal
    masks align bottom-right within each sequence. One packed batch: every kernel runs on the B=1 view."""
    meta = _varlen_meta(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    o, lse = _forward(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, softmax_scale, config, meta)
    return o[0], lse[0]


def flash_attn_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None,
                               dkdv_config=None, dq_config=None):
    """dq [Tq, Hq, D], dk/dv [Tk, Hkv, D] from the given o [Tq, Hq, D] and lse [Hq, Tq]."""
    meta = _varlen_meta(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    from .flash_attn_bwd import backward

    dq, dk, dv = backward(do.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), o.unsqueeze(0),
                          lse.unsqueeze(0), causal, softmax_scale, dkdv_config, dq_config, meta)
    return dq[0], dk[0], dv[0]


def _forward(q, k, v, causal, softmax_scale, config, meta):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    block_d = _block_d(d)
    cfg = config or _pick(FWD_CONFIGS, block_d, q.element_size())
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    if b * sq * hq == 0:
        return o, lse
    cu_q, cu_k, sid_q, _ = meta if meta is not None else (lse, lse, lse, None)  # unused when not VARLEN
    grid = (triton.cdiv(sq, cfg.block_m), hq, b)
    _fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
        hq // hkv, sq, sk, d, scale * LOG2E, cu_q, cu_k, sid_q,
        CAUSAL=bool(causal), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, EVEN_D=block_d == d,
        PRECISION=_precision(q.dtype), VARLEN=meta is not None, WIDE=_wide(q, k, v, o, lse), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return o, lse
