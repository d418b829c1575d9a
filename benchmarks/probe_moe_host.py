"""Host time of MoE calls on one GPU (world 1, self-loop), what one Triton launch costs, and the dispatch
layout's GPU time (torch ops against our kernel).

    python benchmarks/probe_moe_host.py --json probe.json

Eager decode pays the host time of every call (a CUDA graph replays none of it). Rows `host_us`: median
microseconds per call over --calls calls x --rounds rounds (queue drained around each round): the public
`low_latency_dispatch` / `low_latency_combine`, the launches inside them, Triton launches of an empty kernel
with 1 and 16 arguments (the floor any Triton launch pays on this host), and `get_dispatch_layout` for
--layout-tokens tokens over --layout-ranks ranks (torch ops vs kernels/moe_layout.py); rows `graph_us`: the
same layout calls replayed from a CUDA graph (GPU time without launch cost). Then a cProfile of dispatch.
"""
import argparse
import cProfile
import io
import os
import pstats
import socket
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402
from probe_host_overhead import timed  # noqa: E402


@triton.jit
def _empty1(a):
    pass


@triton.jit
def _empty16(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, B: tl.constexpr):
    pass


def _graph_us(fn, reps=50):
    """Median us of fn replayed from a CUDA graph (10 calls captured per graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 100)  # ms per 10 calls -> us per call
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layout-tokens", type=int, default=4096)
    p.add_argument("--layout-ranks", type=int, default=8)
    p.add_argument("--profile-top", type=int, default=30)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_moe_host: needs CUDA")
        return 0
    from turbo_dist.kernels import moe_layout, moe_ll
    from turbo_dist.runtime.config import apply_safety_env

    apply_safety_env()  # NCCL / symmetric memory below: the NVLink-multicast safety variables, as bench_moe.py
    from turbo_dist.moe import Buffer
    from turbo_dist.moe.layout import dispatch_layout_torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    t, h = args.tokens, args.hidden
    x = torch.randn(t, h, device=dev).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(args.experts, device=dev)[:args.topk] for _ in range(t)])
    w = torch.rand(t, args.topk, device=dev)
    buf = Buffer(None, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(t, h, 1, args.experts),
                 low_latency_mode=True)
    ll = buf._ll
    (q, s), count, handle, _, _ = buf.low_latency_dispatch(x, idx, t, args.experts)
    y = torch.randn(args.experts, t, h, device=dev).to(torch.bfloat16)
    rows = []

    def add(case, fn):
        rows.append({"case": case, "host_us": timed(fn, args.calls, args.rounds)})

    add("low_latency_dispatch fp8", lambda: buf.low_latency_dispatch(x, idx, t, args.experts))
    add("low_latency_dispatch bf16", lambda: buf.low_latency_dispatch(x, idx, t, args.experts, use_fp8=False))
    add("low_latency_combine", lambda: buf.low_latency_combine(y, idx, w, handle))
    reg = ll._regions[0]
    peers = ll._buffer.peer_ptrs
    cnt = ll._counters(0, 0)

    def send_and_wait():  # one send + its wait (the counters must be consumed every call)
        moe_ll.dispatch_send(x, None, idx, t, peers, 0, 1, args.experts, reg["x"], reg["s"], reg["idx"], 0,
                             cast_fp8=True)
        moe_ll.wait_counters(cnt, ll._err.addr, t, moe_ll.ERR_DISPATCH, 10.0)
    add("dispatch_send + wait_counters", send_and_wait)
    one = torch.zeros(1, device=dev)
    add("triton empty kernel, 1 arg", lambda: _empty1[(1,)](one))
    add("triton empty kernel, 16 args", lambda: _empty16[(1,)](one, one, one, one, 1, 2, 3, 4, one, one, one, one,
                                                               5, 6, 7, 8, B=4))
    add("torch.empty", lambda: torch.empty(t, h, device=dev))
    add("torch.zeros_like (one kernel)", lambda: torch.zeros_like(x))

    lt, lr = args.layout_tokens, args.layout_ranks
    lidx = torch.stack([torch.randperm(args.experts, device=dev)[:args.topk] for _ in range(lt)])
    layouts = {"dispatch layout, torch ops": lambda: dispatch_layout_torch(lidx, args.experts, lr),
               "dispatch layout, kernels/moe_layout": lambda: moe_layout.dispatch_layout(lidx, args.experts, lr)}
    same = all(torch.equal(a, b) for a, b in zip(*(f() for f in layouts.values())))
    for name, fn in layouts.items():
        add(f"{name} ({lt} tokens, {lr} ranks)", fn)
        rows[-1]["graph_us"] = _graph_us(fn)
        rows[-1]["same_as_torch"] = same

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        buf.low_latency_dispatch(x, idx, t, args.experts)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile_top)
    print_table(rows, ["case", "host_us", "graph_us", "same_as_torch"])
    print("## cProfile of low_latency_dispatch (fp8), sorted by own time")
    print(out.getvalue())
    meta = {"tokens": t, "hidden": h, "experts": args.experts, "topk": args.topk, "world": 1,
            "layout_tokens": lt, "layout_ranks": lr,
            "timing": f"median over {args.rounds} rounds of {args.calls} back-to-back calls"}
    if args.json:
        write_json(args.json, rows, meta)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
