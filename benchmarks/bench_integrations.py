"""One MoE layer step (forward + backward) through Megatron-core and TorchTitan: each framework's default
path against the same layer with turbo_dist's hooks on, in the same run, interleaved (issue 8).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc-per-node 4 benchmarks/bench_integrations.py --json integrations_h200x4.json
    python benchmarks/bench_integrations.py --cpu-check --nproc 2 --framework both   # CI: logic only, tiny sizes

Paths (expert parallelism over all ranks, EP = world size, TP = 1; dropless top-k routing):
- megatron/default: `MoELayer` of Megatron's local spec, `moe_token_dispatcher_type="alltoall"`
  (MoEAlltoAllTokenDispatcher), SequentialMLP SwiGLU experts (Megatron's expert module without
  TransformerEngine; its legacy GroupedMLP needs the `grouped_gemm` package).
- megatron/turbo_dist: the same `MoELayer` (same spec, same weights) with `moe_token_dispatcher_type="flex"`,
  `moe_flex_dispatcher_backend="deepep"` after `turbo_dist.integrations.megatron.enable()`: Megatron's flex
  dispatcher on `turbo_dist.moe.Buffer`. The experts are Megatron's in both rows (turbo_dist has no
  Megatron expert hook), so the difference is the token dispatch/combine.
- torchtitan/default: TorchTitan's `MoE` (TokenChoiceTopKRouter, RoutedExperts) with its "standard" EP
  backend (`AllToAllTokenDispatcher`) and `GroupedExperts` (torch._grouped_mm).
- torchtitan/turbo_dist: the same config with `turbo_dist.integrations.torchtitan.OVERRIDES` applied (as
  `--override.imports` does): `TurboDistTokenDispatcher` (turbo_dist.moe) + `TurboDistGroupedExperts`
  (turbo_dist.ops.grouped_gemm).

Defaults (DeepSeek-like, sized for 4xH200): hidden 4096, ffn 2048 per expert (SwiGLU), 64 experts,
top-8, 4096 tokens per rank, bf16, softmax router in fp32, no aux loss, no shared expert. Flags change them.

Before timing, each turbo_dist row's output and input gradient are compared with the default row's
(rel_err_out / rel_err_dx: relative Frobenius error, max over ranks; same weights, same inputs). Where
the default path cannot run (on CPU, Megatron's), the turbo_dist row is checked against a plain PyTorch
reference of the routed SwiGLU experts computed from all ranks' expert weights instead (`checked_vs`).
A check over --tol marks the row FAIL and the exit status is 1.
Timing: per round, each path is timed with the same warm-up / iteration counts on every rank (CUDA
events, median over iterations per rank, max over ranks); rounds alternate the order of the paths;
a path's time is the median of its round times. vs_default = default ms / turbo_dist ms (> 1: faster).

--cpu-check runs the same code on gloo ranks spawned by this script (turbo_dist.testing.run_distributed),
tiny sizes; the times mean nothing. Megatron's alltoall dispatcher cannot be built on CPU (it creates a
torch.cuda.Stream in its constructor): that row is skipped with the reason. Megatron's TopKRouter.gating
moves its weight to CUDA; on CPU the layer is built with a TopKRouter subclass whose gating is the same
computation without that move (through the spec's `router` field, Megatron's own hook), and says so.
megatron-core 0.16.1 without TransformerEngine raises NameError (`te_general_gemm`) in every TopKRouter
forward, CPU or GPU; the bench defines that name as None (Megatron's torch.mm path), for both rows, and says so.
"""
import argparse
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(1, _ROOT)
from common import (bench_order, bench_seed, command_line, design_rounds, machine_info,  # noqa: E402
                    print_table, round_order, time_across_ranks, write_json)

