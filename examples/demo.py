"""turbo_dist main job: MoE dispatch/combine + async-TP + context-parallel attention on N processes.

    python examples/demo.py --nproc 4                    # CPU: spawns 4 ranks on gloo
    launch/torchrun.sh 4 examples/demo.py                # GPUs: one rank per GPU on NCCL

Every step is checked against a plain single-process PyTorch reference computed on each rank
from the same seeded inputs; rank 0 prints what ran (backend chosen, shapes), how long it took and
the largest error. Exit status 1 if any check fails.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # `python examples/demo.py` from a source checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import turbo_dist  # noqa: E402
from turbo_dist import cp, moe, ops, tp  # noqa: E402
from turbo_dist.testing import run_script, under_launcher  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, iters):
    fn()  # warm-up (kernel compilation, buffer growth)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) / iters * 1e3


def _err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _row(step, what, ms, err, tol, ran):
    return {"step": step, "what": what, "ms": ms, "err": err, "ok": err <= tol, "ran": ran}


def moe_step(args, rank, world, device, dtype, iters):
    """Route tokens to experts over the group, run each expert, bring them back; forward + backward."""
    T, H, F, E, k = args.tokens, args.hidden, args.hidden * 2, args.experts, args.topk
    g = torch.Generator().manual_seed(1234)
    x_all = torch.randn(world, T, H, generator=g)
    scores = torch.randn(world, T, E, generator=g)
    w_all = torch.randn(E, H, F, generator=g) / H ** 0.5  # every expert's weight, for the reference
    topk_w_all, topk_idx_all = torch.softmax(scores, -1).topk(k, dim=-1)
    x = x_all[rank].to(device, dtype).requires_grad_(True)
    topk_idx, topk_w = topk_idx_all[rank].to(device), topk_w_all[rank].to(device)
    local_e = E // world
    w_local = w_all[rank * local_e:(rank + 1) * local_e].to(device, dtype)

    nvl = 0
    if device.type == "cuda" and args.moe_transport != "collective":
        # The buffer holds the widest row any op moves: dispatch sends H columns, but the experts here map
        # H -> F, so the combine (and the cached dispatch of its gradient in backward) moves F columns.
        nvl = moe.Buffer.get_nvl_buffer_size_hint(T, max(H, F), world, num_topk=k, dtype=dtype)
    td = moe.TokenDispatcher(E, buffer=moe.Buffer(None, nvl, transport=args.moe_transport))

    def forward():
        expert_in, counts = td.dispatch(x, topk_idx, topk_w)
        group_lens = torch.tensor(counts, dtype=torch.int64, device=device)
        expert_out = ops.grouped_gemm(expert_in, w_local, group_lens)
        return td.combine(expert_out)

    def fwd_bwd():
        x.grad = None
        y = forward()
        y.float().square().sum().backward()
        return y

    y, ms = _timed(fwd_bwd, device, iters)
    # Reference: y[t] = sum_j w[t, j] * x[t] @ W[e_tj], with autograd for dx.
    xr = x_all[rank].to(device).requires_grad_(True)
    y_ref = torch.zeros(T, F, device=device)
    for e in range(E):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel():
            contrib = (xr[tok] @ w_all[e].to(device)) * topk_w[tok, slot].unsqueeze(-1)
            y_ref = y_ref.index_add(0, tok, contrib)
    y_ref.square().sum().backward()
    err = max(_err(y, y_ref), _err(x.grad, xr.grad))
    what = (f"{T} tok/rank x {H} hidden, top-{k} of {E} experts, fwd+bwd "
            f"(dispatch -> grouped_gemm -> combine)")
    return _row("moe", what, ms, err, args.tol, f"transport={td.buffer.transport}, "
                f"grouped_gemm={ops.dispatcher.last_backend('grouped_gemm')}")


def tp_step(args, rank, world, device, dtype, iters):
    """Sequence-parallel MLP halves: all-gather + GEMM, then GEMM + reduce-scatter."""
    S, H, F = args.seq, args.hidden, args.hidden * 4
    g = torch.Generator().manual_seed(99)
    a_full = torch.randn(S, H, generator=g)
    w1 = torch.randn(H, F, generator=g) / H ** 0.5
    w2 = torch.randn(F, H, generator=g) / F ** 0.5
    fs = F // world
    a_shard = a_full.chunk(world)[rank].to(device, dtype)
    w1_local = w1[:, rank * fs:(rank + 1) * fs].to(device, dtype)
    w2_local = w2[rank * fs:(rank + 1) * fs].to(device, dtype)

    def step():
        _, (h,) = tp.all_gather_matmul(a_shard, [w1_local], gather_dim=0, return_a=False)
        return tp.matmul_reduce_scatter(h, w2_local, scatter_dim=0)

    out, ms = _timed(step, device, iters)
    ref = ((a_full.to(device) @ w1.to(device)).to(dtype).float() @ w2.to(device)).chunk(world)[rank]
    return _row("async-tp", f"seq {S} x hidden {H} -> ffn {F}: AG+GEMM then GEMM+RS", ms, _err(out, ref), args.tol,
                f"algo={tp.last_algo()} (TURBO_DIST_TP_ALGO={os.environ.get('TURBO_DIST_TP_ALGO', 'auto')})")


def cp_step(args, rank, world, device, dtype, iters, mode):
    """Causal attention over a sequence split across the group (zigzag layout), forward + backward."""
    B, S, Hq, Hkv, D = 1, args.seq, args.heads, max(args.heads // 4, 1), args.head_dim
    g = torch.Generator().manual_seed(7)
    q_full, k_full, v_full = (torch.randn(B, S, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    group = dist.group.WORLD
    q, k, v = (cp.shard(t.to(device, dtype), group).detach().requires_grad_(True) for t in (q_full, k_full, v_full))
    bundle = {"cp_group": group, "cp_comm_type": mode, "load_balance": True}  # cp.shard's zigzag

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        o = ops.flash_attn_func(q, k, v, causal=True, cp_param_bundle=bundle)
        o.float().sum().backward()
        return o

    o, ms = _timed(fwd_bwd, device, iters)
    qr, kr, vr = (t.to(device).requires_grad_(True) for t in (q_full, k_full, v_full))
    o_ref = ops.attention(qr, kr, vr, causal=True)
    o_ref.sum().backward()
    err = max(_err(cp.unshard(o.detach(), group), o_ref),
              _err(cp.unshard(q.grad, group), qr.grad), _err(cp.unshard(k.grad, group), kr.grad))
    return _row(f"cp-{mode}", f"B={B} S={S} (S/{world} per rank) Hq={Hq} Hkv={Hkv} D={D} causal, fwd+bwd", ms,
                err, args.tol, f"attention={ops.dispatcher.last_backend('attention_fwd')}")


def run_rank(rank, world, args):
    """One rank's whole job; returns its result rows (rank 0's are printed)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
        dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(rank)
    rows = [moe_step(args, rank, world, device, dtype, args.iters),
            tp_step(args, rank, world, device, dtype, args.iters)]
    for mode in ("ring", "a2a", "allgather"):
        rows.append(cp_step(args, rank, world, device, dtype, args.iters, mode))
    turbo_dist.get_runtime().barrier()
    return {"rank": rank, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "backend": dist.get_backend(), "rows": rows}


