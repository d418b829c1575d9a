"""Flash attention backward kernels (kernels/flash_attn.py has the forward, the configs and the public
launchers): delta = rowsum(do * o) preprocess, dk/dv (one program per key block and kv head, looping over the
head's whole query group: no atomics) and dq (one program per query block), dense and packed (VARLEN)."""
import torch
import triton
import triton.language as tl

from ._device import interpreting
from .flash_attn import (BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS, LOG2E, _DYNAMIC, _block_d, _pick, _precision,
                         _varlen_rows, _wide)


# ---------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["SEQ_Q", "H"])
def _bwd_delta_kernel(O, DO, DELTA, sob, sos, soh, sod, sdb, sds, sdh, sdd, SEQ_Q, HEAD_DIM, H,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        h = h.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * SEQ_Q + offs_m, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd, sls,
                    start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                    MASK: tl.constexpr, PRECISION: tl.constexpr, qstart=0, qend=0, VARLEN: tl.constexpr = False,
                    CAUSAL: tl.constexpr = False):
    offs_m = start_m + offs_m0
    mask_m = offs_m < SEQ_Q
    qt = tl.load(q_base + offs_m[None, :] * sqs + offs_d[:, None] * sqd,
                 mask=mask_m[None, :] & mask_d[:, None], other=0.0)     # [D, M]
    do = tl.load(do_base + offs_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)     # [M, D]
    lse = tl.load(lse_base + offs_m * sls, mask=mask_m, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # rows that saw nothing: p = 0
    delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale           # [N, M], log2 units
    pt = tl.math.exp2(st - lse2[None, :])
    if VARLEN:  # per key row: the queries of its own sequence [qstart, qend), diag is per key row
        valid = (offs_m[None, :] >= qstart[:, None]) & (offs_m[None, :] < qend[:, None])
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + diag[:, None])
        pt = tl.where(valid, pt, 0.0)
    elif MASK:
        pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)          # [N, M]
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_DYNAMIC + ["HQ"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                     slb, slh, sls, sdkb, sdks, sdkh, sdkd, sdvb, sdvs, sdvh, sdvd,
                     HQ, GROUP, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale, sm_scale, CU_Q, CU_K, SID_K,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, VARLEN: tl.constexpr, WIDE: tl.constexpr = False):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    if WIDE:
        hk = hk.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_m0 = offs_m0.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < SEQ_K
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if VARLEN:
        # per key row: its sequence's queries [qstart, qend) and diagonal; for the tile, the query range
        # [lo, hi) from the first row's sequence (causal: its first query that sees start_n) to the last's end
        sid = tl.load(SID_K + offs_n, mask=mask_n, other=0)
        qstart = tl.load(CU_Q + sid, mask=mask_n, other=0)
        qend = tl.load(CU_Q + sid + 1, mask=mask_n, other=0)
        diag = tl.load(CU_K + sid + 1, mask=mask_n, other=0) - qend
        sid_first = tl.load(SID_K + start_n)
        sid_last = tl.load(SID_K + tl.minimum(start_n + BLOCK_N, SEQ_K) - 1)
        lo = tl.load(CU_Q + sid_first)
        hi = tl.load(CU_Q + sid_last + 1)
        if CAUSAL:
            lo_end = tl.load(CU_Q + sid_first + 1)
            diag_first = tl.load(CU_K + sid_first + 1) - lo_end
            lo = tl.minimum(tl.maximum(start_n - diag_first, lo), lo_end)
            # the tile's last key is seen by the queries from here on (when the tile sits in one sequence)
            sees_all = tl.maximum(tl.minimum(start_n + BLOCK_N, SEQ_K) - 1 - diag_first, lo)
        else:
            sees_all = lo
        # A key tile inside one sequence: whole query tiles from a_end to b_end (inside that sequence, past
        # the diagonal) see every key of it and need no mask; otherwise everything runs masked.
        a_end = tl.minimum(lo + tl.cdiv(sees_all - lo, BLOCK_M) * BLOCK_M, hi)
        b_end = a_end + (tl.maximum(hi - a_end, 0) // BLOCK_M) * BLOCK_M
        single = sid_first == sid_last
        a_end = tl.where(single, a_end, hi)
        b_end = tl.where(single, b_end, hi)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdb + h * sdh
            lse_base = LSE + b * slb + h * slh
            delta_base = DELTA + (b * HQ + h) * SEQ_Q
            for start_m in range(lo, a_end, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd,
                                         sls, start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                                         True, PRECISION, qstart, qend, True, CAUSAL)
            for start_m in range(a_end, b_end, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd,
                                         sls, start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                                         False, PRECISION)
            for start_m in range(b_end, hi, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd,
                                         sls, start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                                         True, PRECISION, qstart, qend, True, CAUSAL)
    else:
        diag = SEQ_K - SEQ_Q
        if CAUSAL:
            lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M  # first query that sees this key block
            # queries from `unmasked` on see every key of the block
            unmasked = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, lo), SEQ_Q)
            unmasked = tl.cdiv(unmasked, BLOCK_M) * BLOCK_M
        else:
            lo = 0
            unmasked = 0
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdb + h * sdh
            lse_base = LSE + b * slb + h * slh
            delta_base = DELTA + (b * HQ + h) * SEQ_Q
            for start_m in range(lo, unmasked, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd,
                                         sls, start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                                         True, PRECISION)
            for start_m in range(unmasked, SEQ_Q, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sds, sdd,
                                         sls, start_m, offs_m0, offs_n, offs_d, mask_d, SEQ_Q, diag, qk_scale,
                                         False, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, start_n, offs_m, offs_n0, offs_d,
                  mask_d, SEQ_K, diag, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  PRECISION: tl.constexpr, kstart=0, kend=0, VARLEN: tl.constexpr = False):
    offs_n = start_n + offs_n0
    if MASK:
        kv_mask = (offs_n[:, None] < SEQ_K) & mask_d[None, :]
    else:
        kv_mask = mask_d[None, :]
    k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)  # [N, D]
    v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
    p = tl.math.exp2(s - lse2[:, None])
    if MASK:
        if VARLEN:
            valid = (offs_n[None, :] >= kstart[:, None]) & (offs_n[None, :] < kend[:, None])
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag[:, None])
        else:
            valid = offs_n[None, :] < SEQ_K
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_DYNAMIC + ["HQ"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                   slb, slh, sls, sdqb, sdqs, sdqh, sdqd,
                   HQ, GROUP, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale, sm_scale, CU_Q, CU_K, SID_Q,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, VARLEN: tl.constexpr, WIDE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    if WIDE:
        h = h.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SEQ_Q
    mask_d = offs_d < HEAD_DIM
    qmask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=qmask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + offs_m * sls, mask=mask_m, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + (b * HQ + h) * SEQ_Q + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if VARLEN:
        kstart, kend, diag, lo, hi, full = _varlen_rows(CU_Q, CU_K, SID_Q, start_m, offs_m, mask_m, SEQ_Q,
                                                        BLOCK_M, CAUSAL, BLOCK_N)
        for start_n in range(lo, full, BLOCK_N):  # inside one sequence, below every row's diagonal
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                               offs_n0, offs_d, mask_d, SEQ_K, diag, qk_scale, False, CAUSAL, PRECISION)
        for start_n in range(full, hi, BLOCK_N):
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                               offs_n0, offs_d, mask_d, SEQ_K, diag, qk_scale, True, CAUSAL, PRECISION,
                               kstart, kend, True)
    else:
        diag = SEQ_K - SEQ_Q
        if CAUSAL:
            full_end = tl.minimum(tl.maximum(start_m + diag + 1, 0), SEQ_K)
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), SEQ_K)
        else:
            full_end = SEQ_K
            hi = SEQ_K
        full_end = (full_end // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                               offs_n0, offs_d, mask_d, SEQ_K, diag, qk_scale, False, CAUSAL, PRECISION)
        for start_n in range(full_end, hi, BLOCK_N):
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, start_n, offs_m,
                               offs_n0, offs_d, mask_d, SEQ_K, diag, qk_scale, True, CAUSAL, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qmask)


