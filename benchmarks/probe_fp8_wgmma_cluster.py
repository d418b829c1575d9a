"""Our Hopper FP8 BLOCKWISE grouped GEMM (turbo_dist._fp8_wgmma) with one CTA per 128x256 tile (cluster 1)
against two CTAs sharing each weight tile by TMA multicast (cluster 2), called directly, timed interleaved
(CUDA events, median of --rounds, the order reversed every other round), at the full grid and at smaller ones
(--sms: the persistent grid's SM budget; fewer SMs draw less power, so clocks rise).

    python benchmarks/probe_fp8_wgmma_cluster.py --json probe.json [--cases 8,7168,4096,1024;...] [--sms 132,32]
    ncu -k regex:grouped_blockwise ... python benchmarks/probe_fp8_wgmma_cluster.py --once   (one launch each)

A case is G,K,N,tokens_per_expert (skewed counts, bench_ops.skewed_lens, on the GPU). fp8_wgmma.pick_cluster
is the rule the backend takes from these.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import skewed_lens  # noqa: E402
from common import peak_tflops, print_table, write_json  # noqa: E402

CASES = "8,7168,4096,1024;32,7168,4096,256;8,2048,7168,1024;32,2048,7168,256"


def make_call(G, K, N, tpe):
    from turbo_dist.ops import ScalingGranularity, fp8_wgmma, quantize_fp8
    from turbo_dist.ops.grouped_gemm import group_offsets

    lens = skewed_lens(G, tpe, seed=G)
    M = int(lens.sum())
    gran = ScalingGranularity.BLOCKWISE
    aq, sa = quantize_fp8(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.float8_e4m3fn, gran)
    wq, sw = quantize_fp8(torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5,
                          torch.float8_e4m3fn, gran, weight=True)
    b, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    offs = group_offsets(lens.cuda(), "cuda")
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    mod = fp8_wgmma.wgmma_module()

    def call(cluster, sms):
        mod.grouped_blockwise(
            device=torch.cuda.current_device(), stream=torch.cuda.current_stream().cuda_stream, a=aq.data_ptr(),
            w=b.data_ptr(), out=out.data_ptr(), offs=offs.data_ptr(), scale_a=sa.data_ptr(), sa_row=sa.stride(0),
            sa_k=sa.stride(1), scale_w=sb.data_ptr(), sw_g=sb.stride(0), sw_k=sb.stride(1), sw_n=sb.stride(2), M=M,
            N=N, K=K, G=G, lda=aq.stride(0), ldw=b.stride(2), w_group=b.stride(0), ldo=out.stride(0),
            a_e5m2=False, w_e5m2=False, num_sms=sms, cluster=cluster)
    return call, M, fp8_wgmma.pick_cluster(M, G)


def time_variants(call, variants, rounds):
    for v in variants:
        for _ in range(3):
            call(*v)
    times = {v: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            call(*v)
            e1.record()
            e1.synchronize()
            times[v].append(e0.elapsed_time(e1))
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--cases", default=CASES)
    p.add_argument("--sms", default="0", help="comma-separated SM budgets; 0 = every SM")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--once", action="store_true", help="one launch of each cluster on the first case (for ncu)")
    args = p.parse_args()
    torch.manual_seed(0)
    all_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [tuple(map(int, c.split(","))) for c in args.cases.split(";")]
    if args.once:
        call, _, _ = make_call(*cases[0])
        call(1, all_sms)
        call(2, all_sms)
        torch.cuda.synchronize()
        return
    peak = peak_tflops("fp8")
    rows = []
    for G, K, N, tpe in cases:
        call, M, pick = make_call(G, K, N, tpe)
        sms_list = [s or all_sms for s in map(int, args.sms.split(","))]
        res = time_variants(call, [(c, s) for s in sms_list for c in (1, 2)], args.rounds)
        flops = 2.0 * M * K * N
        for (c, s), ms in res.items():
            tf = flops / ms / 1e9
            rows.append({"case": f"G{G}_K{K}_N{N}_t{tpe}", "cluster": c, "sms": s, "ms": ms, "tflops": tf,
                         "frac_peak": tf / peak if peak else None, "c2_over_c1": res[(1, s)] / res[(2, s)],
                         "pick_cluster": pick})
        print_table([r for r in rows if r["case"] == rows[-1]["case"]],
                    ["case", "cluster", "sms", "ms", "tflops", "frac_peak", "c2_over_c1", "pick_cluster"])
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
