"""GPU time of the low-latency combine's two kernels, bf16 against LogFMT (`use_logfmt`), and of LogFMT's tile
options, on one GPU without communication (world 1, a plain device buffer as the only "peer").

    python benchmarks/probe_logfmt.py --json probe.json

Rows: `send` (encode + store every (token, k) row into its slot, kernels/moe_ll.py / moe_ll_logfmt.py) and
`reduce` (decode, weight, sum over k) in microseconds (triton.testing.do_bench median, L2 flushed), for the
decode shape of bench_moe.py --mode low-latency (128 tokens, hidden 7168, top-8). Every LogFMT variant's
output is checked equal to the default's.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, print_table, write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--expert-rows", type=int, default=4096, help="rows of expert output the slots point into")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_logfmt: needs CUDA")
        return 0
    from turbo_dist.kernels import moe_ll, moe_ll_logfmt as lf, moe_ll_place

    dev = torch.device("cuda")
    m, h, k = args.tokens, args.hidden, args.topk
    g = torch.Generator(device=dev).manual_seed(0)
    y = torch.randn(args.expert_rows, h, generator=g, device=dev).to(torch.bfloat16)
    dst = torch.randint(0, args.expert_rows, (m, k), generator=g, device=dev)
    dst[::7, -1] = -1
    w = torch.rand(m, k, generator=g, device=dev)
    buf = torch.zeros(1024 + m * k * h * 2, dtype=torch.uint8, device=dev)
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.int64, device=dev)
    comb = 1024
    rows_bf16 = buf[comb:comb + m * k * h * 2].view(torch.bfloat16).view(m, k, h)
    rb = lf.row_bytes(h)
    rows_lf = buf[comb:comb + m * k * rb].view(torch.int32).view(m, k, h // 64, lf.GROUP_WORDS)
    out = torch.empty(m, h, dtype=torch.bfloat16, device=dev)
    rows = []

    def add(op, variant, fn):
        rows.append({"op": op, "variant": variant, "us": bench(fn) * 1e3})
        print(f"{op:7s} {variant:24s} {rows[-1]['us']:8.1f} us", flush=True)

    add("send", "bf16", lambda: moe_ll.combine_send(y, dst, ptrs, 0, 1, m, comb, 0))
    moe_ll.combine_send(y, dst, ptrs, 0, 1, m, comb, 0)
    add("reduce", "bf16", lambda: moe_ll_place.combine_reduce(rows_bf16, dst, w, out))

    def send(gb, warps):
        lf._ll_combine_send_logfmt_kernel[(m, k)](y, dst, ptrs, 0, m, comb, 0, H=h, K=k, GB=gb, num_warps=warps)

    lf.combine_send(y, dst, ptrs, 0, 1, m, comb, 0)
    ref = rows_lf.clone()
    same = True
    for gb in (4, 8, 16, 32):
        for warps in (2, 4, 8):
            send(gb, warps)
            same &= torch.equal(rows_lf, ref)
            add("send", f"logfmt GB={gb} warps={warps}", lambda: send(gb, warps))
    lf.combine_send(y, dst, ptrs, 0, 1, m, comb, 0)
    base = lf.combine_reduce(rows_lf, dst, w, torch.empty_like(out)).clone()

    def reduce(block, warps):
        lf._ll_combine_reduce_logfmt_kernel[(m, triton_cdiv(h, block))](
            rows_lf.view(torch.uint8), dst, w, out, *dst.stride(), *w.stride(), out.stride(0),
            H=h, K=k, BLOCK_H=block, num_warps=warps)

    for block in (256, 512, 1024, 2048):
        for warps in (2, 4, 8):
            reduce(block, warps)
            same &= torch.equal(out, base)
            add("reduce", f"logfmt BLOCK_H={block} warps={warps}", lambda: reduce(block, warps))
    print("all LogFMT variants equal to the default:", same)
    print_table(rows, ["op", "variant", "us"])
    if args.json:
        write_json(args.json, rows, {"tokens": m, "hidden": h, "topk": k, "variants_equal": bool(same),
                                     "timing": "triton.testing.do_bench median, L2 flushed"})
    return 0


def triton_cdiv(a, b):
    return (a + b - 1) // b


if __name__ == "__main__":
    sys.exit(main())