def backward(do, q, k, v, o, lse, causal, softmax_scale, dkdv_config, dq_config, meta):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    block_d = _block_d(d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if sk == 0 or b == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if sq == 0:
        return dq, dk.zero_(), dv.zero_()
    lse = lse.float()
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    pre_m = 16 if interpreting() else 64
    wide = _wide(q, k, v, o, do, lse, dq, dk, dv)
    _bwd_delta_kernel[(triton.cdiv(sq, pre_m), hq, b)](
        o, do, delta, *o.stride(), *do.stride(), sq, d, hq, BLOCK_M=pre_m, BLOCK_D=block_d, WIDE=wide)
    prec = _precision(q.dtype)
    varlen = meta is not None
    cu_q, cu_k, sid_q, sid_k = meta if varlen else (delta, delta, delta, delta)  # unused when not VARLEN
    cfg = dkdv_config or _pick(BWD_DKDV_CONFIGS, block_d, q.element_size())
    _bwd_dkdv_kernel[(triton.cdiv(sk, cfg.block_n), hkv, b)](
        q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), hq, hq // hkv, sq, sk, d, scale * LOG2E, scale, cu_q, cu_k, sid_k,
        CAUSAL=bool(causal), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, PRECISION=prec,
        VARLEN=varlen, WIDE=wide, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = dq_config or _pick(BWD_DQ_CONFIGS, block_d, q.element_size())
    _bwd_dq_kernel[(triton.cdiv(sq, cfg.block_m), hq, b)](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(),
        *dq.stride(), hq, hq // hkv, sq, sk, d, scale * LOG2E, scale, cu_q, cu_k, sid_q,
        CAUSAL=bool(causal), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, PRECISION=prec,
        VARLEN=varlen, WIDE=wide, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv
