"""Attention benchmark: every backend of turbo_dist.ops.attention (cuDNN / flash / efficient SDPA
through the aten ops that return the LSE, our Triton kernel) and the dispatcher default, forward,
backward and forward+backward, beside torch's own F.scaled_dot_product_attention in the same run.

    python benchmarks/bench_ops_attention.py --json out.json            # B=4 S=4096 H=32 D=128 causal bf16
    python benchmarks/bench_ops_attention.py --attn-shapes 4:4096:32:32,4:4096:32:8,4:8192:32:32 --json out.json
    python benchmarks/bench_ops_attention.py --attn-tune                # sweep our Triton tile configs
    python benchmarks/bench_ops_attention.py --attn-probe               # raw aten op behaviour (GQA, masks)

`run(args) -> rows` and `add_args(parser)` let benchmarks/bench_ops.py include it. Each backend is
checked against the fp32 reference on a slice (batch 0, one kv-head group) before it is timed.
A backend "NAME:expand" runs NAME with kv repeated per query head (GQA shapes), to compare with
its native GQA. FLOPs: forward 4*B*Hq*Sq*Sk*D (causal: the visible pairs only, about half),
backward 2.5x forward, forward+backward 3.5x (flash-attn convention).
Timing: per pass, every backend, torch's SDPA and the default are timed interleaved (common.bench_interleaved:
--attn-rounds rounds of do_bench, L2 flushed, in a balanced order (each backend timed right after each other one
equally often; TURBO_DIST_BENCH_ORDER=shuffle / rotate for the older orders)), each row the median of its round medians. (JSON without `meta.rounds` predate this: each backend's
passes timed once, one backend after another in a fixed order, torch's SDPA first, and the check rows re-timed the
default and the best SDPA backend twice more, back to back: a ratio of the medians of three timings each.)
The "check" rows compare the default with the best SDPA backend from the same rounds (the issue asks <= 1.05x).
"""
import argparse
import contextlib
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, bench_interleaved, peak_tflops, print_table, write_json  # noqa: E402

attn = importlib.import_module("turbo_dist.ops.attention")  # the module (turbo_dist.ops.attention is also a function)
from turbo_dist.ops import attention_backward, attention_forward, dispatcher  # noqa: E402

PEAK_TFLOPS = peak_tflops("bf16")  # this GPU's datasheet bf16 dense peak (None: unknown GPU, no fraction)
OPS = ("attention_fwd", "attention_bwd")
SDPA = ("cudnn", "flash", "efficient")
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def add_args(parser):
    g = parser.add_argument_group("attention")
    g.add_argument("--attn-shapes", default=None,
                   help="comma list of B:S:Hq:Hkv (overrides --attn-batch/seqlen/heads/kv-heads)")
    g.add_argument("--attn-batch", type=int, default=4)
    g.add_argument("--attn-seqlen", type=int, default=4096)
    g.add_argument("--attn-heads", type=int, default=32)
    g.add_argument("--attn-kv-heads", type=int, default=None, help="default: --attn-heads (no GQA)")
    g.add_argument("--attn-head-dim", type=int, default=128)
    g.add_argument("--attn-no-causal", action="store_true")
    g.add_argument("--attn-dtype", default="bf16", choices=["bf16", "fp16"])
    g.add_argument("--attn-backends", default="cudnn,flash,efficient,triton,cudnn:expand",
                   help="NAME or NAME:expand (kv repeated per query head; only run on GQA shapes)")
    g.add_argument("--attn-rounds", type=int, default=5, help="interleaved timing rounds per pass")
    g.add_argument("--attn-rep-ms", type=float, default=40.0, help="do_bench repetition budget per round")
    g.add_argument("--attn-tune", action="store_true", help="sweep Triton tile configs instead")
    g.add_argument("--attn-probe", action="store_true", help="print raw aten SDPA op behaviour first")
    return parser