FRAMEWORKS = ("megatron", "torchtitan")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPU_SIZES = dict(hidden=4096, ffn=2048, experts=64, topk=8, tokens=4096)
CPU_SIZES = dict(hidden=32, ffn=16, experts=8, topk=2, tokens=16)
# Megatron's flex preprocess is torch.compile'd (jit_fuser); compiling on CPU costs more than the check.
CPU_ENV = {"TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
ALLTOALL_CPU_REASON = ("Megatron's MoEAlltoAllTokenDispatcher creates a torch.cuda.Stream in its constructor: "
                       "its default path needs CUDA")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", default="both", choices=["megatron", "torchtitan", "both"])
    p.add_argument("--hidden", type=int, default=None, help=f"default {GPU_SIZES['hidden']} (CPU check: "
                   f"{CPU_SIZES['hidden']})")
    p.add_argument("--ffn", type=int, default=None, help=f"per-expert SwiGLU hidden size, default {GPU_SIZES['ffn']}")
    p.add_argument("--experts", type=int, default=None, help=f"default {GPU_SIZES['experts']}")
    p.add_argument("--topk", type=int, default=None, help=f"default {GPU_SIZES['topk']}")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens per rank, default {GPU_SIZES['tokens']}")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--transport", default=None, choices=["nvlink", "collective"],
                   help="turbo_dist.moe transport (default: Buffer's choice: nvlink on one node with peer access)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed round")
    p.add_argument("--iters", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path")
    p.add_argument("--tol", type=float, default=None,
                   help="max rel err of a turbo_dist row (default 2e-2 bf16, 1e-4 fp32)")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-check", action="store_true",
                   help="spawn --nproc gloo ranks and run the logic at tiny sizes (times mean nothing)")
    p.add_argument("--nproc", type=int, default=2, help="ranks for --cpu-check")
    args = p.parse_args(argv)
    for k, v in (CPU_SIZES if args.cpu_check else GPU_SIZES).items():  # what the command line left unset
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.cpu_check:
        args.warmup, args.iters, args.rounds = min(args.warmup, 1), min(args.iters, 2), min(args.rounds, 2)
    if args.tol is None:
        args.tol = 2e-2 if args.dtype == "bf16" else 1e-4
    return args


# ---------------------------------------------------------------------------------------------- helpers
def rel_err(a, b):
    """Relative Frobenius error of this rank's tensors, max over ranks."""
    e = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).reshape(1).cpu()
    if dist.get_backend() == "nccl":
        e = e.cuda()
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return float(e.item())


