"""Packed variable-length attention (documents packed into one sequence, cu_seqlens), forward and
forward+backward, beside the same-run baselines:
  - ours: `turbo_dist.ops.flash_attn_varlen_func` (dispatcher default: our Triton varlen kernel on CUDA);
  - torch_varlen: `torch.nn.attention.varlen.varlen_attn` (PyTorch's flash varlen), where this torch has it;
  - per_doc_loop: `turbo_dist.ops.attention` (dispatcher default, cuDNN on H100/H200) once per document;
  - dense_packed: causal attention over the whole packed length as if it were one document (more work,
    wrong masking: the cost a framework pays when it ignores document boundaries).

    python benchmarks/bench_varlen_attention.py --json varlen.json        # 16K tokens, H=32/8, D=128, causal, bf16
    TRITON_INTERPRET=1 python benchmarks/bench_varlen_attention.py --dry-run   # CPU: checks the script only

Document lengths are drawn log-uniformly in [--min-doc, --max-doc] (seeded) and the last one is cut to
fill --tokens. FLOPs count the visible (query, key) pairs of each document (causal: L*(L+1)/2), forward
4*pairs*H*D, forward+backward 3.5x that; `frac_peak` is against the GPU's datasheet bf16 peak.
Every implementation is checked against the fp32 per-document reference on one kv-head group first; one that
fails the check or raises while timed has no rows and is listed in the JSON's meta["errors"], one this torch
lacks in meta["fallbacks"]. Each row's `backend` is what the dispatcher ran (fwd, or fwd/bwd).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_interleaved, peak_tflops, print_table, write_json  # noqa: E402


def doc_lengths(tokens, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < tokens:
        n = int(math.exp(math.log(lo) + torch.rand(1, generator=g).item() * (math.log(hi) - math.log(lo))))
        n = min(max(n, 1), tokens - total)
        lens.append(n)
        total += n
    return lens


def visible_pairs(lens, causal):
    """(query, key) pairs the documents `lens` attend: L*(L+1)/2 each when causal, L*L otherwise."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lens)


def _impls(q, k, v, do, cu, lens, causal, dry, fallbacks=None):
    from turbo_dist import ops

    mx = max(lens)
    hq, hkv = q.shape[1], k.shape[1]
    fns = {}

    def ours_fwd():
        with torch.no_grad():
            return ops.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=causal)

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def ours_fwdbwd():
        qg.grad = kg.grad = vg.grad = None
        ops.flash_attn_varlen_func(qg, kg, vg, cu, cu, mx, mx, causal=causal).backward(do)

    fns["ours"] = (ours_fwd, ours_fwdbwd)
    starts = [0] + torch.tensor(lens).cumsum(0).tolist()

    def loop_fwd():
        with torch.no_grad():
            return torch.cat([ops.attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal)[0]
                              for a, b in zip(starts, starts[1:])])

    def loop_fwdbwd():
        qg.grad = kg.grad = vg.grad = None
        torch.cat([ops.attention(qg[None, a:b], kg[None, a:b], vg[None, a:b], causal=causal)[0]
                   for a, b in zip(starts, starts[1:])]).backward(do)

    fns["per_doc_loop"] = (loop_fwd, loop_fwdbwd)
    if not dry:
        def dense_fwd():
            with torch.no_grad():
                return ops.attention(q[None], k[None], v[None], causal=causal)[0]

        def dense_fwdbwd():
            qg.grad = kg.grad = vg.grad = None
            ops.attention(qg[None], kg[None], vg[None], causal=causal)[0].backward(do)

        fns["dense_packed"] = (dense_fwd, dense_fwdbwd)
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
            if fallbacks is not None:
                fallbacks.append(f"torch {torch.__version__} has no torch.nn.attention.varlen: no torch_varlen rows")
        if varlen_attn is not None:
            window = (-1, 0) if causal else (-1, -1)
            kw = {"enable_gqa": True} if hq != hkv else {}

            def tv_fwd():
                with torch.no_grad():
                    return varlen_attn(q, k, v, cu, cu, mx, mx, window_size=window, **kw)

            def tv_fwdbwd():
                qg.grad = kg.grad = vg.grad = None
                varlen_attn(qg, kg, vg, cu, cu, mx, mx, window_size=window, **kw).backward(do)

            fns["torch_varlen"] = (tv_fwd, tv_fwdbwd)
    return fns