def _flops(b, hq, sq, sk, d, causal):
    f = 4.0 * b * hq * sq * sk * d
    if causal:  # visible pairs of a bottom-right mask
        f *= sum(min(sk, max(0, i + 1 + sk - sq)) for i in range(sq)) / (sq * sk)
    return f


def _shapes(args):
    if args.attn_shapes:
        return [tuple(int(x) for x in spec.split(":")) for spec in args.attn_shapes.split(",")]
    return [(args.attn_batch, args.attn_seqlen, args.attn_heads, args.attn_kv_heads or args.attn_heads)]


def _inputs(args, shape=None, device="cuda"):
    dtype = torch.bfloat16 if args.attn_dtype == "bf16" else torch.float16
    b, s, hq, hkv = shape or _shapes(args)[0]
    d = args.attn_head_dim
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, generator=g)  # noqa: E731
    return mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, hq, d)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def _use(spec):
    """Force backend NAME (or NAME:expand: with kv repeated per query head) for both ops."""
    name, _, variant = spec.partition(":")
    saved = dict(attn._NATIVE_GQA)
    if variant == "expand":
        attn._NATIVE_GQA[name] = False
    elif variant:
        raise ValueError(f"unknown backend variant {spec!r}")
    for op in OPS:
        dispatcher.set_backend(op, name)
    try:
        yield name
    finally:
        attn._NATIVE_GQA.clear()
        attn._NATIVE_GQA.update(saved)
        for op in OPS:
            dispatcher.set_backend(op, None)


def _check(q, k, v, do, causal):
    """Max relative error of o, lse (abs), dq, dk, dv vs the fp32 reference on batch 0 and kv head 0's
    query group, with the current backend choice. Also asserts the LSE layout contract."""
    g = q.shape[2] // k.shape[2]
    qs, ks, vs, dos = q[:1, :, :g], k[:1, :, :1], v[:1, :, :1], do[:1, :, :g]
    o_ref, lse_ref = attn.reference_forward(qs, ks, vs, causal)
    grads_ref = attn.reference_backward(dos, qs, ks, vs, o_ref, lse_ref, causal)
    o, lse = attention_forward(q, k, v, causal)
    if lse.dtype != torch.float32 or tuple(lse.shape) != (q.shape[0], q.shape[2], q.shape[1]):
        raise AssertionError(f"lse {lse.dtype} {tuple(lse.shape)} is not [B, Hq, Sq] fp32")
    grads = attention_backward(do, q, k, v, o, lse, causal)
    errs = [_rel(o[:1, :, :g], o_ref), (lse[:1, :g] - lse_ref).abs().max().item()]
    errs += [_rel(gr[:1, :, :n], r) for gr, r, n in zip(grads, grads_ref, (g, 1, 1))]
    del o_ref, lse_ref, grads_ref
    return max(errs)


def _torch_sdpa(q, k, v, do, causal):
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    F = torch.nn.functional

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)

    dot = do.transpose(1, 2)

    def fwdbwd():
        qt.grad = kt.grad = vt.grad = None  # no gradient accumulation in the timed region
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        o.backward(dot)

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def _forced(spec, fn):
    """fn run with backend `spec` forced for both ops, set around each call, so labels timed interleaved do not see
    each other's settings (the default's label runs with none set)."""
    def run():
        with _use(spec):
            return fn()
    return run


def _ours(q, k, v, do, causal):
    o, lse = attention_forward(q, k, v, causal)
    return {"fwd": lambda: attention_forward(q, k, v, causal),
            "bwd": lambda: attention_backward(do, q, k, v, o, lse, causal),
            "fwd+bwd": lambda: attention_backward(do, q, k, v, *attention_forward(q, k, v, causal), causal)}


def run(args):
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops_attention needs a CUDA GPU")
    if getattr(args, "attn_probe", False):
        probe()
    if getattr(args, "attn_tune", False):
        return tune(args)
    rows = []
    for shape in _shapes(args):
        rows += run_shape(args, shape)
        torch.cuda.empty_cache()
    return rows


