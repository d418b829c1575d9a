"""A tensor-parallel MLP block with sequence parallelism, trained for a few steps (forward + backward).

    python examples/tp_mlp.py                       # CPU: spawns 4 gloo ranks, tiny sizes
    python examples/tp_mlp.py --world-size 2 --steps 10
    torchrun --nproc_per_node 4 examples/tp_mlp.py --tokens 8192 --hidden 4096 --ffn 14336 --dtype bf16

Block: x + RowParallelLinear(gelu(ColumnParallelLinear(x))), activations sharded along the sequence
dim between blocks. The column layer's forward is an all-gather + GEMM and its backward a GEMM +
reduce-scatter; the row layer the other way round (turbo_dist.tp picks the algorithm: symmetric-memory
pipelines on GPUs with peer access, NCCL/gloo collectives otherwise; --algo forces one).
Each rank prints nothing; rank 0 prints the loss (summed over the group) and the time per step.
"""
import argparse
import os
import time

import sys

import torch
import torch.distributed as dist
from torch import nn

try:
    import turbo_dist  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TPMLPBlock(nn.Module):
    """y = x + down(gelu(up(x))); x: [S / tp, B, hidden] (sequence-sharded), y the same."""

    def __init__(self, hidden, ffn, group=None, dtype=None, algo=None):
        super().__init__()
        from turbo_dist import tp

        self.up = tp.ColumnParallelLinear(hidden, ffn, group=group, sequence_parallel=True, seq_dim=0, dtype=dtype,
                                          algo=algo)
        self.down = tp.RowParallelLinear(ffn, hidden, group=group, sequence_parallel=True, seq_dim=0, dtype=dtype,
                                         algo=algo)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


def train(rank, world, args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")
    torch.manual_seed(0)  # the same seed on every rank: each rank draws its own weight shard, biases match
    model = TPMLPBlock(args.hidden, args.ffn, dtype=dtype, algo=args.algo)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.tokens % world:
        raise ValueError(f"--tokens {args.tokens} must be divisible by the world size {world}")
    g = torch.Generator(device="cpu").manual_seed(100 + rank)  # this rank's sequence shard of the batch
    x = torch.randn(args.tokens // world, args.batch, args.hidden, generator=g).to(dev, dtype)
    target = torch.randn(args.tokens // world, args.batch, args.hidden, generator=g).to(dev, dtype)
    times = []
    for step in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = model(x)
        loss = nn.functional.mse_loss(y.float(), target.float(), reduction="sum") / (args.tokens * args.batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the loss over the whole sequence
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {step}: loss {total.item():.5f}  time {times[-1] * 1e3:.2f} ms", flush=True)
    if rank == 0:
        steady = times[1:] or times
        print(f"world {world} ({dev.type}, {args.dtype}): {sum(steady) / len(steady) * 1e3:.2f} ms/step after the "
              f"first; tokens {args.tokens}, hidden {args.hidden}, ffn {args.ffn}", flush=True)
    return float(total.item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, help="ranks to spawn on CPU (ignored under torchrun)")
    p.add_argument("--tokens", type=int, default=64, help="sequence length (whole, before sharding)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--algo", default=None, choices=["auto", "ring", "direct", "collective"])
    args = p.parse_args()

    from turbo_dist.testing import run_script, under_launcher

    args.dtype = args.dtype or ("bf16" if under_launcher() and torch.cuda.is_available() else "fp32")
    run_script(train, args, args.world_size)


if __name__ == "__main__":
    main()
