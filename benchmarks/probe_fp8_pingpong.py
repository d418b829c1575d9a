"""Probe (one GPU): blockwise FP8 GEMM K loops that hide the per-step promotion behind the tensor cores.

Triton makes a wgmma "properly async" only when its result is consumed by the next iteration's MMA or after a
`wait 0` already in the loop; the blockwise promotion (acc += dot(a, b) * f) consumes it at once, so the tensor
cores idle while the CUDA cores rescale. STREAMS=2/3 splits the K steps round-robin over 2/3 accumulators kept in
units of their latest scale (acc_j = dot(a, b, acc_j * f_prev_j / f)): the first dot of an iteration is
synchronous, the others are properly async, so their rescale runs while the previous MMA is still in flight.
STREAMS=1 is the plain promotion (kernels/gemm_tiles.py _mma_step). Prints a table and writes JSON.

Result (H200, Triton 3.6, benchmarks/results/probe_fp8_pingpong_h200.json): the compiled loops are as intended
(sm_90 PTX: no wait after the 2nd / 3rd dot of a step), yet STREAMS=2 / 3 ran 0.69-0.97x the plain loop on every
shape (best plain 128x128x128, 8 warps, 4 stages: 1.10-1.26x bf16 cuBLAS), so the kernels keep the plain step.

    python benchmarks/probe_fp8_pingpong.py --json out.json
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _scales(sa_ptr, sb_ptr, kb, nk, nsb, offs_m, mask_m, off_n):
    ok = kb < nk
    sa = tl.load(sa_ptr + offs_m * nk + kb, mask=mask_m & (offs_m * 0 + kb < nk), other=1.0)
    sb = tl.where(ok, tl.load(sb_ptr + tl.minimum(kb, nk - 1) * nsb + off_n // 128), 1.0)
    return (sa * sb)[:, None]


@triton.jit
def _blk_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, stride_cm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                STREAMS: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    nk = tl.cdiv(K, BLOCK_K)
    nsb = tl.cdiv(N, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if STREAMS == 1:
        for kb in range(nk):
            a = a_desc.load([off_m, kb * BLOCK_K])
            b = b_desc.load([off_n, kb * BLOCK_K]).T
            acc += tl.dot(a, b) * _scales(sa_ptr, sb_ptr, kb, nk, nsb, offs_m, mask_m, off_n)
    elif STREAMS == 2:
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        f0p = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        f1p = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        for kb in range(0, nk, 2):
            a0 = a_desc.load([off_m, kb * BLOCK_K])
            b0 = b_desc.load([off_n, kb * BLOCK_K]).T
            a1 = a_desc.load([off_m, (kb + 1) * BLOCK_K])
            b1 = b_desc.load([off_n, (kb + 1) * BLOCK_K]).T
            f0 = _scales(sa_ptr, sb_ptr, kb, nk, nsb, offs_m, mask_m, off_n)
            f1 = _scales(sa_ptr, sb_ptr, kb + 1, nk, nsb, offs_m, mask_m, off_n)
            acc = tl.dot(a0, b0, acc * (f0p / f0))
            f0p = f0
            acc1 = tl.dot(a1, b1, acc1 * (f1p / f1))
            f1p = f1
        acc = acc * f0p + acc1 * f1p
    else:
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        f0p = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        f1p = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        f2p = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        for kb in range(0, nk, 3):
            a0 = a_desc.load([off_m, kb * BLOCK_K])
            b0 = b_desc.load([off_n, kb * BLOCK_K]).T
            a1 = a_desc.load([off_m, (kb + 1) * BLOCK_K])
            b1 = b_desc.load([off_n, (kb + 1) * BLOCK_K]).T
            a2 = a_desc.load([off_m, (kb + 2) * BLOCK_K])
            b2 = b_desc.load([off_n, (kb + 2) * BLOCK_K]).T
            f0 = _scales(sa_ptr, sb_ptr, kb, nk, nsb, offs_m, mask_m, off_n)
            f1 = _scales(sa_ptr, sb_ptr, kb + 1, nk, nsb, offs_m, mask_m, off_n)
            f2 = _scales(sa_ptr, sb_ptr, kb + 2, nk, nsb, offs_m, mask_m, off_n)
            acc = tl.dot(a0, b0, acc * (f0p / f0))
            f0p = f0
            acc1 = tl.dot(a1, b1, acc1 * (f1p / f1))
            f1p = f1
            acc2 = tl.dot(a2, b2, acc2 * (f2p / f2))
            f2p = f2
        acc = acc * f0p + acc1 * f1p + acc2 * f2p
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16), mask=mask_m[:, None] & (offs_n[None, :] < N))


def run(a_q, b_q, sa, sb, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages, streams = cfg
    M, K = a_q.shape
    N = b_q.shape[0]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=a_q.device)
    a_desc = TensorDescriptor.from_tensor(a_q, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b_q, [bn, bk])
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _blk_kernel[grid](a_desc, b_desc, c, sa, sb, M, N, K, c.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=8, STREAMS=streams, num_warps=warps, num_stages=stages)
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x4096x7168,8192x7168x2048,8192x8192x8192,2048x4096x7168")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from triton.testing import do_bench

    torch.manual_seed(0)
    dev = "cuda"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    cfgs = [(128, 128, 128, 8, s, 1) for s in (3, 4)] + [(128, 128, 128, 8, s, 2) for s in (2, 3)] + \
        [(128, 128, 128, 8, 2, 3), (64, 128, 128, 4, 3, 2), (128, 64, 128, 4, 3, 2), (128, 128, 128, 4, 2, 1)]
    rows = []
    for shape in args.shapes.split(","):
        M, N, K = map(int, shape.split("x"))
        nk, nsb = triton.cdiv(K, 128), triton.cdiv(N, 128)
        a = torch.randn(M, K, device=dev)
        b = torch.randn(N, K, device=dev)
        sa = torch.rand(M, nk, device=dev) * 0.01 + 0.001
        sb = torch.rand(nk, nsb, device=dev) * 0.01 + 0.001
        a_q = a.clamp(-400, 400).to(torch.float8_e4m3fn)
        b_q = b.clamp(-400, 400).to(torch.float8_e4m3fn)
        a_dq = a_q.float() * sa.repeat_interleave(128, 1)[:, :K]
        b_dq = b_q.float() * sb.t().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        ref = a_dq @ b_dq.t()
        ab, bb = a_dq.bfloat16(), b_dq.bfloat16()
        flops = 2 * M * N * K
        t_bf16 = do_bench(lambda: ab @ bb.t(), rep=100)
        row = dict(shape=shape, bf16_cublas_ms=t_bf16)
        try:
            # cuBLASLt blockwise through torch._scaled_mm: scale_a [M, nk] (1x128), scale_b [nk, nsb] (128x128)
            f = lambda: torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb.t().contiguous().t(), out_dtype=torch.bfloat16)
            out = f()
            row["scaled_mm_rel_err"] = float((out.float() - ref).norm() / ref.norm())
            row["scaled_mm_ms"] = do_bench(f, rep=100)
        except Exception as e:  # noqa: BLE001
            row["scaled_mm_error"] = str(e)[:200]
        for cfg in cfgs:
            name = "x".join(map(str, cfg))
            try:
                out = run(a_q, b_q, sa, sb, cfg)
                err = float((out.float() - ref).norm() / ref.norm())
                t = do_bench(lambda: run(a_q, b_q, sa, sb, cfg), rep=100)
                row[name] = dict(ms=t, rel_err=err, tflops=flops / t / 1e9, vs_bf16=t_bf16 / t)
            except Exception as e:  # noqa: BLE001
                row[name] = dict(error=str(e)[:300])
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
