"""`bench_moe.py --mode low-latency | internode` (imported by benchmarks/bench_moe.py; same arguments).

low-latency: DeepEP's decode shape (128 tokens per rank, hidden 7168, top-8 of 256 experts). Times
`low_latency_dispatch` (FP8 and BF16 payloads) and `low_latency_combine` (BF16, weighted) on each
low-latency path (and the `use_logfmt` combine on triton) (`triton`: stores into peers' symmetric buffers, where the runtime has peer access;
`collective`: NCCL all_gather / all_to_all with fixed-size slots), beside the normal-mode `collective`
transport of the same run (NCCL all_to_all + permute: dispatch with layout, and combine) as the baseline.
GB/s as DeepEP's test counts it: per selected (token, expert) pair, hidden + hidden / 128 * 4 + 16 bytes
(FP8) or hidden * 2 (BF16) for dispatch, hidden * 2 for combine (LogFMT: its wire rows,
kernels/moe_ll_logfmt.row_bytes, 88 bytes per 64 values); averaged over ranks, over the slowest rank's median
time, eager (`<path>_GBps`) and CUDA-graph replay (`<path>_graph_GBps`); `frac_peak` / `frac_peak_graph` divide
them by bench_moe.peak_gbps. Same-run ratios: `speedup_vs_a2a` (the normal-mode collective transport, eager,
over the fastest low-latency path) and `graph_x_collective` (the low-latency collective path's graph replay over
triton's). Dispatch outputs of the two paths are checked equal (valid rows) before timing; a graph capture that
fails leaves its `_graph_us` empty and is listed in meta["errors"].

internode: the `hierarchical` transport (tokens cross nodes once per node, then are forwarded inside the
node) against the flat `collective` transport (one NCCL all_to_all) in the same run. The node split comes
from the runtime: launch with TURBO_DIST_RANKS_PER_NODE=2 to make a 4-GPU host act as 2 nodes x 2.
Reports RDMA-side GB/s (bytes of the tokens sent across the rail hop, one per (token, destination node),
DeepEP's `num_tokens_per_rdma_rank` count) and NVLink-side GB/s (bytes a rank receives) for dispatch,
combine likewise (bytes sent), beside the flat path's GB/s on the NVLink-side count.

    torchrun --nproc-per-node 4 benchmarks/bench_moe.py --mode low-latency --json ll.json
    TURBO_DIST_RANKS_PER_NODE=2 torchrun --nproc-per-node 4 benchmarks/bench_moe.py --mode internode
    python benchmarks/bench_moe.py --mode low-latency        # one GPU: world_size 1, a self-loop
"""
import os

import torch
import torch.distributed as dist

from bench_moe import _equal, finish, frac, init_dist, make_routing, mean_over_ranks, peak_gbps, to_fp8
from common import time_across_ranks


def _ll_buffer(path, num_max, hidden, world, experts):
    from turbo_dist.moe import Buffer

    old = os.environ.get("TURBO_DIST_MOE_LL_PATH")
    os.environ["TURBO_DIST_MOE_LL_PATH"] = path
    try:
        nbytes = Buffer.get_low_latency_rdma_size_hint(num_max, hidden, world, experts)
        return Buffer(None, num_rdma_bytes=nbytes, low_latency_mode=True)
    finally:
        if old is None:
            os.environ.pop("TURBO_DIST_MOE_LL_PATH", None)
        else:
            os.environ["TURBO_DIST_MOE_LL_PATH"] = old


def _ll_paths(rt):
    paths = ["collective"]
    if rt.device.type == "cuda" and rt.has_peer_access and rt.num_nodes == 1:
        paths.insert(0, "triton")
    return paths


def _same_dispatch(a, b, fp8):
    """Equal counts, and equal rows / src_info on every expert's valid rows."""
    (xa, ca, ha), (xb, cb, hb) = a, b
    ok = torch.equal(ca, cb) and torch.equal(ha[1], hb[1])
    if ok:
        for e in range(ca.numel()):
            n = int(ca[e])
            if fp8:
                ok &= torch.equal(xa[0][e, :n].view(torch.uint8), xb[0][e, :n].view(torch.uint8))
                ok &= torch.equal(xa[1][e, :n], xb[1][e, :n])
            else:
                ok &= torch.equal(xa[e, :n], xb[e, :n])
            ok &= torch.equal(ha[0][e, :n], hb[0][e, :n])
    flag = torch.tensor([0.0 if ok else 1.0], device="cuda")
    dist.all_reduce(flag)
    return bool(flag.item() == 0)


