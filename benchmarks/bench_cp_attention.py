"""Context-parallel attention benchmark: turbo_dist.cp (a2a, ring, allgather) against PyTorch's
context_parallel (torch.distributed.tensor.experimental) and single-GPU attention on the whole
sequence, forward and forward+backward, all in one run.

    torchrun --nproc-per-node 4 benchmarks/bench_cp_attention.py --json cp_h200x4.json
    python benchmarks/bench_cp_attention.py --seqlens 32768 --json cp_h100.json     # world size 1 (sanity)

Defaults: B=1, total sequence 32K/64K/128K, 32 q heads, 8 kv heads, D=128, causal, bf16, the
zigzag (load-balanced) layout. Every rank holds 1/cp of the sequence; the single-GPU baseline runs
the whole sequence on each GPU with the same attention kernel (turbo_dist.ops dispatcher, cuDNN
SDPA by default; --attn-backend forces one, and PyTorch's CP gets the same SDPA backend).
ideal_ms = single_ms / cp; frac_ideal = ideal_ms / ms; vs_torch_cp = the faster PyTorch CP
variant's time / ms. FLOPs (causal: visible pairs only) as in bench_ops_attention: forward
4*B*Hq*D*pairs, forward+backward 3.5x; tflops_gpu = FLOPs / cp / time.
Timing: fixed warm-up and iteration counts on every rank (collectives must match), CUDA events per
iteration, median per rank, max over ranks. Each CP result is checked against the single-GPU
output (o and, for fwd+bwd, dq) of this rank's shard: rel_err_o / rel_err_dq.

--varlen-docs MIN:MAX: the sequence is packed documents (lengths log-uniform in [MIN, MAX], seeded, as
bench_varlen_attention.py) and every implementation is the packed one (`flash_attn_varlen_func`: single
= the whole packed sequence on one GPU; a2a / ring / allgather on contiguous shards with global
cu_seqlens); FLOPs count each document's visible pairs; PyTorch's CP has no packed mode and is skipped.

    torchrun --nproc-per-node 4 benchmarks/bench_cp_attention.py --varlen-docs 512:16384 --json cp_varlen.json
"""
import argparse
import gc
import os
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(1, _ROOT)
from bench_varlen_attention import doc_lengths, visible_pairs  # noqa: E402
from common import machine_info, peak_tflops, print_table, time_across_ranks, write_json  # noqa: E402

OURS = ("a2a", "ring", "allgather")
TORCH_CP = {"torch_cp_allgather": "allgather", "torch_cp_alltoall": "alltoall"}  # torch's rotate methods
PASS_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="32768,65536,131072", help="comma list of total sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--no-load-balance", action="store_true", help="contiguous shards instead of zigzag")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--impls", default="single,a2a,ring,allgather,torch_cp_allgather,torch_cp_alltoall")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--num-chunks", type=int, default=2, help="head groups pipelined by a2a/allgather")
    p.add_argument("--attn-backend", default=None, choices=[None, "cudnn", "flash", "efficient", "triton"],
                   help="force turbo_dist.ops attention backend (default: the dispatcher's choice)")
    p.add_argument("--torch-sdpa-backend", default=None, choices=[None, "cudnn", "flash", "efficient"],
                   help="SDPA backend for PyTorch's CP (default: --attn-backend, else cudnn)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak per GPU (default: the GPU's datasheet peak, common.peak_tflops)")
    p.add_argument("--json", default=None)
    p.add_argument("--varlen-docs", default=None, metavar="MIN:MAX",
                   help="packed documents of MIN..MAX tokens instead of one sequence (see the module docstring)")
    p.add_argument("--cpu-check", action="store_true",
                   help="run the script's logic on CPU/gloo (tiny shapes; times mean nothing): a CI check")
    return p.parse_args(argv)


DEV = "cuda"