def time_ms(fn, warmup, iters, device):
    """Median ms per call on this rank, max over ranks; the same call count on every rank."""
    if device.type == "cuda":
        return time_across_ranks(fn, warmup, iters)
    for _ in range(warmup):
        fn()
    dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_interleaved(steps, args, device):
    """{label: step fn} -> {label: ms}: each round in common.bench_order's order (balanced by default: within the
    rounds each label timed right after each other one equally often, --rounds rounded up to whole designs; seeded
    by rank 0's bench_seed, broadcast, so every rank runs the same orders and the JSON's order_seed repeats them;
    a fixed rotation kept each label's neighbours, see common.bench_interleaved); per label the median of its
    rounds."""
    labels = list(steps)
    times = {label: [] for label in labels}
    order = bench_order()
    rounds = args.rounds
    if rounds > 1:
        step = design_rounds(len(labels), order)
        rounds = -(-rounds // step) * step
    seed = [bench_seed()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(seed, src=0)  # rank 0's seed: the one its JSON records
    for r in range(rounds):
        for label in round_order(labels, r, order, seed=seed[0]):
            times[label].append(time_ms(steps[label], args.warmup, args.iters, device))
    return {label: statistics.median(ts) for label, ts in times.items()}


def nvl_bytes(args, world):
    """Symmetric buffer for the nvlink transport: any routing of up to --tokens tokens per rank, rows of
    `hidden` in the layer dtype (both frameworks dispatch and combine hidden-wide rows)."""
    if args.transport == "collective":
        return 0
    from turbo_dist.moe import Buffer

    return Buffer.get_nvl_buffer_size_hint(args.tokens, args.hidden, world, args.topk, dtype=DTYPES[args.dtype])


def shapes(args, world):
    return dict(hidden=args.hidden, ffn=args.ffn, experts=args.experts, topk=args.topk, tokens_per_rank=args.tokens,
                ep=world, dtype=args.dtype)


def _tensors(args, device, rank, dtype, layout):
    """This rank's input and output gradient (seeded per rank), in the framework's layout."""
    g = torch.Generator().manual_seed(1000 + rank)
    shape = (args.tokens, 1, args.hidden) if layout == "sbh" else (1, args.tokens, args.hidden)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, dout


def _step_fn(forward, params, x, dout):
    """One training step of the layer: forward, backward with a fixed output gradient; grads reset first so
    every step does the same work (no accumulation into existing grads)."""
    xg = x.detach().clone().requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        forward(xg).backward(dout)

    return step


def _check(forward, params, x, dout):
    """Output and input gradient of one step, for the correctness check (parameter grads reset after)."""
    xg = x.detach().clone().requires_grad_(True)
    out = forward(xg)
    out.backward(dout)
    for p in params:
        p.grad = None
    if not out.abs().sum() > 0 or xg.grad is None or not xg.grad.abs().sum() > 0:
        raise RuntimeError("the layer's output or input gradient is all zero: nothing to compare")
    return out.detach(), xg.grad.detach()


# ---------------------------------------------------------------------------------------------- Megatron
def _megatron_config(args, world, dispatcher, cpu):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = DTYPES[args.dtype]
    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, moe_ffn_hidden_size=args.ffn,
        num_attention_heads=max(1, args.hidden // 128), num_moe_experts=args.experts, moe_router_topk=args.topk,
        moe_token_dispatcher_type=dispatcher, moe_flex_dispatcher_backend="deepep",
        moe_router_load_balancing_type="none", moe_router_dtype="fp32", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, expert_model_parallel_size=world,
        use_cpu_initialization=cpu, params_dtype=dtype, bf16=dtype == torch.bfloat16, hidden_dropout=0.0)


def _cpu_router_class():
    """TopKRouter whose gating keeps its weight where it is (Megatron's moves it to CUDA); CPU check only."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear
    from megatron.core.transformer.moe.router import TopKRouter

    class CPUTopKRouter(TopKRouter):
        def gating(self, input):
            router_dtype = torch.float32 if self.config.moe_router_dtype == "fp32" else input.dtype
            return router_gating_linear(input, self.weight, self.bias, router_dtype)

    return CPUTopKRouter


def _megatron_te_gemm_name(notes):
    """megatron-core 0.16.1 without TransformerEngine: moe_utils imports `te_general_gemm` only with TE, but
    RouterGatingLinearFunction tests `te_general_gemm is not None` unconditionally (NameError in every
    TopKRouter forward, GPU too). Define it as None, the value that selects Megatron's own torch.mm path;
    returns an undo function. Same router code for both paths."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "HAVE_TE", True) or hasattr(moe_utils, "te_general_gemm"):
        return lambda: None
    moe_utils.te_general_gemm = None
    notes.append("megatron-core without TransformerEngine: moe_utils.te_general_gemm is undefined (NameError in "
                 "TopKRouter.gating); set to None, which selects Megatron's torch.mm router GEMM (both paths)")
    return lambda: delattr(moe_utils, "te_general_gemm")


def _megatron_layer(args, world, dispatcher, device):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cpu = device.type == "cpu"
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    submodules = spec.submodules.mlp.submodules
    if cpu:
        submodules.router = _cpu_router_class()
    return MoELayer(_megatron_config(args, world, dispatcher, cpu), submodules).to(device)


def _alltoall_runs_on(device):
    return device.type == "cuda"


def _megatron_reference(layer, x, dout, world):
    """Plain PyTorch routed SwiGLU experts in fp32 from all ranks' expert weights (Megatron's SequentialMLP
    layout: fc1 [2F, H] = gate rows then up rows, fc2 [H, F]) behind the layer's own router:
    (out [S, B, H], dx) with dx through the experts and the routing probabilities."""
    local = [(e.linear_fc1.weight.detach(), e.linear_fc2.weight.detach()) for e in layer.experts.local_experts]
    fc1 = torch.stack([w1 for w1, _ in local]).contiguous()
    fc2 = torch.stack([w2 for _, w2 in local]).contiguous()
    fc1_all, fc2_all = [torch.empty_like(fc1) for _ in range(world)], [torch.empty_like(fc2) for _ in range(world)]
    dist.all_gather(fc1_all, fc1)
    dist.all_gather(fc2_all, fc2)
    fc1_all, fc2_all = torch.cat(fc1_all).float(), torch.cat(fc2_all).float()
    xg = x.detach().clone().requires_grad_(True)
    probs, routing_map = layer.router(xg)
    xt = xg.reshape(-1, x.shape[-1]).float()
    out = torch.zeros_like(xt)
    for e in range(fc1_all.shape[0]):
        rows = routing_map[:, e].nonzero().squeeze(1)
        if rows.numel():
            gate, up = (xt[rows] @ fc1_all[e].t()).chunk(2, dim=-1)
            out = out.index_add(0, rows, (F.silu(gate) * up) @ fc2_all[e].t() * probs[rows, e:e + 1].float())
    out = out.view(x.shape)
    out.backward(dout.float())
    for p in layer.parameters():
        p.grad = None
    return out.detach(), xg.grad.detach()


def bench_megatron(args, rank, world, device):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    import turbo_dist.integrations.megatron as tdm

    dtype = DTYPES[args.dtype]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world)
    rows, notes = [], []
    undo_te_name = _megatron_te_gemm_name(notes)
    try:
        if device.type == "cuda":
            model_parallel_cuda_manual_seed(123)
        torch.manual_seed(0)
        default = None
        if _alltoall_runs_on(device):
            default = _megatron_layer(args, world, "alltoall", device)
        else:
            notes.append(f"megatron/default skipped: {ALLTOALL_CPU_REASON}")
            notes.append("megatron on CPU: TopKRouter.gating moves its weight to CUDA; the CPU check builds the "
                         "layer with a TopKRouter subclass whose gating skips that move (same computation)")
        # The flex dispatcher checks for its backend when it is built: enable first. The alltoall layer
        # does not use the names enable() rebinds, so both layers run side by side.
        tdm.enable(moe_dispatcher=True, moe_transport=args.transport,
                   moe_num_nvl_bytes=nvl_bytes(args, world) if device.type == "cuda" else None)
        ours = _megatron_layer(args, world, "flex", device)
        if default is not None:
            ours.load_state_dict(default.state_dict())
        x, dout = _tensors(args, device, rank, dtype, "sbh")
        layers = {"default": default, "turbo_dist": ours}
        steps, results = {}, {}
        for label, layer in layers.items():
            if layer is None:
                continue
            forward = (lambda lyr: lambda inp: lyr(inp)[0])(layer)
            params = list(layer.parameters())
            steps[label] = _step_fn(forward, params, x, dout)
            results[label] = _check(forward, params, x, dout)
        buffer = tdm._state["buffer"]  # the Buffer our get_buffer handed Megatron: proof the hook ran
        if buffer is None:
            raise RuntimeError("Megatron's flex dispatcher ran without turbo_dist's Buffer: enable() did not take")
        transport = buffer.transport
        if default is not None:
            ref, checked_vs = results["default"], "default"
        else:
            ref, checked_vs = _megatron_reference(ours, x, dout, world), "reference"
        err_out = rel_err(results["turbo_dist"][0], ref[0])
        err_dx = rel_err(results["turbo_dist"][1], ref[1])
        times = time_interleaved(steps, args, device)
        impl = {"default": "alltoall dispatcher + SequentialMLP",
                "turbo_dist": f"flex/deepep dispatcher on turbo_dist.moe ({transport}) + SequentialMLP"}
        if default is None:
            rows.append(dict(framework="megatron", path="default", impl=impl["default"], ms=None,
                             note=f"skipped: {ALLTOALL_CPU_REASON}"))
        else:
            rows.append(dict(framework="megatron", path="default", impl=impl["default"], ms=times["default"]))
        rows.append(dict(framework="megatron", path="turbo_dist", impl=impl["turbo_dist"], ms=times["turbo_dist"],
                         checked_vs=checked_vs, rel_err_out=err_out, rel_err_dx=err_dx))
    finally:
        tdm.disable()
        undo_te_name()
        parallel_state.destroy_model_parallel()
    return rows, notes


# ---------------------------------------------------------------------------------------------- TorchTitan
def _titan_moe(args, world, overrides, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)

    e, d, f = args.experts, args.hidden, args.ffn
    cfg = make_moe_config(
        num_experts=e, load_balance_coeff=None,
        router=make_router_config(dim=d, num_experts=e, gate_param_init={}, top_k=args.topk, score_func="softmax"),
        routed_experts=make_routed_experts_config(dim=d, hidden_dim=f, num_experts=e, top_k=args.topk,
                                                  param_init={}, comm_backend="standard"))
    # EP shards the experts' weights on dim 0 (as TorchTitan's EP sharding leaves them): local experts only.
    cfg.routed_experts.inner_experts.num_experts = e // world
    if overrides:
        apply_overrides(OverrideConfig(imports=list(overrides)), cfg)
    moe = cfg.build().to(device=device, dtype=DTYPES[args.dtype])
    moe.routed_experts.token_dispatcher.wire_meshes(
        ep_mesh=init_device_mesh(device.type, (world,), mesh_dim_names=("ep",)))
    return moe


def _titan_fill(moe, args, rank, world, device):
    """Seeded weights: router gate, and this rank's slice of every expert tensor (the same full tensors on
    every rank; drawn on the device, the full expert tensors are GiBs at the default sizes)."""
    g = torch.Generator(device=device).manual_seed(3)
    local = args.experts // world
    with torch.no_grad():
        gate = moe.router.gate.weight
        gate.copy_(torch.randn(gate.shape, generator=g, device=device) / args.hidden ** 0.5)
        experts = moe.routed_experts.inner_experts
        for name, fan_in in (("w1_EFD", args.hidden), ("w3_EFD", args.hidden), ("w2_EDF", args.ffn)):
            p = getattr(experts, name)
            full = torch.randn((args.experts,) + tuple(p.shape[1:]), generator=g, device=device) / fan_in ** 0.5
            p.copy_(full[rank * local:(rank + 1) * local])
            del full


def bench_torchtitan(args, rank, world, device):
    from torchtitan.distributed import utils as titan_dist_utils

    from turbo_dist.integrations.torchtitan import OVERRIDES
    from turbo_dist.ops import dispatcher as ops_dispatcher

    # Without the trainer there is no spmd_types mesh context: the DTensor backend makes TorchTitan's
    # all-to-all dispatcher take its process group from the EP mesh (ours always does).
    titan_dist_utils.set_spmd_backend("partial_dtensor")
    options = {"transport": args.transport, "num_nvl_bytes": nvl_bytes(args, world) if device.type == "cuda" else 0}
    ours_overrides = [(OVERRIDES[0], options), *OVERRIDES[1:]]
    default = _titan_moe(args, world, (), device)
    ours = _titan_moe(args, world, ours_overrides, device)
    _titan_fill(default, args, rank, world, device)
    ours.load_state_dict(default.state_dict())  # same parameter names: the overrides subclass the modules
    kinds = tuple(type(m).__name__ for moe in (default, ours)
                  for m in (moe.routed_experts.token_dispatcher, moe.routed_experts.inner_experts))
    if kinds != ("AllToAllTokenDispatcher", "GroupedExperts", "TurboDistTokenDispatcher", "TurboDistGroupedExperts"):
        raise RuntimeError(f"TorchTitan built unexpected modules {kinds}: the overrides did not apply as expected")
    x, dout = _tensors(args, device, rank, DTYPES[args.dtype], "bsh")
    steps, results = {}, {}
    for label, moe in (("default", default), ("turbo_dist", ours)):
        params = list(moe.parameters())
        steps[label] = _step_fn(moe, params, x, dout)
        results[label] = _check(moe, params, x, dout)
    gemm_backend = ops_dispatcher.last_backend("grouped_gemm")  # the turbo_dist step ran last
    err_out = rel_err(results["turbo_dist"][0], results["default"][0])
    err_dx = rel_err(results["turbo_dist"][1], results["default"][1])
    times = time_interleaved(steps, args, device)
    transport = ours.routed_experts.token_dispatcher.buffer.transport
    return [dict(framework="torchtitan", path="default", impl="AllToAllTokenDispatcher + GroupedExperts "
                 "(torch._grouped_mm)", ms=times["default"]),
            dict(framework="torchtitan", path="turbo_dist", impl=f"TurboDistTokenDispatcher ({transport}) + "
                 f"TurboDistGroupedExperts (turbo_dist.ops.grouped_gemm: {gemm_backend})", ms=times["turbo_dist"],
                 checked_vs="default", rel_err_out=err_out, rel_err_dx=err_dx)], []


# ---------------------------------------------------------------------------------------------- driver
def _finish(rows, args, world):
    """Shapes on every row; on turbo_dist rows the check verdict and vs_default."""
    default_ms = {r["framework"]: r["ms"] for r in rows if r["path"] == "default"}
    for r in rows:
        r.update(shapes(args, world))
        if r["path"] == "turbo_dist":
            worst = max(e for e in (r.get("rel_err_out"), r.get("rel_err_dx")) if e is not None)
            r["check"] = "ok" if worst <= args.tol else "FAIL"
            if r["ms"] and default_ms.get(r["framework"]):
                r["vs_default"] = default_ms[r["framework"]] / r["ms"]
    return rows


def run(rank, world, args):
    """Every rank: the benchmarks of the chosen frameworks; returns (rows, notes) (the same on every rank).

    A framework that raises on every rank alike (an import or version mismatch, say) becomes an "error"
    row and the next framework still runs; with torchrun, rank 0 prints each framework's rows (and
    rewrites --json) as soon as they exist, so a later failure or hang loses nothing measured."""
    device = torch.device("cpu") if args.cpu_check else torch.device("cuda", torch.cuda.current_device())
    frameworks = FRAMEWORKS if args.framework == "both" else (args.framework,)
    rows, notes = [], []
    for fw in frameworks:
        try:
            r, n = (bench_megatron if fw == "megatron" else bench_torchtitan)(args, rank, world, device)
        except Exception as exc:  # reported as a row (and exit status 1), never dropped
            print(f"[rank {rank}] {fw} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            r, n = [dict(framework=fw, path="error", ms=None, note=f"{type(exc).__name__}: {exc}"[:500])], []
        rows += _finish(r, args, world)
        notes += n
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if rank == 0 and not args.cpu_check:
            report(rows, notes, args, world, "cuda", final=False)
    return rows, notes


def _cpu_worker(rank, world, args):
    return run(rank, world, args)


def report(rows, notes, args, world, device, final=True):
    """Print the table (and the notes); write --json. Returns the exit status: 1 if a check failed or a
    framework raised."""
    if final and args.cpu_check:
        print(f"CPU check ({world} gloo ranks, tiny sizes): the script's logic only; times mean nothing.")
    if final:
        for n in notes:
            print(n)
    print_table(rows, ["framework", "path", "ms", "vs_default", "checked_vs", "rel_err_out", "rel_err_dx", "check",
                       "impl", "note"])
    if final:
        print(f"shape: {shapes(args, world)}; timing: {args.rounds} interleaved rounds x ({args.warmup} warm-up "
              f"+ {args.iters} timed) steps per path, median per rank, max over ranks")
    if args.json:
        meta = dict(world_size=world, device=device, cpu_check=args.cpu_check, tol=args.tol,
                    transport=args.transport or "Buffer default", warmup=args.warmup, iters=args.iters,
                    rounds=args.rounds, notes=notes, times_meaningful=not args.cpu_check, complete=final,
                    command=command_line(), machine=dict(machine_info(), world_size=world))
        write_json(args.json, rows, meta)
        if final:
            print(f"wrote {args.json}")
    sys.stdout.flush()
    bad = [f"{r['framework']}/{r['path']}" for r in rows if r.get("check") == "FAIL" or r["path"] == "error"]
    if bad and final:
        print(f"FAIL: {', '.join(bad)} (a turbo_dist row off its reference by more than --tol {args.tol}, or an "
              "error)", file=sys.stderr)
    return 1 if bad else 0


def main(argv=None):
    args = parse_args(argv)
    from turbo_dist.runtime import apply_safety_env

    world = args.nproc if args.cpu_check else int(os.environ.get("WORLD_SIZE", 1))
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the number of ranks {world}")
    apply_safety_env()
    if args.cpu_check:
        from turbo_dist.testing import run_distributed

        if "RANK" in os.environ:
            raise SystemExit("--cpu-check spawns its own ranks: run it with python, not torchrun")
        per_rank = run_distributed(_cpu_worker, args.nproc, args=(args,), backend="gloo", env=CPU_ENV,
                                   timeout=600)
        rows, notes = per_rank[0]
        return report(rows, notes, args, args.nproc, "cpu")
    if not torch.cuda.is_available():
        print("bench_integrations needs CUDA GPUs (one per rank, NCCL, launched by torchrun); none found "
              "(--cpu-check runs the logic on CPU).", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:
        print("launch with torchrun (one rank per GPU), e.g. torchrun --standalone --nproc-per-node 4 "
              f"{sys.argv[0]}", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        rows, notes = run(rank, world, args)
        rc = report(rows, notes, args, world, "cuda") if rank == 0 else 0
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
