"""Attention benchmark: every backend of turbo_dist.ops.attention, forward and forward+backward,
beside torch's own F.scaled_dot_product_attention measured in the same run.

    python benchmarks/bench_ops_attention.py --json out.json            # B=4 S=4096 H=32 D=128 causal bf16
    python benchmarks/bench_ops_attention.py --attn-tune                # sweep our Triton tile configs
    python benchmarks/bench_ops_attention.py --attn-probe               # raw aten op behaviour (GQA, masks)

`run(args) -> rows` and `add_args(parser)` let benchmarks/bench_ops.py include it. Each backend is
checked against the fp32 reference on a slice (batch 0, one kv-head group) before it is timed.
FLOPs: forward 4*B*Hq*Sq*Sk*D (halved when causal), backward 2.5x forward (flash-attn convention).
"""
import argparse
import importlib
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, machine_info, print_table, write_json  # noqa: E402

attn = importlib.import_module("turbo_dist.ops.attention")  # the module (turbo_dist.ops.attention is also a function)
from turbo_dist.ops import attention_backward, attention_forward, dispatcher  # noqa: E402

PEAK_TFLOPS = 800.0  # H100 bf16 dense, as measured by cuBLAS 8192^3
OPS = ("attention_fwd", "attention_bwd")
SDPA = ("cudnn", "flash", "efficient")


def add_args(parser):
    g = parser.add_argument_group("attention")
    g.add_argument("--attn-batch", type=int, default=4)
    g.add_argument("--attn-seqlen", type=int, default=4096)
    g.add_argument("--attn-heads", type=int, default=32)
    g.add_argument("--attn-kv-heads", type=int, default=None, help="default: --attn-heads (no GQA)")
    g.add_argument("--attn-head-dim", type=int, default=128)
    g.add_argument("--attn-no-causal", action="store_true")
    g.add_argument("--attn-dtype", default="bf16", choices=["bf16", "fp16"])
    g.add_argument("--attn-backends", default="cudnn,flash,efficient,triton")
    g.add_argument("--attn-tune", action="store_true", help="sweep Triton tile configs instead")
    g.add_argument("--attn-probe", action="store_true", help="print raw aten SDPA op behaviour first")
    return parser


def _flops(b, hq, sq, sk, d, causal):
    f = 4.0 * b * hq * sq * sk * d
    if causal:  # visible pairs of a bottom-right mask
        f *= sum(min(sk, max(0, i + 1 + sk - sq)) for i in range(sq)) / (sq * sk)
    return f


def _inputs(args, device="cuda"):
    dtype = torch.bfloat16 if args.attn_dtype == "bf16" else torch.float16
    b, s, hq, d = args.attn_batch, args.attn_seqlen, args.attn_heads, args.attn_head_dim
    hkv = args.attn_kv_heads or hq
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, generator=g)  # noqa: E731
    return mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, hq, d)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check(name, q, k, v, do, causal):
    """Max relative error of o, dq, dk, dv vs the fp32 reference on batch 0 and kv head 0's query group."""
    g = q.shape[2] // k.shape[2]
    qs, ks, vs, dos = q[:1, :, :g], k[:1, :, :1], v[:1, :, :1], do[:1, :, :g]
    o_ref, lse_ref = attn.reference_forward(qs, ks, vs, causal)
    grads_ref = attn.reference_backward(dos, qs, ks, vs, o_ref, lse_ref, causal)
    for op in OPS:
        dispatcher.set_backend(op, name)
    o, lse = attention_forward(q, k, v, causal)
    grads = attention_backward(do, q, k, v, o, lse, causal)
    errs = [_rel(o[:1, :, :g], o_ref), (lse[:1, :g] - lse_ref).abs().max().item()]
    errs += [_rel(gr[:1, :, :n], r) for gr, r, n in zip(grads, grads_ref, (g, 1, 1))]
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

    return fwd, fwdbwd


def _ours(q, k, v, do, causal):
    def fwd():
        return attention_forward(q, k, v, causal)

    def fwdbwd():
        o, lse = attention_forward(q, k, v, causal)
        return attention_backward(do, q, k, v, o, lse, causal)

    return fwd, fwdbwd


