"""Context-parallel attention in a few lines: shard a sequence over the ranks, attend, unshard.

    torchrun --nproc-per-node 2 examples/cp_attention.py            # GPUs (NCCL), or CPU (gloo) without CUDA
    torchrun --nproc-per-node 4 examples/cp_attention.py --mode ring --seqlen 8192

Every rank builds the same full q/k/v (same seed), keeps its zigzag shard (`turbo_dist.cp.shard`),
runs `turbo_dist.ops.flash_attn_func` with a `cp_param_bundle`, backpropagates, and checks the
unsharded output and gradients against attention on the whole sequence in one process: a relative
error above --tol (default 1e-4 in fp32 on CPU, 3e-2 in bf16 on GPU) prints FAIL and exits with 1.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from turbo_dist import cp
from turbo_dist.runtime import apply_safety_env
from turbo_dist.ops import flash_attn_func


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="all", choices=["all", "ring", "a2a", "allgather"])
    p.add_argument("--seqlen", type=int, default=2048, help="total sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--tol", type=float, default=None, help="max relative error accepted (o, dq, dk, dv)")
    args = p.parse_args()

    apply_safety_env()  # before NCCL starts: NVLink multicast stays off under any launcher
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        dev, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        dist.init_process_group("gloo")
        dev, dtype = torch.device("cpu"), torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    causal = not args.no_causal
    tol = args.tol if args.tol is not None else (3e-2 if dtype == torch.bfloat16 else 1e-4)
    failed = []

    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    s, d = args.seqlen, args.head_dim
    q, k, v, do = (torch.randn(1, s, h, d, generator=g).to(dev, dtype)
                   for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))

    # Reference: the whole sequence in this process.
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    o_full = flash_attn_func(qf, kf, vf, causal=causal)
    o_full.backward(do)

    for mode in (["ring", "a2a", "allgather"] if args.mode == "all" else [args.mode]):
        # This rank's shard (zigzag: chunks r and 2*cp-1-r of 2*cp, so causal work is balanced).
        ql, kl, vl = (cp.shard(t, group).detach().requires_grad_() for t in (q, k, v))
        o = flash_attn_func(ql, kl, vl, causal=causal,
                            cp_param_bundle={"cp_group": group, "cp_comm_type": mode, "load_balance": True})
        o.backward(cp.shard(do, group))
        errs = []
        for got, ref in ((o.detach(), o_full), (ql.grad, qf.grad), (kl.grad, kf.grad), (vl.grad, vf.grad)):
            full = cp.unshard(got, group).float()
            errs.append(((full - ref.float()).norm() / ref.float().norm()).item())
        ok = all(e <= tol for e in errs)  # NaN fails too
        if not ok:
            failed.append(mode)
        if rank == 0:
            print(f"{mode:9s} cp={world} S={s} causal={causal}: relative error o {errs[0]:.2e} "
                  f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}  {'OK' if ok else 'FAIL'} (tol {tol:.0e})")
    dist.destroy_process_group()
    if failed:  # every rank holds the same unsharded errors, so every rank exits alike
        sys.exit(1)


if __name__ == "__main__":
    main()