def run_shape(args, shape_spec):
    causal = not args.attn_no_causal
    q, k, v, do = _inputs(args, shape_spec)
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    flops = _flops(b, hq, s, s, d, causal)
    shape = dict(B=b, S=s, Hq=hq, Hkv=hkv, D=d, causal=causal, dtype=args.attn_dtype)
    rows, labels, errs = [], {"torch_sdpa": _torch_sdpa(q, k, v, do, causal)}, {}
    for spec in args.attn_backends.split(","):
        name = spec.partition(":")[0]
        if ":" in spec and hkv == hq:
            continue  # the variant only differs on GQA shapes
        ok = attn._sdpa_reason(name, q, k, v, causal) if name in SDPA else True
        if ok is not True:
            rows.append(dict(op="attention", backend=spec, **{"pass": "skipped"}, **shape, note=str(ok)))
            continue
        try:
            with _use(spec):
                errs[spec] = _check(q, k, v, do, causal)
                labels[spec] = {p: _forced(spec, fn) for p, fn in _ours(q, k, v, do, causal).items()}
        except Exception as exc:  # report, keep benchmarking the others
            rows.append(dict(op="attention", backend=spec, **{"pass": "failed"}, **shape, note=repr(exc)[:300]))
            print(f"{spec} FAILED: {exc!r}"[:400])
    fns = _ours(q, k, v, do, causal)
    fns["bwd"]()
    chosen = f"default({dispatcher.last_backend('attention_fwd')}/{dispatcher.last_backend('attention_bwd')})"
    labels[chosen] = fns
    times = {}
    for pass_ in PASS_FLOPS:
        def on_error(label, exc, pass_=pass_):
            rows.append(dict(op="attention", backend=label, **{"pass": "failed"}, **shape,
                             note=f"{pass_}: {exc!r}"[:300]))
            print(f"{label} {pass_} FAILED: {exc!r}"[:400])
        res = bench_interleaved({label: f[pass_] for label, f in labels.items() if pass_ in f},
                                rounds=args.attn_rounds, rep_ms=args.attn_rep_ms, on_error=on_error)
        times.update({(label, pass_): ms for label, ms in res.items() if ms is not None})
    for label in labels:  # rows per backend, its passes in order
        for pass_ in PASS_FLOPS:
            ms = times.get((label, pass_))
            if ms is None:
                continue
            f = flops * PASS_FLOPS[pass_]
            base = times.get(("torch_sdpa", pass_))
            rows.append(dict(op="attention", backend=label, **{"pass": pass_}, **shape, ms=ms, tflops=f / ms / 1e9,
                             frac_peak=(f / ms / 1e9 / PEAK_TFLOPS) if PEAK_TFLOPS else None,
                             max_rel_err=errs.get(label), **({"vs_torch_sdpa": base / ms} if base else {})))
    print_table([r for r in rows if "ms" in r], ["backend", "pass", "B", "S", "Hq", "Hkv", "ms", "tflops",
                                                 "max_rel_err"])
    for pass_ in PASS_FLOPS:
        sdpa = {n: t for (n, p), t in times.items() if p == pass_ and n.partition(":")[0] in SDPA}
        if not sdpa or (chosen, pass_) not in times:
            continue
        best = min(sdpa, key=sdpa.get)
        allb = {n: t for (n, p), t in times.items() if p == pass_ and not n.startswith(("default", "torch"))}
        # both from the same interleaved rounds: the default's median over the best SDPA backend's
        ratio = times[(chosen, pass_)] / sdpa[best]
        rows.append(dict(op="attention", backend="check", **{"pass": pass_}, **shape, ratio_default_vs_best_sdpa=ratio,
                         best_sdpa=best, default_ms=times[(chosen, pass_)], best_sdpa_ms=sdpa[best],
                         fastest_backend=min(allb, key=allb.get),
                         note=f"{chosen} / best SDPA ({best}), medians of the same {args.attn_rounds} interleaved "
                              f"rounds = {ratio:.3f} ({'OK' if ratio <= 1.05 else 'OVER'} the 1.05 limit)"))
        print(rows[-1]["note"], f"[{pass_} {shape}]")
    return rows