def run(args):
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops_attention needs a CUDA GPU")
    if getattr(args, "attn_probe", False):
        probe()
    if getattr(args, "attn_tune", False):
        return tune(args)
    causal = not args.attn_no_causal
    q, k, v, do = _inputs(args)
    b, s, hq, d = q.shape
    flops = _flops(b, hq, s, s, d, causal)
    shape = dict(B=b, S=s, Hq=hq, Hkv=k.shape[2], D=d, causal=causal, dtype=args.attn_dtype)
    rows, times = [], {}

    def add(backend, pass_, fn, err=None):
        ms = bench(fn)
        f = flops * (1.0 if pass_ == "fwd" else 3.5)
        times[(backend, pass_)] = ms
        rows.append(dict(op="attention", backend=backend, **{"pass": pass_}, **shape, ms=ms,
                         tflops=f / ms / 1e9, frac_peak=f / ms / 1e9 / PEAK_TFLOPS, max_rel_err=err))

    base_fwd, base_fwdbwd = _torch_sdpa(q, k, v, do, causal)
    add("torch_sdpa", "fwd", base_fwd)
    add("torch_sdpa", "fwd+bwd", base_fwdbwd)
    for name in args.attn_backends.split(","):
        ok = attn._sdpa_reason(name, q, k, v, causal) if name in SDPA else True
        if ok is not True:
            rows.append(dict(op="attention", backend=name, **{"pass": "skipped"}, **shape, note=str(ok)))
            continue
        try:
            err = _check(name, q, k, v, do, causal)
            fwd, fwdbwd = _ours(q, k, v, do, causal)
            add(name, "fwd", fwd, err)
            add(name, "fwd+bwd", fwdbwd, err)
        except Exception as exc:  # report, keep benchmarking the others
            rows.append(dict(op="attention", backend=name, **{"pass": "failed"}, **shape, note=repr(exc)[:200]))
        finally:
            for op in OPS:
                dispatcher.set_backend(op, None)
    fwd, fwdbwd = _ours(q, k, v, do, causal)
    fwd()
    chosen = f"{dispatcher.last_backend('attention_fwd')}"
    fwdbwd()
    chosen += f"/{dispatcher.last_backend('attention_bwd')}"
    add(f"default({chosen})", "fwd", fwd)
    add(f"default({chosen})", "fwd+bwd", fwdbwd)
    for r in rows:
        if "ms" in r:
            base = times[("torch_sdpa", r["pass"])]
            r["vs_torch_sdpa"] = base / r["ms"]
    for pass_ in ("fwd", "fwd+bwd"):
        sdpa = {n: times[(n, pass_)] for n in SDPA if (n, pass_) in times}
        if sdpa:
            best = min(sdpa, key=sdpa.get)
            ratio = times[(f"default({chosen})", pass_)] / sdpa[best]
            rows.append(dict(op="attention", backend="check", **{"pass": pass_}, **shape,
                             note=f"default/best_sdpa({best}) time ratio {ratio:.3f} "
                                  f"({'OK' if ratio <= 1.05 else 'OVER'} 1.05 limit)"))
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
            saved = (dict(attn._NATIVE_GQA), dict(attn._CAUSAL_ANY_LEN))
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
    """Time our Triton kernels over tile configs at the bench shape (forward, dk/dv, dq separately)."""
    from turbo_dist.kernels import flash_attn as fa
    from turbo_dist.kernels.flash_attn import FlashConfig as C

    causal = not args.attn_no_causal
    q, k, v, do = _inputs(args)
    b, s, hq, d = q.shape
    flops = _flops(b, hq, s, s, d, causal)
    o, lse = fa.flash_attn_forward(q, k, v, causal)
    block_d = fa._block_d(d)
    base_dkdv = fa._pick(fa.BWD_DKDV_CONFIGS, block_d)
    base_dq = fa._pick(fa.BWD_DQ_CONFIGS, block_d)
    sweeps = {
        "fwd": [C(128, 64, 8, 3), C(128, 64, 4, 3), C(128, 128, 8, 3), C(128, 128, 8, 2), C(64, 64, 4, 3),
                C(64, 128, 4, 3), C(128, 32, 4, 4), C(128, 64, 8, 4), C(64, 64, 4, 4), C(128, 128, 4, 3)],
        "dkdv": [C(32, 128, 4, 3), C(64, 128, 8, 2), C(64, 128, 8, 3), C(32, 64, 4, 3), C(64, 64, 4, 3),
                 C(128, 128, 8, 2), C(32, 128, 8, 3), C(64, 128, 4, 2), C(16, 128, 4, 4), C(32, 128, 4, 5)],
        "dq": [C(128, 64, 8, 2), C(128, 64, 8, 3), C(128, 32, 4, 3), C(64, 64, 4, 3), C(128, 128, 8, 2),
               C(64, 32, 4, 4), C(128, 64, 4, 3), C(128, 32, 8, 4), C(64, 128, 8, 2)],
    }
    rows = []
    for kind, cfgs in sweeps.items():
        for c in cfgs:
            if kind == "fwd":
                fn = lambda c=c: fa.flash_attn_forward(q, k, v, causal, config=c)  # noqa: E731
            elif kind == "dkdv":
                fn = lambda c=c: fa.flash_attn_backward(do, q, k, v, o, lse, causal, dkdv_config=c,  # noqa: E731
                                                        dq_config=base_dq)
            else:
                fn = lambda c=c: fa.flash_attn_backward(do, q, k, v, o, lse, causal, dkdv_config=base_dkdv,  # noqa: E731
                                                        dq_config=c)
            try:
                ms = bench(fn)
                f = flops * (1.0 if kind == "fwd" else 2.5)
                rows.append(dict(kernel=kind, block_m=c.block_m, block_n=c.block_n, warps=c.num_warps,
                                 stages=c.num_stages, ms=ms, tflops=f / ms / 1e9))
            except Exception as exc:
                rows.append(dict(kernel=kind, block_m=c.block_m, block_n=c.block_n, warps=c.num_warps,
                                 stages=c.num_stages, note=repr(exc)[:120]))
            print_table(rows[-1:])
    for kind in sweeps:
        ok = [r for r in rows if r["kernel"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"best {kind}: {best}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write rows (with command and machine) to this path")
    add_args(p)
    args = p.parse_args(argv)
    rows = run(args)
    cols = (["kernel", "block_m", "block_n", "warps", "stages", "ms", "tflops", "note"] if args.attn_tune else
            ["backend", "pass", "ms", "tflops", "frac_peak", "vs_torch_sdpa", "max_rel_err", "note"])
    print_table(rows, cols)
    if args.json:
        write_json(args.json, rows, meta=dict(peak_tflops=PEAK_TFLOPS, flops_convention="fwd 4BHSSD (causal: visible "
                                              "pairs), fwd+bwd 3.5x fwd"))
    return rows


if __name__ == "__main__":
    main()
