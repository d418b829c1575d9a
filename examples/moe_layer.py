"""An expert-parallel MoE layer trained for a few steps (forward + backward) with turbo_dist.moe.

    python examples/moe_layer.py                        # CPU: spawns 4 gloo ranks, tiny sizes
    python examples/moe_layer.py --world-size 2 --steps 10
    torchrun --nproc_per_node 8 examples/moe_layer.py --tokens 4096 --hidden 7168 --ffn 2048 --experts 256 --topk 8
    torchrun --nproc_per_node 8 examples/moe_layer.py ... --fp8 blockwise   # experts in FP8 (DeepSeek-V3 recipe)

Layer: router (linear, softmax, top-k) -> TokenDispatcher.dispatch (tokens to the ranks owning their
experts, grouped by local expert) -> experts as two turbo_dist.ops.grouped_gemm calls with a GELU ->
TokenDispatcher.combine (weighted by the router probabilities, back to the tokens' ranks). On GPUs with
peer access the Buffer uses the `nvlink` transport (num_nvl_bytes sized by get_nvl_buffer_size_hint),
otherwise the `collective` one; gradients flow to the router, the experts and the input.
`--fp8 rowwise|blockwise`: the expert GEMMs run as turbo_dist.ops.grouped_gemm_fp8 (E4M3, just-in-time
scaling; blockwise = 1x128 activations / 128x128 weights), with every expert's rows padded to a multiple of 128
(`expert_alignment`): with those host counts the blockwise GEMM can run on cuBLASLt per expert.
Rank 0 prints the loss (summed over ranks), the time per step and the grouped-GEMM backends that ran.
"""
import argparse
import time

import torch
import torch.distributed as dist
from torch import nn


class MoELayer(nn.Module):
    """y = x + sum_k p_k * expert_k(x) over the top-k experts of each token; experts split over the group."""

    def __init__(self, hidden, ffn, num_experts, topk, group=None, dtype=None, num_max_tokens=4096, transport=None,
                 fp8=None):
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
        self.fp8 = None
        if fp8:
            from turbo_dist.ops import Float8QuantConfig, ScalingGranularity

            self.fp8 = Float8QuantConfig(granularity=ScalingGranularity[fp8.upper()])
        self.dispatcher = TokenDispatcher(num_experts, group, num_nvl_bytes=nvl, transport=transport,
                                          expert_alignment=128 if fp8 else 1)

    def forward(self, x):
        from turbo_dist.ops import grouped_gemm, grouped_gemm_fp8

        probs = torch.softmax(self.router(x).float(), dim=-1)
        topk_w, topk_idx = probs.topk(self.topk, dim=-1)
        expert_in, tokens_per_expert = self.dispatcher.dispatch(x, topk_idx, topk_w)
        lens = torch.tensor(tokens_per_expert, dtype=torch.int64)  # host counts: no sync in the GEMMs
        if self.fp8 is None:
            gemm = grouped_gemm
        else:
            def gemm(a, w, group_lens):
                return grouped_gemm_fp8(a, w, group_lens, config=self.fp8)
        h = nn.functional.gelu(gemm(expert_in, self.w1, lens))
        expert_out = gemm(h, self.w2, lens)
        return x + self.dispatcher.combine(expert_out)


def train(rank, world, args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")
    torch.manual_seed(0)  # the same router on every rank
    model = MoELayer(args.hidden, args.ffn, args.experts, args.topk, dtype=dtype, num_max_tokens=args.tokens,
                     transport=args.transport, fp8=args.fp8).to(dev)
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
        for p in model.router.parameters():  # replicated (data parallel over the EP group): average its gradient,
            dist.all_reduce(p.grad)          # or the ranks' routers drift apart; the experts are sharded, not
            p.grad /= world                  # replicated, and keep their own
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {step}: loss {total.item():.5f}  time {times[-1] * 1e3:.2f} ms", flush=True)
    if rank == 0:
        from turbo_dist.ops import dispatcher

        ran = ("grouped_scaled_mm", "grouped_gemm_wgrad") if args.fp8 else ("grouped_gemm", "grouped_gemm_wgrad")
        print("grouped GEMM backends: " + ", ".join(f"{op}={dispatcher.last_backend(op)}" for op in ran), flush=True)
        # median, not mean: a step that meets a new routing (token counts per expert) can still tune or probe
        # a kernel (seconds), which a mean over a few steps would report as the step time
        steady = sorted(times[1:] or times)
        print(f"world {world} ({dev.type}, {args.dtype}{', fp8 ' + args.fp8 if args.fp8 else ''}, transport "
              f"{model.dispatcher.buffer.transport}): "
              f"{steady[len(steady) // 2] * 1e3:.2f} ms/step (median after the first; slowest "
              f"{steady[-1] * 1e3:.1f} ms); tokens/rank {args.tokens}, hidden "
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
    p.add_argument("--fp8", default=None, choices=["rowwise", "blockwise"], help="expert GEMMs in FP8 (default: off)")
    args = p.parse_args()

    from turbo_dist.testing import run_script, under_launcher

    args.dtype = args.dtype or ("bf16" if under_launcher() and torch.cuda.is_available() else "fp32")
    run_script(train, args, args.world_size)


if __name__ == "__main__":
    main()