def run_low_latency(args):
    from turbo_dist import get_runtime
    from turbo_dist.moe import Buffer

    rank, world, dev = init_dist()
    rt = get_runtime()
    link, link_note = peak_gbps(world)
    paths = _ll_paths(rt)
    errors = []  # graph captures that failed: the rows' _graph_us are None there
    e_l = args.experts // world
    rows = []
    for num_tokens in args.token_list:
        buffers = {p: _ll_buffer(p, num_tokens, args.hidden, world, args.experts) for p in paths}
        normal = Buffer(None, transport="collective")
        topk_idx, topk_weights = make_routing(num_tokens, args.experts, args.topk, rank, args.seed, dev)
        g = torch.Generator(device=dev).manual_seed(args.seed + 17 * rank)
        x = torch.randn(num_tokens, args.hidden, generator=g, device=dev).to(torch.bfloat16)
        selections = mean_over_ranks(int((topk_idx >= 0).sum()))
        y = torch.randn(e_l, num_tokens * world, args.hidden, generator=g, device=dev).to(torch.bfloat16)

        # Baseline: the normal-mode collective transport (NCCL all_to_all + permute), same tokens.
        n_rank, _, n_expert, in_rank, _ = normal.get_dispatch_layout(topk_idx, args.experts)
        layout = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
        base = {}
        for dtype in args.dtype_list:
            xin = x if dtype == "bf16" else to_fp8(x)
            base[dtype] = time_across_ranks(lambda: normal.dispatch(xin, topk_idx=topk_idx, topk_weights=topk_weights,
                                                          **layout), args.warmup, args.reps)
        recv_x, _, _, _, handle, _ = normal.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
        base["combine"] = time_across_ranks(lambda: normal.combine(recv_x, handle), args.warmup, args.reps)

        for dtype in args.dtype_list:
            fp8 = dtype == "fp8"
            outs, times, graphed = {}, {}, {}
            for p, buf in buffers.items():
                def disp(buf=buf):
                    return buf.low_latency_dispatch(x, topk_idx, num_tokens, args.experts, use_fp8=fp8)
                outs[p] = disp()[:3]
                times[p] = time_across_ranks(disp, args.warmup, args.reps)
                graphed[p] = _graph_time(disp, args, f"dispatch {dtype} {p} tokens {num_tokens}", errors)
            exact = _same_dispatch(outs["triton"], outs["collective"], fp8) if len(outs) == 2 else None
            nbytes = selections * ((args.hidden + args.hidden // 128 * 4 + 16) if fp8 else args.hidden * 2)
            rows.append(_ll_row("dispatch", dtype, num_tokens, world, times, graphed, base[dtype], nbytes, link, exact))
            if rank == 0:
                print(f"[bench_moe low-latency] tokens {num_tokens} dispatch {dtype}: " + ", ".join(
                    f"{p} {t * 1e3:.1f} us" for p, t in times.items()) + f", normal collective {base[dtype] * 1e3:.1f} us",
                    flush=True)

        times, results, graphed = {}, {}, {}
        for p, buf in buffers.items():
            _, _, h, _, _ = buf.low_latency_dispatch(x, topk_idx, num_tokens, args.experts, use_fp8=False)

            def comb(buf=buf, h=h):
                return buf.low_latency_combine(y, topk_idx, topk_weights, h)
            results[p] = comb()[0]
            times[p] = time_across_ranks(comb, args.warmup, args.reps)
            graphed[p] = _graph_time(comb, args, f"combine bf16 {p} tokens {num_tokens}", errors)
        close = None
        if len(results) == 2:
            ok = torch.allclose(results["triton"].float(), results["collective"].float(), rtol=2e-2, atol=2e-2)
            flag = torch.tensor([0.0 if ok else 1.0], device=dev)
            dist.all_reduce(flag)
            close = bool(flag.item() == 0)
        rows.append(_ll_row("combine", "bf16", num_tokens, world, times, graphed, base["combine"],
                            selections * args.hidden * 2, link, close))
        if rank == 0:
            print(f"[bench_moe low-latency] tokens {num_tokens} combine: " + ", ".join(
                f"{p} {t * 1e3:.1f} us" for p, t in times.items()) + f", normal collective {base['combine'] * 1e3:.1f} us",
                flush=True)
        if "triton" in buffers:  # use_logfmt: 10-bit log-magnitude rows (88 B per 64 values), triton path only
            from turbo_dist.kernels.moe_ll_logfmt import row_bytes

            buf, h = buffers["triton"], _handle_of(buffers["triton"], x, topk_idx, num_tokens, args)

            def comb_lf(buf=buf, h=h):
                return buf.low_latency_combine(y, topk_idx, topk_weights, h, use_logfmt=True)
            lf = comb_lf()[0]
            ref = results["triton"].float()
            rel = float((lf.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            t_lf = {"triton_logfmt": time_across_ranks(comb_lf, args.warmup, args.reps)}
            g_lf = _graph_time(comb_lf, args, f"combine logfmt triton tokens {num_tokens}", errors)
            row = _ll_row("combine", "logfmt", num_tokens, world, t_lf, {"triton_logfmt": g_lf},
                          base["combine"], selections * row_bytes(args.hidden), link, rel < 0.05)
            row["rel_err_vs_bf16"] = rel
            rows.append(row)
            if rank == 0:
                print(f"[bench_moe low-latency] tokens {num_tokens} combine logfmt: triton {t_lf['triton_logfmt'] * 1e3:.1f}"
                      f" us (graph {row['triton_logfmt_graph_us'] or float('nan'):.1f} us), rel. err vs bf16 {rel:.4f}",
                      flush=True)
    meta = {"mode": "low-latency", "world_size": world, "hidden": args.hidden, "topk": args.topk,
            "experts": args.experts, "paths": paths, "peak_GBps": link, "peak_note": link_note, "errors": errors,
            "baseline": "normal-mode collective transport (NCCL all_to_all + permute; dispatch includes its "
                        "count exchange) on the same tokens",
            "timing": f"median of {args.reps} after {args.warmup} warm-up, max over ranks; bytes averaged over ranks"}
    finish(args, rows, meta)
    return rows


def _handle_of(buf, x, topk_idx, num_tokens, args):
    return buf.low_latency_dispatch(x, topk_idx, num_tokens, args.experts, use_fp8=False)[2]


def _graph_time(fn, args, what, errors):
    """Median ms of `fn` replayed from a CUDA graph (two calls per graph: both buffer parities), or None
    if capture fails (then '<what>: ...' is appended to `errors`, which the JSON's meta keeps). Decode loops run
    these calls in graphs: this is the GPU time without launch cost."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread may touch CUDA
            fn()
            fn()
        return time_across_ranks(graph.replay, args.warmup, args.reps) / 2
    except Exception as exc:  # report, keep benchmarking the eager calls
        msg = f"{what}: CUDA graph capture failed: {type(exc).__name__}: {exc}"[:400]
        errors.append(msg)
        if dist.get_rank() == 0:
            print(f"[bench_moe low-latency] {msg}", flush=True)
        torch.cuda.synchronize()
        return None


def _ll_row(op, dtype, tokens, world, times, graphed, base_ms, nbytes, link, check):
    row = {"op": op, "dtype": dtype, "tokens": tokens, "world": world, "bytes": nbytes}
    for p, t in times.items():
        row[f"{p}_us"] = t * 1e3
        row[f"{p}_GBps"] = nbytes / (t * 1e-3) / 1e9
        g = graphed.get(p)
        row[f"{p}_graph_us"] = None if g is None else g * 1e3
        row[f"{p}_graph_GBps"] = None if g is None else nbytes / (g * 1e-3) / 1e9
    row["nccl_a2a_us"] = base_ms * 1e3
    best = min(times, key=times.get)
    row["best"] = best
    row["speedup_vs_a2a"] = base_ms / times[best]
    row["frac_peak"] = frac(row[f"{best}_GBps"], link)
    row["frac_peak_graph"] = frac(row[f"{best}_graph_GBps"], link) if row[f"{best}_graph_GBps"] else None
    g_tr, g_co = graphed.get("triton"), graphed.get("collective")
    row["graph_x_collective"] = (g_co / g_tr) if g_tr and g_co else None
    row["paths_agree"] = check
    return row


def run_internode(args):
    from turbo_dist.moe import Buffer
    from turbo_dist.moe.hierarchical import rdma_layout

    rank, world, dev = init_dist()
    hier = Buffer(None, transport="hierarchical")
    flat = Buffer(None, transport="collective")
    rt = hier.runtime
    link, link_note = peak_gbps(world)
    rows = []
    for num_tokens in args.token_list:
        topk_idx, topk_weights = make_routing(num_tokens, args.experts, args.topk, rank, args.seed, dev)
        g = torch.Generator(device=dev).manual_seed(args.seed + 17 * rank)
        x_bf16 = torch.randn(num_tokens, args.hidden, generator=g, device=dev).to(torch.bfloat16)
        n_rank, n_rdma, n_expert, in_rank, _ = hier.get_dispatch_layout(topk_idx, args.experts)
        layout = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
        rdma_tokens = int(rdma_layout(in_rank, rt.num_nodes)[0].sum())
        for dtype in args.dtype_list:
            x = x_bf16 if dtype == "bf16" else to_fp8(x_bf16)
            hout = hier.dispatch(x, num_tokens_per_rdma_rank=n_rdma, topk_idx=topk_idx, topk_weights=topk_weights,
                                 **layout)
            fout = flat.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
            same = all(_equal(a, b) for a, b in zip(hout[:3], fout[:3])) and hout[3] == fout[3]
            flag = torch.tensor([0.0 if same else 1.0], device=dev)
            dist.all_reduce(flag)
            exact = bool(flag.item() == 0)
            t_h = time_across_ranks(lambda: hier.dispatch(x, num_tokens_per_rdma_rank=n_rdma, topk_idx=topk_idx,
                                                topk_weights=topk_weights, **layout), args.warmup, args.reps)
            t_f = time_across_ranks(lambda: flat.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout),
                          args.warmup, args.reps)
            row_bytes = args.hidden * 2 if dtype == "bf16" else args.hidden + args.hidden // 128 * 4
            num_recv = hout[4].num_recv_tokens
            rows.append(_inter_row("dispatch", dtype, num_tokens, world, rt, t_h, t_f,
                                   mean_over_ranks(rdma_tokens * row_bytes), mean_over_ranks(num_recv * row_bytes),
                                   link, exact))
            if rank == 0:
                print(f"[bench_moe internode] tokens {num_tokens} dispatch {dtype}: hierarchical {t_h * 1e3:.0f} us, "
                      f"flat {t_f * 1e3:.0f} us", flush=True)
            if dtype != args.dtype_list[0]:
                continue
            handle, f_handle = hout[4], fout[4]
            recv = hout[0]
            y = (torch.randn(recv.shape, generator=g, device=dev)).to(torch.bfloat16)
            t_h = time_across_ranks(lambda: hier.combine(y, handle), args.warmup, args.reps)
            t_f = time_across_ranks(lambda: flat.combine(y, f_handle), args.warmup, args.reps)
            ok = torch.allclose(hier.combine(y, handle)[0].float(), flat.combine(y, f_handle)[0].float(),
                                rtol=2e-2, atol=2e-2)
            flag = torch.tensor([0.0 if ok else 1.0], device=dev)
            dist.all_reduce(flag)
            rows.append(_inter_row("combine", "bf16", num_tokens, world, rt, t_h, t_f,
                                   mean_over_ranks(rdma_tokens * args.hidden * 2),
                                   mean_over_ranks(handle.num_recv_tokens * args.hidden * 2), link,
                                   bool(flag.item() == 0)))
            if rank == 0:
                print(f"[bench_moe internode] tokens {num_tokens} combine: hierarchical {t_h * 1e3:.0f} us, "
                      f"flat {t_f * 1e3:.0f} us", flush=True)
    meta = {"mode": "internode", "world_size": world, "num_nodes": rt.num_nodes,
            "ranks_per_node": rt.local_world_size, "hidden": args.hidden, "topk": args.topk,
            "experts": args.experts, "peak_GBps": link, "peak_note": link_note,
            "bytes": "rdma: one row per (token, destination node); nvl: rows received (dispatch) / sent (combine)",
            "timing": f"median of {args.reps} after {args.warmup} warm-up, max over ranks; bytes averaged over ranks"}
    finish(args, rows, meta)
    return rows


def _inter_row(op, dtype, tokens, world, rt, t_h, t_f, rdma_bytes, nvl_bytes, link, check):
    return {"op": op, "dtype": dtype, "tokens": tokens, "world": world, "nodes": rt.num_nodes,
            "hier_us": t_h * 1e3, "hier_rdma_GBps": rdma_bytes / (t_h * 1e-3) / 1e9,
            "hier_nvl_GBps": nvl_bytes / (t_h * 1e-3) / 1e9, "flat_us": t_f * 1e3,
            "flat_GBps": nvl_bytes / (t_f * 1e-3) / 1e9, "speedup": t_f / t_h,
            "frac_peak": frac(nvl_bytes / (t_h * 1e-3) / 1e9, link), "matches_flat": check}