def _check(fwd, q, k, v, lens, causal):
    """Max relative error of the output on kv head 0's query group against the fp32 per-document reference."""
    from turbo_dist.ops.attention import reference_forward

    g = q.shape[1] // k.shape[1]
    o = fwd()[:, :g].float()
    err, a = 0.0, 0
    for n in lens:
        ref, _ = reference_forward(q[None, a:a + n, :g], k[None, a:a + n, :1], v[None, a:a + n, :1], causal)
        err = max(err, ((o[a:a + n] - ref[0].float()).norm() / ref.norm().clamp_min(1e-12)).item())
        a += n
    return err


def _backend(name, phase):
    """What the dispatcher ran in the last call of impl `name` (call it first): "fwd" or "fwd/bwd" backends."""
    from turbo_dist.ops import dispatcher

    if name == "torch_varlen":
        return "torch"
    ops = ("attention_varlen_fwd", "attention_varlen_bwd") if name == "ours" else ("attention_fwd", "attention_bwd")
    ran = [dispatcher.last_backend(op) for op in ops[:1 if phase == "fwd" else 2]]
    return "/".join(str(b) for b in ran)


def run(args, meta=None):
    """rows; `meta` (a dict, optional) gets "errors" (implementations not timed and why) and "fallbacks"."""
    meta = {} if meta is None else meta
    errors_out, fallbacks = meta.setdefault("errors", []), meta.setdefault("fallbacks", [])
    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    tokens = args.tokens // 64 if dry else args.tokens
    lens = doc_lengths(tokens, max(1, args.min_doc // (64 if dry else 1)), max(2, args.max_doc // (64 if dry else 1)),
                       args.seed)
    hq, hkv, d = (4, 2, 16) if dry else (args.heads, args.kv_heads, args.head_dim)
    causal = not args.no_causal
    g = torch.Generator().manual_seed(args.seed + 1)
    q, do = (torch.randn(tokens, hq, d, generator=g).to(dev, dtype) for _ in range(2))
    k, v = (torch.randn(tokens, hkv, d, generator=g).to(dev, dtype) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    fns = _impls(q, k, v, do, cu, lens, causal, dry, fallbacks)
    if dry:
        fallbacks.append("--dry-run: no dense_packed / torch_varlen rows")
    errors = {}
    for name, (fwd, _) in list(fns.items()):
        if name == "dense_packed":
            continue  # other semantics on purpose
        try:
            errors[name] = _check(fwd, q, k, v, lens, causal)
        except Exception as exc:  # an implementation this torch/GPU cannot run: reported, not timed
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            errors_out.append(f"{name}: check raised {type(exc).__name__}: {exc}"[:400])
            del fns[name]
    pairs = visible_pairs(lens, causal)
    peak = None if dry else peak_tflops("bf16")
    rows = []
    for i, phase in enumerate(("fwd", "fwd+bwd")):
        def on_error(label, exc, phase=phase):
            print(f"{label} {phase}: {exc}", flush=True)
            errors_out.append(f"{label} {phase}: {type(exc).__name__}: {exc}"[:400])
        res = bench_interleaved({name: f[i] for name, f in fns.items()}, rounds=1 if dry else args.rounds,
                                rep_ms=1.0 if dry else args.rep_ms, warm=not dry, on_error=on_error)
        flops = 4.0 * pairs * hq * d * (1.0 if phase == "fwd" else 3.5)
        for name, ms in res.items():
            if ms is None:
                continue
            fns[name][i]()
            backend = _backend(name, phase)
            tf = flops / ms / 1e9
            rows.append({"phase": phase, "impl": name, "backend": backend, "ms": ms, "tflops": tf,
                         "x_torch_varlen": (res["torch_varlen"] / ms) if res.get("torch_varlen") else None,
                         "x_per_doc_loop": (res["per_doc_loop"] / ms) if res.get("per_doc_loop") else None,
                         "frac_peak": (tf / peak) if peak else None, "max_rel_err": errors.get(name),
                         "docs": len(lens), "tokens": tokens, "max_doc": max(lens),
                         "shape": f"T={tokens} Hq={hq} Hkv={hkv} D={d} {'causal' if causal else 'full'}"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--min-doc", type=int, default=128)
    p.add_argument("--max-doc", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32: checks the script only")
    args = p.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry-run needs TRITON_INTERPRET=1 in the environment")
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_varlen_attention needs a CUDA GPU (--dry-run checks the script on CPU)")
        return 0
    meta = {"args": vars(args)}
    rows = run(args, meta)
    print_table(rows, ["phase", "impl", "backend", "ms", "tflops", "x_torch_varlen", "x_per_doc_loop", "frac_peak",
                       "max_rel_err", "docs", "shape"])
    if args.json:
        write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