def init_dist(cpu=False):
    """torchrun's environment, or a one-rank group of our own (sanity runs without a launcher)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    from turbo_dist.runtime import apply_safety_env

    apply_safety_env()  # before NCCL starts (device_id: eagerly): NVLink multicast stays off under any launcher
    if cpu:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    return dev


def time_ms(fn, warmup, iters):
    """Median ms per call on this rank (CUDA events; perf_counter under --cpu-check), max over ranks."""
    return time_across_ranks(fn, warmup, iters, device=DEV)


def rel_err(a, b):
    """Relative Frobenius error, max over ranks (each rank checks its own shard)."""
    e = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).reshape(1)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return e.item()


def _free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _time_attn(attn, q, k, v, do, passes, args):
    """attn(q, k, v) -> o, timed for the requested passes: ({pass: ms}, o, dq of that o against `do`)."""
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def fwdbwd():
        ql.grad = kl.grad = vl.grad = None
        attn(ql, kl, vl).backward(do)

    res = {p: time_ms(f, args.warmup, args.iters) for p, f in (("fwd", fwd), ("fwd+bwd", fwdbwd)) if p in passes}
    o = fwd()
    if ql.grad is None:
        fwdbwd()
    return res, o, ql.grad


def bench_single(full, causal, passes, args):
    """The whole sequence on this GPU: {pass: ms}, o, dq."""
    from turbo_dist.ops import flash_attn_func

    return _time_attn(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), *full, passes, args)


def bench_ours(mode, local, ref_o, ref_dq, causal, lb, passes, args):
    from turbo_dist import cp
    from turbo_dist.ops import dispatcher

    q, k, v, do = local
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, cp_group=None, cp_comm_type=mode, load_balance=lb, num_chunks=args.num_chunks)

    def fwd():
        with torch.no_grad():
            return cp.context_parallel_attention(q, k, v, **kw)

    def fwdbwd():
        ql.grad = kl.grad = vl.grad = None
        cp.context_parallel_attention(ql, kl, vl, **kw).backward(do)

    rows = {}
    o = fwd()
    err_o = rel_err(o, ref_o)
    backends = f"{dispatcher.last_backend('attention_fwd')}"
    del o
    if "fwd" in passes:
        rows["fwd"] = dict(ms=time_ms(fwd, args.warmup, args.iters), rel_err_o=err_o, backend=backends)
    if "fwd+bwd" in passes:
        fwdbwd()
        err_dq = rel_err(ql.grad, ref_dq)
        backends += f"/{dispatcher.last_backend('attention_bwd')}"
        rows["fwd+bwd"] = dict(ms=time_ms(fwdbwd, args.warmup, args.iters), rel_err_o=err_o, rel_err_dq=err_dq,
                               backend=backends)
    del ql, kl, vl
    return rows


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def torch_cp_available():
    """(True, None) or (False, why)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
        from torch.distributed.tensor.experimental._attention import set_rotate_method  # noqa: F401
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except Exception as exc:  # any import-time failure means: not available in this torch
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def bench_torch_cp(rotate, full, ref_o_local, ref_dq_local, causal, lb, passes, args, mesh):
    """PyTorch's context_parallel on [B, H, S, D] buffers it shards itself (head-tail = our zigzag).

    GQA: first with enable_gqa=True; if the SDPA backend rejects that, with kv repeated per q head
    (noted in the row)."""
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    from torch.nn.attention import sdpa_kernel

    set_rotate_method(rotate)
    _cp_options.enable_load_balance = lb
    backend = _sdpa_backend(args.torch_sdpa_backend or args.attn_backend or "cudnn")
    q, k, v, do = full
    hq, hkv = q.shape[2], k.shape[2]
    last_exc = None
    for gqa in ([True, False] if hq != hkv else [False]):
        kk, vv = (k, v) if gqa or hq == hkv else (t.repeat_interleave(hq // hkv, dim=2) for t in (k, v))
        bufs = [t.transpose(1, 2).contiguous() for t in (q, kk, vv, do)]  # [B, H, S, D]
        try:
            with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(bufs)):
                qt, kt, vt, dot = bufs  # now this rank's shards
                ql, kl, vl = (t.detach().clone().requires_grad_() for t in (qt, kt, vt))
                extra = {"enable_gqa": True} if gqa else {}

                def fwd():
                    with torch.no_grad(), sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **extra)

                def fwdbwd():
                    ql.grad = kl.grad = vl.grad = None
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(ql, kl, vl, is_causal=causal, **extra).backward(dot)

                note = f"sdpa={backend.name} " + ("enable_gqa" if gqa else "kv repeated to Hq heads")
                rows = {}
                err_o = rel_err(fwd().transpose(1, 2), ref_o_local)
                if "fwd" in passes:
                    rows["fwd"] = dict(ms=time_ms(fwd, args.warmup, args.iters), rel_err_o=err_o, note=note)
                if "fwd+bwd" in passes:
                    fwdbwd()
                    err_dq = rel_err(ql.grad.transpose(1, 2), ref_dq_local)
                    rows["fwd+bwd"] = dict(ms=time_ms(fwdbwd, args.warmup, args.iters), rel_err_o=err_o,
                                           rel_err_dq=err_dq, note=note)
                del ql, kl, vl
                return rows
        except Exception as exc:  # try the next GQA variant, then report
            last_exc = exc
            if dist.get_rank() == 0:
                print(f"torch CP ({rotate}, enable_gqa={gqa}) failed: {type(exc).__name__}: {exc}"[:500], flush=True)
            _free()
    raise RuntimeError(f"PyTorch context_parallel failed: {type(last_exc).__name__}: {last_exc}"[:500])


