"""An expert-parallel MoE layer trained for a few steps (forward + backward) with turbo_dist.moe.

    python examples/moe_layer.py                        # CPU: spawns 4 gloo ranks, tiny sizes
    python examples/moe_layer.py --world-size 2 --steps 10
    torchrun --nproc_per_node 8 examples/moe_layer.py --tokens 4096 --hidden 7168 --ffn 2048 --experts 256 --topk 8

Layer: router (linear, softmax, top-k) -> TokenDispatcher.dispatch (tokens to the ranks owning their
experts, grouped by local expert) -> experts as two turbo_dist.ops.grouped_gemm calls with a GELU ->
TokenDispatcher.combine (weighted by the router probabilities, back to the tokens' ranks). On GPUs with
peer access the Buffer uses the `nvlink` transport (num_nvl_bytes sized by get_nvl_buffer_size_hint),
otherwise the `collective` one; gradients flow to the router, the experts and the input.
Rank 0 prints the loss (summed over ranks) and the time per step.
"""
import argparse
import time

import torch
import torch.distributed as dist
from torch import nn


class MoELayer(nn.Module):
    """y = x + sum_k p_k * expert_k(x) over the top-k experts of each token; experts split over the group."""

    def __init__(self, hidden, ffn, num_experts, topk, group=None, dtype=None, num_max_tokens=4096, transport=None):
        super().__init__()
        from turbo_dist.moe import Buffer, TokenDispatcher

        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} must be divisible by the group size {world}")
        local = num_experts // world
        self.topk = topk
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        # The full expert weights come from one seed, each rank keeps its slice (same model on any world size).
        g = torch.Generator().manual_seed(1234)
        w1 = torch.randn(num_experts, hidden, ffn, generator=g) / hidden ** 0.5
        w2 = torch.randn(num_experts, ffn, hidden, generator=g) / ffn ** 0.5
        self.w1 = nn.Parameter(w1[rank * local:(rank + 1) * local].to(dtype).contiguous())
        self.w2 = nn.Parameter(w2[rank * local:(rank + 1) * local].to(dtype).contiguous())
        # Sized for the payload dtype the layer moves (fp32 rows are twice bf16's); combine rows are `hidden` wide.
        nvl = Buffer.get_nvl_buffer_size_hint(num_max_tokens, hidden, world, topk,
                                              dtype=dtype or torch.get_default_dtype()) \
            if torch.cuda.is_available() else 0
        self.dispatcher = TokenDispatcher(num_experts, group, num_nvl_bytes=nvl, transport=transport)

    def forward(self, x):
        from turbo_dist.ops import grouped_gemm

        probs = torch.softmax(self.router(x).float(), dim=-1)
        topk_w, topk_idx = probs.topk(self.topk, dim=-1)
        expert_in, tokens_per_expert = self.dispatcher.dispatch(x, topk_idx, topk_w)
        lens = torch.tensor(tokens_per_expert, dtype=torch.int64)
        h = nn.functional.gelu(grouped_gemm(expert_in, self.w1, lens))
        expert_out = grouped_gemm(h, self.w2, lens)
        return x + self.dispatcher.combine(expert_out)


def train(rank, world, args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")
    torch.manual_seed(0)  # the same router on every rank
    model = MoELayer(args.hidden, args.ffn, args.experts, args.topk, dtype=dtype, num_max_tokens=args.tokens,
                     transport=args.transport).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator(device="cpu").manual_seed(100 + rank)  # this rank's tokens
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dev, dtype)
    target = torch.randn(args.tokens, args.hidden, generator=g).to(dev, dtype)
    times = []
    for step in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = model(x)
        loss = nn.functional.mse_loss(y.float(), target.float(), reduction="sum") / (args.tokens * world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {step}: loss {total.item():.5f}  time {times[-1] * 1e3:.2f} ms", flush=True)
    if rank == 0:
        steady = times[1:] or times
        print(f"world {world} ({dev.type}, {args.dtype}, transport {model.dispatcher.buffer.transport}): "
              f"{sum(steady) / len(steady) * 1e3:.2f} ms/step after the first; tokens/rank {args.tokens}, hidden "
              f"{args.hidden}, ffn {args.ffn}, top-{args.topk} of {args.experts} experts", flush=True)
    return float(total.item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, help="ranks to spawn on CPU (ignored under torchrun)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--transport", default=None, choices=["nvlink", "collective"], help="default: the Buffer's pick")
    args = p.parse_args()

    from turbo_dist.testing import run_script, under_launcher

    args.dtype = args.dtype or ("bf16" if under_launcher() and torch.cuda.is_available() else "fp32")
    run_script(train, args, args.world_size)


if __name__ == "__main__":
    main()
