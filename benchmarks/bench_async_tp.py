"""Async TP benchmark: fused all-gather + GEMM and GEMM + reduce-scatter, ours vs the baselines, one run.

    torchrun --nproc_per_node 4 benchmarks/bench_async_tp.py --json benchmarks/results/tp_h200x4.json
    torchrun --nproc_per_node 1 benchmarks/bench_async_tp.py --tp 4 --quick      # one-GPU sanity run

Shapes (per rank, TP degree `--tp`, default the world size): for each model and token count,
  ag_gemm  (MLP up/gate projection): A shard [tokens/W, hidden] gathered, times B [hidden, 2*ffn/tp]
  gemm_rs  (MLP down projection):    A [tokens, ffn/tp] times B [ffn/tp, hidden], reduce-scattered
  col_layer (the up projection as a layer, forward + backward): tp.ColumnParallelLinear (SP) vs Megatron's
           schedule on NCCL (forward all-gather + GEMM; backward: the input's all-gather async under the dgrad
           GEMM, then dx's reduce-scatter async under the wgrad GEMM); both keep the input shard's worth of
           activation (`saved_mb`: what autograd holds for ours, the shard for Megatron's), three GEMMs of FLOPs
Models: llama3-70b (hidden 8192, ffn 28672; tokens 8192, 16384), deepseek-v3 dense MLP (7168, 18432),
qwen2.5-72b (8192, 29568), qwen3-32b (5120, 25600). B is a weight's transpose (nn.Linear layout).

Implementations, all timed in the same run: `sequential` (NCCL all_gather_into_tensor then cuBLAS,
or cuBLAS then reduce_scatter_tensor), `torch_fused` (torch.ops.symm_mem.fused_all_gather_matmul /
fused_matmul_reduce_scatter), `ours_<algo>` (turbo_dist.tp with algo ring / direct / collective /
auto), and the ideal max(gemm alone, comm alone). Each row gives the median time (the slowest rank's),
TFLOP/s, the fraction of the hardware peak (--peak-tflops), and ratios: x_seq = sequential / this,
x_torch = torch_fused / this, vs_ideal = this / ideal (1.0 = communication fully hidden); `algo`: what an
ours_<algo> row ran (tp.last_algo(): ours_auto's choice). Every rank runs the same fixed number of iterations
(agreed over the group), so collectives never mismatch; implementations are timed one after another in a fixed
order (not interleaved). What did not run is in the JSON's meta: `fallbacks` (algos dropped without peer access,
no torch fused op) and `errors` (an implementation that raised). Without CUDA it prints a message and exits.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
from common import peak_tflops, print_table, write_json  # noqa: E402

try:
    import turbo_dist  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(_HERE))

MODELS = {
    "llama3-70b": dict(hidden=8192, ffn=28672, tokens=(8192, 16384)),
    "deepseek-v3": dict(hidden=7168, ffn=18432, tokens=(8192,)),
    "qwen2.5-72b": dict(hidden=8192, ffn=29568, tokens=(8192,)),
    "qwen3-32b": dict(hidden=5120, ffn=25600, tokens=(8192,)),
}


DEVICE = None  # set by main(): this rank's GPU, or the CPU with --cpu


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--tokens", default=None, help="comma list overriding every model's token counts")
    p.add_argument("--tp", type=int, default=None, help="TP degree the weights are sharded for (default: world size)")
    p.add_argument("--ops", default="ag_gemm,gemm_rs,col_layer")
    p.add_argument("--algos", default="ring,direct,collective,auto")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--fp8", action="store_true", help="also time the FP8 (row-wise scaled) variants")
    p.add_argument("--rep-ms", type=float, default=200.0, help="timed budget per measurement")
    p.add_argument("--quick", action="store_true", help="llama3-70b only, shorter timing (smoke test)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak for the fraction column (default: the GPU's datasheet peak, common.peak_tflops)")
    p.add_argument("--hidden", type=int, default=None, help="with --ffn: one custom shape (model 'custom')")
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--cpu", action="store_true",
                   help="logic check on CPU with gloo (use tiny --hidden/--ffn/--tokens; times mean nothing)")
    p.add_argument("--json", default=None, help="write rows (with command and machine) to this path")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- timing
class _HostEvent:
    """Stands in for torch.cuda.Event in --cpu mode."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _event():
    return torch.cuda.Event(enable_timing=True) if DEVICE.type == "cuda" else _HostEvent()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, rep_ms):
    """Median ms of fn() over a fixed iteration count agreed by all ranks; the slowest rank's median."""
    for _ in range(3):
        fn()
    _sync()
    dist.barrier()
    s, e = _event(), _event()
    s.record()
    for _ in range(3):
        fn()
    e.record()
    _sync()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    n = torch.tensor([max(5, min(100, int(rep_ms / est)))], device=DEVICE)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n.item())
    dist.barrier()
    evs = [(_event(), _event()) for _ in range(n)]
    for s, e in evs:
        s.record()
        fn()
        e.record()
    _sync()
    med = torch.tensor([statistics.median(s.elapsed_time(e) for s, e in evs)], device=DEVICE)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def _flat_all(x):
    """A result, or a tuple of results (y, dx, dW of a layer), as one flat tensor (outside the timed call)."""
    return torch.cat([t.flatten() for t in x]) if isinstance(x, (tuple, list)) else x