def run_seqlen(s, args, mesh, torch_cp_ok, torch_cp_why):
    from turbo_dist import cp

    rank, world = dist.get_rank(), dist.get_world_size()
    causal, lb = not args.no_causal, not args.no_load_balance
    impls = [x for x in args.impls.split(",") if x]
    passes = [x for x in args.passes.split(",") if x]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    b, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=DEV).manual_seed(1234 + s)  # the same full tensors on every rank
    full = [torch.randn(b, s, h, d, device=DEV, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq)]
    shape = dict(B=b, S=s, Hq=hq, Hkv=hkv, D=d, cp=world, causal=causal, load_balance=lb)
    flops = 4.0 * b * hq * d * visible_pairs([s], causal)

    single, o_ref, dq_ref = bench_single(full, causal, passes, args)
    o_ref_local, dq_ref_local = (cp.shard(t, None, 1, lb) for t in (o_ref, dq_ref))
    del o_ref, dq_ref
    _free()
    results = {("single", p): dict(ms=single[p]) for p in single}
    local = [cp.shard(t, None, 1, lb).contiguous() for t in full]
    for impl in impls:
        if impl in OURS:
            try:
                for p, r in bench_ours(impl, local, o_ref_local, dq_ref_local, causal, lb, passes, args).items():
                    results[(impl, p)] = r
            except (ValueError, NotImplementedError) as exc:  # e.g. heads not divisible for a2a
                results[(impl, "-")] = dict(note=f"{type(exc).__name__}: {exc}"[:300])
        elif impl in TORCH_CP:
            if not torch_cp_ok:
                results[(impl, "-")] = dict(note=f"unavailable: {torch_cp_why}")
                continue
            try:
                rows = bench_torch_cp(TORCH_CP[impl], full, o_ref_local, dq_ref_local, causal, lb, passes, args,
                                      mesh)
                for p, r in rows.items():
                    results[(impl, p)] = r
            except Exception as exc:
                results[(impl, "-")] = dict(note=str(exc)[:300])
        elif impl != "single":
            raise SystemExit(f"unknown impl {impl!r}; choose from single, {', '.join(OURS)}, {', '.join(TORCH_CP)}")
        _free()
    del full, local
    _free()

    rows = []
    for (impl, p), r in results.items():
        row = dict(impl=impl, **{"pass": p}, **shape, **r)
        if "ms" in r:
            f = flops * PASS_FLOPS[p] / world
            row["tflops_gpu"] = f / r["ms"] / 1e9
            row["frac_peak"] = (row["tflops_gpu"] / args.peak_tflops) if args.peak_tflops else None
            if impl != "single" and ("single", p) in results:
                row["ideal_ms"] = results[("single", p)]["ms"] / world
                row["frac_ideal"] = row["ideal_ms"] / r["ms"]
            torch_ms = [results[(t, p)]["ms"] for t in TORCH_CP if "ms" in results.get((t, p), {})]
            if impl in OURS and torch_ms:
                row["vs_torch_cp"] = min(torch_ms) / r["ms"]
        rows.append(row)
    if rank == 0:
        print_table(rows, ["impl", "pass", "S", "cp", "ms", "ideal_ms", "frac_ideal", "vs_torch_cp", "tflops_gpu",
                           "frac_peak", "rel_err_o", "rel_err_dq", "backend", "note"])
    return rows