def probe():
    """What the raw aten ops do on this torch: schemas, native GQA, causal alignment with Sq != Sk."""
    for n in ("_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
              "_efficient_attention_backward", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_cudnn_attention_backward"):
        print("schema:", getattr(torch.ops.aten, n).default._schema)
    dev, dt = "cuda", torch.bfloat16
    print("cudnn version", torch.backends.cudnn.version(), "flash available",
          torch.backends.cuda.is_flash_attention_available())

    def ref(q, k, v, causal, top_left=False):
        if top_left and causal:
            o, lse = attn.reference_forward(q, k[:, :q.shape[1]], v[:, :q.shape[1]], True) if q.shape[1] <= k.shape[1] \
                else (None, None)
            return o, lse
        return attn.reference_forward(q, k, v, causal)

    for label, (sq, sk, hq, hkv, causal) in {"gqa": (128, 128, 8, 2, False), "causal_q<k": (64, 192, 4, 4, True),
                                             "causal_q>k": (192, 64, 4, 4, True)}.items():
        q = torch.randn(1, sq, hq, 64, device=dev, dtype=dt)
        k = torch.randn(1, sk, hkv, 64, device=dev, dtype=dt)
        v = torch.randn(1, sk, hkv, 64, device=dev, dtype=dt)
        o_br, lse_br = ref(q, k, v, causal)
        for name in SDPA:
            saved = (dict(attn._NATIVE_GQA),)
            attn._NATIVE_GQA[name] = True
            try:
                o, lse = attn._SDPA[name][0](q, k, v, causal, None)
                fin = torch.isfinite(lse_br)
                print(f"probe {label:11s} {name:9s} rel_err(bottom-right)={_rel(o, o_br):.2e} "
                      f"lse_err={(lse[fin] - lse_br[fin]).abs().max().item():.2e} "
                      f"lse_of_empty_rows={lse[~fin].unique().tolist()[:3]} lse_shape={tuple(lse.shape)}")
                if causal and sq < sk:
                    o_tl, _ = ref(q, k, v, causal, top_left=True)
                    print(f"      {name} rel_err(top-left)={_rel(o, o_tl):.2e}")
            except Exception as exc:
                print(f"probe {label:11s} {name:9s} FAILED {repr(exc)[:300]}")
            finally:
                attn._NATIVE_GQA.update(saved[0])


def tune(args):
    """Time our Triton kernels over tile configs at the (first) bench shape: forward, dk/dv and dq
    separately, each checked against the current config's result; then forward, backward and
    forward+backward with the best of each ("triton(tuned)" rows), to copy into FWD/BWD_*_CONFIGS."""
    from turbo_dist.kernels import flash_attn as fa
    from turbo_dist.kernels.flash_attn import FlashConfig as C

    causal = not args.attn_no_causal
    q, k, v, do = _inputs(args)
    b, s, hq, d = q.shape
    flops = _flops(b, hq, s, s, d, causal)
    o, lse = fa.flash_attn_forward(q, k, v, causal)
    block_d = fa._block_d(d)
    base = {"fwd": fa._pick(fa.FWD_CONFIGS, block_d), "dkdv": fa._pick(fa.BWD_DKDV_CONFIGS, block_d),
            "dq": fa._pick(fa.BWD_DQ_CONFIGS, block_d)}
    ref_grads = fa.flash_attn_backward(do, q, k, v, o, lse, causal)
    sweeps = {
        "fwd": [base["fwd"], C(128, 128, 8, 3), C(128, 64, 4, 3), C(128, 128, 8, 2), C(128, 64, 8, 4),
                C(64, 64, 4, 4), C(128, 32, 4, 4)],
        "dkdv": [base["dkdv"], C(32, 128, 4, 3), C(64, 128, 8, 3), C(64, 64, 4, 3), C(32, 64, 4, 3),
                 C(128, 128, 8, 2), C(64, 128, 4, 2)],
        "dq": [base["dq"], C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 4, 3), C(128, 128, 8, 2),
               C(64, 128, 8, 2), C(128, 64, 4, 2)],
    }
    rows, best = [], dict(base)
    for kind, cfgs in sweeps.items():
        best_ms = None
        for c in cfgs:
            if kind == "fwd":
                fn = lambda c=c: fa.flash_attn_forward(q, k, v, causal, config=c)  # noqa: E731
            elif kind == "dkdv":
                fn = lambda c=c: fa.flash_attn_backward(do, q, k, v, o, lse, causal, dkdv_config=c,  # noqa: E731
                                                        dq_config=base["dq"])
            else:
                fn = lambda c=c: fa.flash_attn_backward(do, q, k, v, o, lse, causal, dkdv_config=base["dkdv"],  # noqa: E731
                                                        dq_config=c)
            row = dict(kernel=kind, block_m=c.block_m, block_n=c.block_n, warps=c.num_warps, stages=c.num_stages,
                       current=c == base[kind])
            try:
                out = fn()
                err = _rel(out[0], o) if kind == "fwd" else max(_rel(g, r) for g, r in zip(out, ref_grads))
                ms = bench(fn)
                f = flops * (1.0 if kind == "fwd" else 2.5)  # dkdv / dq rows time the whole backward
                row.update(ms=ms, tflops=f / ms / 1e9, rel_err_vs_current=err)
                if err < 1e-2 and (best_ms is None or ms < best_ms):
                    best_ms, best[kind] = ms, c
            except Exception as exc:
                row.update(note=repr(exc)[:120])
            rows.append(row)
            print_table(rows[-1:])
    print("best configs:", {kn: c for kn, c in best.items()})

    def fwd():
        return fa.flash_attn_forward(q, k, v, causal, config=best["fwd"])

    def bwd():
        return fa.flash_attn_backward(do, q, k, v, o, lse, causal, dkdv_config=best["dkdv"], dq_config=best["dq"])

    def fwdbwd():
        o2, lse2 = fwd()
        return fa.flash_attn_backward(do, q, k, v, o2, lse2, causal, dkdv_config=best["dkdv"], dq_config=best["dq"])

    for pass_, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwdbwd)):
        ms = bench(fn)
        f = flops * PASS_FLOPS[pass_]
        rows.append(dict(kernel="triton(tuned)", **{"pass": pass_}, B=b, S=s, Hq=hq, Hkv=k.shape[2], D=d, ms=ms,
                         tflops=f / ms / 1e9, frac_peak=(f / ms / 1e9 / PEAK_TFLOPS) if PEAK_TFLOPS else None,
                         configs={kn: vars(c) for kn, c in best.items()}))
        print_table(rows[-1:], ["kernel", "pass", "ms", "tflops", "frac_peak"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write rows (with command and machine) to this path")
    add_args(p)
    args = p.parse_args(argv)
    rows = run(args)
    cols = (["kernel", "pass", "block_m", "block_n", "warps", "stages", "current", "ms", "tflops", "rel_err_vs_current",
             "note"] if args.attn_tune else
            ["backend", "pass", "B", "S", "Hq", "Hkv", "ms", "tflops", "frac_peak", "vs_torch_sdpa", "max_rel_err",
             "note"])
    print_table(rows, cols)
    if args.json:
        write_json(args.json, rows, meta=dict(
            peak_tflops=PEAK_TFLOPS, cudnn=torch.backends.cudnn.version(),
            flops_convention="fwd 4*B*Hq*S*S*D (causal: visible pairs only), bwd 2.5x fwd, fwd+bwd 3.5x fwd",
            default_priority=attn.PRIORITY,
            **({} if args.attn_tune else {"rounds": args.attn_rounds, "rep_ms": args.attn_rep_ms}),
            **({"timing_order": "each config timed alone, one after another (bench)"} if args.attn_tune else {})))
    return rows


if __name__ == "__main__":
    main()