def _spawned(rank, world, args):  # module level so it pickles for run_distributed
    return run_rank(rank, world, args)


def report(results, world, elapsed):
    r0 = results[0]
    print(f"turbo_dist demo: {world} ranks, {r0['backend']} backend, {r0['device'].split(':')[0]}, "
          f"{r0['dtype']}, wall {elapsed:.1f} s")
    print(f"{'step':<14} {'ms/iter':>9} {'max rel err':>12}  {'ok':<4} what / what ran")
    ok = True
    for i, row in enumerate(r0["rows"]):
        worst = max(r["rows"][i]["err"] for r in results)
        row_ok = all(r["rows"][i]["ok"] for r in results)
        ok &= row_ok
        print(f"{row['step']:<14} {row['ms']:>9.2f} {worst:>12.2e}  {'OK' if row_ok else 'FAIL':<4} "
              f"{row['what']}\n{'':<42}[{row['ran']}]")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="ranks to spawn when not launched by torchrun/mpirun")
    p.add_argument("--tokens", type=int, default=None, help="MoE tokens per rank")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--experts", type=int, default=None, help="total experts (a multiple of the ranks)")
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="TP/CP sequence length (total)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--moe-transport", default=None, choices=["nvlink", "collective"], help="default: automatic")
    p.add_argument("--tol", type=float, default=None, help="max relative error accepted")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    defaults = dict(tokens=4096, hidden=2048, experts=64, topk=8, seq=8192, heads=32, head_dim=128, iters=10,
                    tol=3e-2) if on_gpu else dict(tokens=64, hidden=64, experts=8, topk=2, seq=128, heads=4,
                                                  head_dim=16, iters=3, tol=1e-4)
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    turbo_dist.runtime.config.apply_safety_env()

    start = time.perf_counter()
    # torchrun / launch/mpirun.sh: this process is one rank; otherwise spawn --nproc ranks (NCCL with a GPU per
    # rank, else gloo). Either way every rank's rows come back; rank 0 prints the table.
    results = run_script(_spawned, args, args.nproc, backend=None)
    if under_launcher() and int(os.environ["RANK"]) != 0:
        return 0
    return 0 if report(results, len(results), time.perf_counter() - start) else 1

if __name__ == "__main__":
    sys.exit(main())