def run_seqlen_varlen(s, args):
    """--varlen-docs: packed documents, single GPU vs our three CP modes on contiguous shards."""
    from turbo_dist import cp
    from turbo_dist.ops import dispatcher, flash_attn_varlen_func

    rank, world = dist.get_rank(), dist.get_world_size()
    causal = not args.no_causal
    passes = [x for x in args.passes.split(",") if x]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    lo, hi = (int(x) for x in args.varlen_docs.split(":"))
    lens = doc_lengths(s, lo, hi, seed=s)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    mx = max(lens)
    g = torch.Generator(device=DEV).manual_seed(4321 + s)
    full = [torch.randn(s, h, d, device=DEV, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq)]
    shape = dict(B=1, S=s, docs=len(lens), max_doc=mx, Hq=hq, Hkv=hkv, D=d, cp=world, causal=causal,
                 load_balance=False)
    flops = 4.0 * hq * d * visible_pairs(lens, causal)

    single, o_ref, dq_ref = _time_attn(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx,
                                                                              causal=causal), *full, passes, args)
    results = {("single", p): dict(ms=ms) for p, ms in single.items()}
    o_ref_l, dq_ref_l = (cp.shard(t, None, 0, load_balance=False) for t in (o_ref, dq_ref))
    local = [cp.shard(t, None, 0, load_balance=False).contiguous() for t in full]
    for impl in [x for x in args.impls.split(",") if x in OURS]:
        bundle = {"cp_group": None, "cp_comm_type": impl, "num_chunks": args.num_chunks}
        res, o, dq = _time_attn(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=causal,
                                                                       cp_param_bundle=bundle), *local, passes, args)
        err_o, err_dq = rel_err(o, o_ref_l), rel_err(dq, dq_ref_l)
        for p, ms in res.items():
            results[(impl, p)] = dict(ms=ms, rel_err_o=err_o, rel_err_dq=err_dq if p == "fwd+bwd" else None,
                                      backend=dispatcher.last_backend("attention_varlen_fwd"))
        _free()
    rows = []
    for (impl, p), r in results.items():
        row = dict(impl=impl, **{"pass": p}, **shape, **r)
        f = flops * PASS_FLOPS[p] / world
        row["tflops_gpu"] = f / r["ms"] / 1e9
        row["frac_peak"] = (row["tflops_gpu"] / args.peak_tflops) if args.peak_tflops else None
        if impl != "single":
            row["ideal_ms"] = results[("single", p)]["ms"] / world
            row["frac_ideal"] = row["ideal_ms"] / r["ms"]
        rows.append(row)
    if rank == 0:
        print_table(rows, ["impl", "pass", "S", "docs", "cp", "ms", "ideal_ms", "frac_ideal", "tflops_gpu",
                           "frac_peak", "rel_err_o", "rel_err_dq", "backend"])
    return rows


def main(argv=None):
    global DEV
    args = parse_args(argv)
    if args.cpu_check:
        DEV = "cpu"
        args.dtype = "fp32"
    elif not torch.cuda.is_available():
        print("bench_cp_attention needs CUDA GPUs (one per rank, NCCL); none found: nothing to measure "
              "(--cpu-check runs the logic on CPU).", file=sys.stderr)
        return 2
    dev = init_dist(cpu=args.cpu_check)
    if args.peak_tflops is None and not args.cpu_check:
        args.peak_tflops = peak_tflops("bf16")
    from turbo_dist.ops import dispatcher

    if args.attn_backend:
        for op in ("attention_fwd", "attention_bwd"):
            dispatcher.set_backend(op, args.attn_backend)
    world = dist.get_world_size()
    torch_cp_ok, torch_cp_why = torch_cp_available()
    mesh = None
    if torch_cp_ok:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(DEV, (world,))
    elif dist.get_rank() == 0:
        print(f"PyTorch context_parallel unavailable: {torch_cp_why}", flush=True)
    rows = []
    for s in [int(x) for x in args.seqlens.split(",") if x]:
        if s % (2 * world):
            raise SystemExit(f"sequence length {s} must be divisible by 2*cp = {2 * world}")
        rows += run_seqlen_varlen(s, args) if args.varlen_docs else run_seqlen(s, args, mesh, torch_cp_ok,
                                                                                torch_cp_why)
    if dist.get_rank() == 0 and args.json:
        meta = dict(world_size=world, device=str(dev), peak_tflops=args.peak_tflops, torch_cp_available=torch_cp_ok,
                    torch_cp_unavailable_reason=torch_cp_why, attn_backend=args.attn_backend or "dispatcher default",
                    torch_sdpa_backend=args.torch_sdpa_backend or args.attn_backend or "cudnn",
                    warmup=args.warmup, iters=args.iters, machine=dict(machine_info(), world_size=world))
        write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