def rel_err(out, ref):
    out, ref = _flat_all(out), _flat_all(ref)
    return float(((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item())


# ------------------------------------------------------------------------------------------ problems
def torch_fused_available():
    try:  # registers the torch.ops.symm_mem ops
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    ops = getattr(torch.ops, "symm_mem", None)
    return ops is not None and hasattr(ops, "fused_all_gather_matmul")


def group_name():
    name = dist.group.WORLD.group_name
    try:
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(name)
    except ImportError:
        pass
    return name


def make_problem(op, tokens, hidden, ffn, tp_deg, world, rank, dtype, fp8, algos):
    """Inputs of this rank (random, not zero) and the callables of every implementation."""
    from turbo_dist import tp

    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    if tokens % world:
        raise ValueError(f"tokens={tokens} is not divisible by the world size {world}")

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).mul_(0.5).to(dtype)

    if op == "col_layer":
        if fp8:
            raise NotImplementedError("col_layer has no FP8 variant (the bf16 layer only)")
        return _column_layer(tp, tokens, hidden, 2 * ffn // tp_deg, world, randn, algos)
    if op == "ag_gemm":
        n_out = 2 * ffn // tp_deg
        m, k, n = tokens, hidden, n_out
        a = randn(tokens // world, hidden)
        b = randn(n_out, hidden).t()  # weight.t(): column-major, as nn.Linear stores it
        a_full = torch.empty(tokens, hidden, device=dev, dtype=dtype)
        comm_out = a_full
    else:
        k_in = ffn // tp_deg
        m, k, n = tokens, k_in, hidden
        a = randn(tokens, k_in)
        b = randn(hidden, k_in).t()
        c = torch.empty(tokens, hidden, device=dev, dtype=dtype)
        comm_out = torch.empty(tokens // world, hidden, device=dev, dtype=dtype)
    flops = 2.0 * m * n * k
    if fp8:
        from turbo_dist.ops import ScalingGranularity, quantize_fp8, scaled_mm

        a_q, a_s = quantize_fp8(a.float(), granularity=ScalingGranularity.ROWWISE)
        b_q_t, b_s = quantize_fp8(b.t().float(), granularity=ScalingGranularity.ROWWISE)  # [N, K] rows
        b_q, b_s = b_q_t.t(), b_s.reshape(1, -1)

        def gemm_alone(x=None):
            x_q, x_s = (a_q, a_s) if x is None else x
            return scaled_mm(x_q, b_q, x_s, b_s, out_dtype=torch.bfloat16)
    impls = {}
    if op == "ag_gemm":
        if fp8:
            a_q_full = torch.empty(tokens, hidden, device=dev, dtype=torch.uint8)
            s_full = torch.empty(tokens, 1, device=dev, dtype=torch.float32)

            def comm():
                dist.all_gather_into_tensor(a_q_full, a_q.view(torch.uint8))
                dist.all_gather_into_tensor(s_full, a_s)

            def sequential():
                comm()
                return scaled_mm(a_q_full.view(a_q.dtype), b_q, s_full, b_s, out_dtype=torch.bfloat16)

            impls["sequential"] = sequential
            impls["gemm_alone"] = lambda: gemm_alone((a_q_full.view(a_q.dtype), s_full))
            impls["comm_alone"] = comm
            for algo in algos:
                impls[f"ours_{algo}"] = (lambda al: lambda: tp.all_gather_scaled_matmul(
                    a_q, [b_q], a_s, [b_s], gather_dim=0, out_dtype=torch.bfloat16, algo=al)[1][0])(algo)
        else:
            def comm():
                dist.all_gather_into_tensor(a_full, a)

            def sequential():
                comm()
                return torch.mm(a_full, b)

            impls["sequential"] = sequential
            impls["gemm_alone"] = lambda: torch.mm(a_full, b)
            impls["comm_alone"] = comm
            if dev.type == "cuda" and torch_fused_available():
                name = group_name()
                impls["torch_fused"] = lambda: torch.ops.symm_mem.fused_all_gather_matmul(a, [b], 0, name)[1][0]
            for algo in algos:
                impls[f"ours_{algo}"] = (lambda al: lambda: tp.all_gather_matmul(a, [b], gather_dim=0, algo=al)[1][0])(
                    algo)
    else:
        if fp8:
            part = randn(tokens, hidden).to(torch.bfloat16)
            part_out = torch.empty(tokens // world, hidden, device=dev, dtype=torch.bfloat16)

            def comm():
                dist.reduce_scatter_tensor(part_out, part)

            def sequential():
                out = torch.empty(tokens // world, hidden, device=dev, dtype=torch.bfloat16)
                dist.reduce_scatter_tensor(out, gemm_alone())
                return out

            impls["sequential"] = sequential
            impls["gemm_alone"] = gemm_alone
            impls["comm_alone"] = comm
            for algo in algos:
                impls[f"ours_{algo}"] = (lambda al: lambda: tp.scaled_matmul_reduce_scatter(
                    a_q, b_q, a_s, b_s, scatter_dim=0, out_dtype=torch.bfloat16, algo=al))(algo)
        else:
            def comm():
                dist.reduce_scatter_tensor(comm_out, c)

            def sequential():
                out = torch.empty(tokens // world, hidden, device=dev, dtype=dtype)
                dist.reduce_scatter_tensor(out, torch.mm(a, b))
                return out

            impls["sequential"] = sequential
            impls["gemm_alone"] = lambda: torch.mm(a, b, out=c)
            impls["comm_alone"] = comm
            if dev.type == "cuda" and torch_fused_available():
                name = group_name()
                impls["torch_fused"] = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, name)
            for algo in algos:
                impls[f"ours_{algo}"] = (lambda al: lambda: tp.matmul_reduce_scatter(a, b, scatter_dim=0, algo=al))(
                    algo)
    return impls, flops, (m, n, k), {}


def _column_layer(tp, tokens, hidden, n_out, world, randn, algos):
    """Forward + backward of the SP column layer [tokens/W, hidden] -> [tokens, n_out]: impls, flops, (m, n, k),
    saved activation MB per impl."""
    from turbo_dist.testing import saved_activations

    dev = DEVICE
    x, w, dy = randn(tokens // world, hidden), randn(n_out, hidden), randn(tokens, n_out)
    dtype = x.dtype
    x_full, x_full2 = (torch.empty(tokens, hidden, device=dev, dtype=dtype) for _ in range(2))
    dx, dx_full = torch.empty_like(x), torch.empty(tokens, hidden, device=dev, dtype=dtype)

    def sequential():  # Megatron's LinearWithGradAccumulationAndAsyncCommunication schedule, sequence parallel
        dist.all_gather_into_tensor(x_full, x)
        y = torch.mm(x_full, w.t())
        work = dist.all_gather_into_tensor(x_full2, x, async_op=True)  # the input again, under the dgrad GEMM
        torch.mm(dy, w, out=dx_full)
        work.wait()
        work = dist.reduce_scatter_tensor(dx, dx_full, async_op=True)  # dx, under the wgrad GEMM
        dw = torch.mm(dy.t(), x_full2)
        work.wait()
        return y, dx, dw

    def gemm_alone():
        torch.mm(x_full, w.t())
        torch.mm(dy, w, out=dx_full)
        return torch.mm(dy.t(), x_full2)

    def comm_alone():
        dist.all_gather_into_tensor(x_full, x)
        dist.all_gather_into_tensor(x_full2, x)
        dist.reduce_scatter_tensor(dx, dx_full)

    impls = {"sequential": sequential, "gemm_alone": gemm_alone, "comm_alone": comm_alone}
    saved = {"sequential": x.numel() * x.element_size() / 2 ** 20}
    for algo in algos:
        layer = tp.ColumnParallelLinear(hidden, n_out * world, bias=False, algo=algo, device=dev, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        x_in = x.detach().clone().requires_grad_(True)

        def ours(layer=layer, x_in=x_in):
            layer.weight.grad = x_in.grad = None
            y = layer(x_in)
            y.backward(dy)
            return y.detach(), x_in.grad, layer.weight.grad

        impls[f"ours_{algo}"] = ours
        saved[f"ours_{algo}"] = saved_activations(lambda: layer(x_in), layer.parameters())[2] / 2 ** 20
    return impls, 3 * 2.0 * tokens * n_out * hidden, (tokens, n_out, hidden), saved


def main(argv=None):
    args = parse_args(argv)
    global DEVICE
    if not torch.cuda.is_available() and not args.cpu:
        print("bench_async_tp: needs CUDA GPUs (one per rank, launched with torchrun); none found, nothing to do "
              "(--cpu runs a logic check on gloo).")
        return 0
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python bench_async_tp.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        from turbo_dist.runtime import apply_safety_env

        apply_safety_env()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.cpu:
            dist.init_process_group("gloo")
        else:
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    DEVICE = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    import turbo_dist
    from turbo_dist import tp

    rank, world = dist.get_rank(), dist.get_world_size()
    tp_deg = args.tp or world
    algos = tuple(a for a in args.algos.split(",") if a)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    models = ["llama3-70b"] if args.quick else [m for m in args.models.split(",") if m]
    if args.hidden or args.ffn:
        if not (args.hidden and args.ffn):
            raise SystemExit("--hidden and --ffn go together")
        MODELS["custom"] = dict(hidden=args.hidden, ffn=args.ffn, tokens=(8192,))
        models = ["custom"]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {sorted(MODELS)}")
    rep_ms = 60.0 if args.quick else args.rep_ms
    rt = turbo_dist.get_runtime()
    fallbacks, errors = [], []  # into the JSON's meta: what the rows do not show
    if not (rt.has_peer_access and DEVICE.type == "cuda"):
        skipped = [a for a in algos if a in ("ring", "direct")]
        algos = tuple(a for a in algos if a not in ("ring", "direct"))
        if skipped:
            fallbacks.append(f"no peer access (shmem backend {rt.shmem_backend!r}): algos {skipped} not run")
            if rank == 0:
                print(f"no peer access (shmem backend {rt.shmem_backend!r}): skipping algos {skipped}")
    if DEVICE.type == "cuda" and not torch_fused_available():
        fallbacks.append("torch.ops.symm_mem fused ops not in this torch: no torch_fused rows")
    if rank == 0:
        print(f"async TP bench: world {world}, weights sharded for TP={tp_deg}, shmem backend {rt.shmem_backend}, "
              f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'}, torch fused ops: "
              f"{torch_fused_available()}", flush=True)
    rows, peaks = [], {}
    for precision in (["bf16", "fp8"] if args.fp8 else ["bf16"]):
        fp8 = precision == "fp8"
        peak = args.peak_tflops or (peak_tflops("fp8" if fp8 else "bf16") if DEVICE.type == "cuda" else None)
        peaks[precision] = peak
        for model in models:
            cfg = MODELS[model]
            token_list = [int(t) for t in args.tokens.split(",")] if args.tokens else cfg["tokens"]
            for tokens in token_list:
                for op in args.ops.split(","):
                    if fp8 and op == "col_layer":
                        continue  # bf16 only (the FP8 fused ops are timed by ag_gemm / gemm_rs)
                    impls, flops, (m, n, k), saved = make_problem(op, tokens, cfg["hidden"], cfg["ffn"], tp_deg,
                                                                  world, rank, dtype, fp8, algos)
                    times, errs, ran = {}, {}, {}
                    ref = impls["sequential"]()
                    for name, fn in impls.items():
                        try:
                            times[name] = timed(fn, rep_ms)
                            if name.startswith("ours") or name == "torch_fused":
                                errs[name] = rel_err(fn(), ref)
                            if name.startswith("ours"):
                                ran[name] = tp.last_algo()  # ours_auto: the algo it picked
                        except Exception as exc:  # report and go on with the other implementations
                            errors.append(f"{precision} {model} {op} {tokens}: {name}: {repr(exc)[:300]}")
                            if rank == 0:
                                print(f"  {model} {op} {tokens}: {name} failed: {repr(exc)[:300]}", flush=True)
                    tp.check_errors()
                    ideal = max(times.get("gemm_alone", 0.0), times.get("comm_alone", 0.0))
                    seq, fused = times.get("sequential"), times.get("torch_fused")
                    ours = {k_: v for k_, v in times.items() if k_.startswith("ours")}
                    best = min(ours, key=ours.get) if ours else None
                    for name, ms in times.items():
                        row = dict(precision=precision, model=model, op=op, tokens=tokens, M=m, N=n, K=k, impl=name,
                                   ms=ms, tflops=flops / ms / 1e9, frac_peak=(flops / ms / 1e9 / peak) if peak else None,
                                   x_seq=(seq / ms) if seq else None, x_torch=(fused / ms) if fused else None,
                                   vs_ideal=ms / ideal if ideal else None, rel_err=errs.get(name),
                                   algo=ran.get(name), best_ours=(name == best) or None,
                                   saved_mb=saved.get(name))
                        rows.append(row)
                    del impls
                    if DEVICE.type == "cuda":
                        torch.cuda.empty_cache()
                    if rank == 0:
                        print_table([r for r in rows if r["model"] == model and r["op"] == op and r["tokens"] == tokens
                                     and r["precision"] == precision],
                                    ["precision", "model", "op", "tokens", "M", "N", "K", "impl", "ms", "tflops",
                                     "frac_peak", "x_seq", "x_torch", "vs_ideal", "rel_err", "algo"]
                                    + (["saved_mb"] if saved else []))
                        print(flush=True)
    if rank == 0:
        summary = [r for r in rows if r["best_ours"]]
        print("best of ours per problem:")
        print_table(summary, ["precision", "model", "op", "tokens", "impl", "ms", "x_seq", "x_torch", "vs_ideal"])
        if args.json:
            write_json(args.json, rows, meta=dict(world_size=world, tp=tp_deg, dtype=args.dtype,
                                                  shmem_backend=rt.shmem_backend, peak_tflops=peaks,
                                                  peak_tflops_from="--peak-tflops" if args.peak_tflops else
                                                  "common.peak_tflops (datasheet)", fallbacks=fallbacks,
                                                  errors=errors, algos=list(algos),
                                                  timing_order="one implementation after another, fixed order "
                                                               "(sequential first), not interleaved",
                                                  note="ms = the slowest rank's median; ideal = max(gemm_alone, "
                                                       "comm_alone); errors: rank 0's"))
            print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
