"""MoE dispatch/combine benchmark (DeepEP semantics): our `nvlink` transport beside the `collective`
(NCCL all_to_all + permute) path, in the same run, on every rank of a torchrun job.

    torchrun --nproc-per-node 8 benchmarks/bench_moe.py --mode intranode --json moe.json
    python benchmarks/bench_moe.py --mode intranode              # one GPU: world_size 1 (a self-loop)
    torchrun ... benchmarks/bench_moe.py --mode low-latency | internode   (benchmarks/_bench_moe_modes.py)

Intranode: DeepSeek-V3's shape by default (hidden 7168, top-8 of 256 experts) for a sweep of tokens per
rank (128..8192), BF16 and FP8 (e4m3 + one fp32 scale per 128 channels) payloads. Timed per op:
`dispatch` (layout given, counts exchanged: the one host sync), `dispatch_cached` (a handle: no sync)
and `combine` (bf16 rows back, summed per token). Each is checked bit-exact against the collective
path before timing. GB/s as DeepEP counts it: bytes a rank receives (dispatch: rows x (hidden bytes +
scales)) or sends (combine: rows x hidden x 2), averaged over ranks, over the slowest rank's median time.
`frac_peak` divides by the link (peak_gbps): ~450 GB/s per direction per H100/H200 NVLink-4 port set, or,
for a world_size 1 self-loop (all traffic local), this GPU's datasheet HBM bandwidth (common.peak_hbm_gbps:
H100 SXM 3350, H200 4800 GB/s). The self-loop's copy reads and writes each counted byte once, so it moves
twice the bytes counted: a copy at the datasheet rate shows frac_peak ~0.5.

Shared with benchmarks/_bench_moe_modes.py: parse_args, init_dist, make_routing, to_fp8, _equal,
finish (rank 0 prints the table and writes the JSON).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, peak_hbm_gbps, print_table, time_across_ranks, write_json  # noqa: E402

LINK_GBPS = 450.0   # NVLink-4, one direction, per GPU
DEFAULT_TOKENS = {"intranode": "128,256,512,1024,2048,4096,8192", "internode": "128,1024,4096",
                  "low-latency": "128"}


def peak_gbps(world):
    """(GB/s, what it is): what `frac_peak` divides by. Across ranks the NVLink bandwidth one direction per GPU;
    in a world of one (a self-loop) this GPU's datasheet HBM bandwidth, None for a GPU not in common's table (the
    fraction is then left empty, not divided by another GPU's number)."""
    if world > 1:
        return LINK_GBPS, "NVLink one direction per GPU"
    return peak_hbm_gbps(), ("datasheet HBM bandwidth (world 1 self-loop; the copy reads and writes each counted "
                             "byte, so HBM moves 2x the bytes counted)")


def frac(gbps, peak):
    return gbps / peak if peak else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="intranode", choices=["intranode", "internode", "low-latency"])
    p.add_argument("--tokens", default=None, help="comma list of tokens per rank (mode default: "
                   + "; ".join(f"{k}: {v}" for k, v in DEFAULT_TOKENS.items()) + ")")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dtypes", default="bf16,fp8", help="dispatch payloads: bf16, fp8")
    p.add_argument("--num-sms", default="24", help="comma list: Config.num_sms values to try (best kept per row)")
    p.add_argument("--transports", default="nvlink,collective")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the bit-exact nvlink-vs-collective check")
    p.add_argument("--json", default=None, help="write rows + command + machine here (rank 0)")
    args = p.parse_args(argv)
    args.token_list = [int(t) for t in (args.tokens or DEFAULT_TOKENS[args.mode]).split(",")]
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.sms_list = [int(s) for s in args.num_sms.split(",")]
    args.transport_list = [t.strip() for t in args.transports.split(",") if t.strip()]
    return args


def init_dist():
    """torch.distributed from torchrun's env (or a world of one), one GPU per rank. Returns (rank, world, device)."""
    from turbo_dist.runtime.config import apply_safety_env

    apply_safety_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs CUDA GPUs (one per rank)")
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=dev)
    return dist.get_rank(), dist.get_world_size(), dev


def make_routing(num_tokens, num_experts, topk, rank, seed, device):
    """DeepEP's test routing: top-k of random scores (every slot used), random weights."""
    g = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    scores = torch.rand(num_tokens, num_experts, generator=g, device=device) + 1e-3
    topk_idx = scores.topk(topk, dim=1).indices
    topk_weights = torch.rand(num_tokens, topk, generator=g, device=device)
    return topk_idx, topk_weights


def to_fp8(x):
    """Per-token, per-128-channel e4m3: (x_fp8 [T, H], scales [T, H / 128] fp32)."""
    t, h = x.shape
    xv = x.float().view(t, h // 128, 128)
    scales = xv.abs().amax(dim=2).clamp(min=1e-4) / 448.0
    return (xv / scales.unsqueeze(2)).to(torch.float8_e4m3fn).view(t, h), scales.contiguous()


def mean_over_ranks(value):
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def finish(args, rows, meta, cols=None):
    """Rank 0: print the table, write the JSON (with command and machine)."""
    if dist.get_rank() != 0:
        return
    print_table(rows, cols)
    if args.json:
        write_json(args.json, rows, dict({"timing_order": "each op and path timed alone (time_across_ranks), one "
                                          "after another in a fixed order, not interleaved"},
                                         **meta, machine=machine_info()))
        print(f"wrote {args.json}")


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def run_intranode(args):
    from turbo_dist.moe import Buffer, Config

    rank, world, dev = init_dist()
    max_tokens = max(args.token_list)
    nbytes = Buffer.get_nvl_buffer_size_hint(max_tokens, args.hidden, world, args.topk)
    buffers = {}
    for name in args.transport_list:
        buffers[name] = Buffer(None, num_nvl_bytes=nbytes if name == "nvlink" else 0, transport=name)
    link, link_note = peak_gbps(world)
    rows = []
    for num_tokens in args.token_list:
        topk_idx, topk_weights = make_routing(num_tokens, args.experts, args.topk, rank, args.seed, dev)
        g = torch.Generator(device=dev).manual_seed(args.seed + 17 * rank)
        x_bf16 = torch.randn(num_tokens, args.hidden, generator=g, device=dev).to(torch.bfloat16)
        any_buf = next(iter(buffers.values()))
        n_rank, _, n_expert, in_rank, _ = any_buf.get_dispatch_layout(topk_idx, args.experts)
        layout = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
        for dtype in args.dtype_list:
            x = x_bf16 if dtype == "bf16" else to_fp8(x_bf16)
            results, row_t = {}, {}
            for name, buf in buffers.items():
                best = None
                for sms in args.sms_list:
                    cfg = Config(sms, 6, 256)
                    out = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, config=cfg, **layout)
                    recv_x, _, recv_w, _, handle, _ = out
                    recv_bf16 = (recv_x if dtype == "bf16" else recv_x[0].float().mul(
                        recv_x[1].repeat_interleave(128, dim=1)).to(torch.bfloat16))
                    results[name] = (out[:4], handle[3], buf.combine(recv_bf16, handle, config=cfg)[0])
                    t = {
                        "dispatch": time_across_ranks(lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                                 config=cfg, **layout), args.warmup, args.reps),
                        "dispatch_cached": time_across_ranks(lambda: buf.dispatch(x, handle=handle, config=cfg), args.warmup,
                                                   args.reps),
                        "combine": time_across_ranks(lambda: buf.combine(recv_bf16, handle, config=cfg), args.warmup,
                                           args.reps),
                    }
                    if best is None or t["dispatch_cached"] + t["combine"] < best[1]["dispatch_cached"] + best[1]["combine"]:
                        best = (sms, t)
                    if name != "nvlink":
                        break  # num_sms means nothing to NCCL
                row_t[name] = best
                num_recv = handle.num_recv_tokens
            scale_bytes = 0 if dtype == "bf16" else args.hidden // 128 * 4
            recv_bytes = mean_over_ranks(num_recv * (args.hidden * (2 if dtype == "bf16" else 1) + scale_bytes))
            send_bytes = mean_over_ranks(num_recv * args.hidden * 2)
            exact = None
            if not args.no_check and {"nvlink", "collective"} <= set(results):
                a, b = results["nvlink"], results["collective"]
                ok = _equal(a[0][0], b[0][0]) and _equal(a[0][1], b[0][1]) and _equal(a[0][2], b[0][2]) \
                    and a[0][3] == b[0][3] and _equal(a[1], b[1]) and _equal(a[2], b[2])
                flag = torch.tensor([0.0 if ok else 1.0], device=dev)
                dist.all_reduce(flag)
                exact = bool(flag.item() == 0)
            for op in ("dispatch", "dispatch_cached", "combine"):
                nbytes_op = send_bytes if op == "combine" else recv_bytes
                row = {"tokens": num_tokens, "dtype": "bf16" if op == "combine" else dtype, "op": op,
                       "world": world}
                for name, (sms, t) in row_t.items():
                    row[f"{name}_us"] = t[op] * 1e3
                    row[f"{name}_GBps"] = nbytes_op / (t[op] * 1e-3) / 1e9
                    if name == "nvlink":
                        row["nvlink_sms"] = sms
                if "nvlink" in row_t and "collective" in row_t:
                    row["speedup"] = row["collective_us"] / row["nvlink_us"]
                if "nvlink" in row_t:
                    row["frac_peak"] = frac(row["nvlink_GBps"], link)
                row["exact"] = exact
                if op == "combine" and dtype != args.dtype_list[0]:
                    continue  # combine is bf16 whatever the dispatch payload: reported once
                rows.append(row)
            if rank == 0:
                print(f"[bench_moe] tokens {num_tokens} {dtype}: " + ", ".join(
                    f"{n} dispatch {t['dispatch'] * 1e3:.0f} us / cached {t['dispatch_cached'] * 1e3:.0f} us / "
                    f"combine {t['combine'] * 1e3:.0f} us" for n, (_, t) in row_t.items()), flush=True)
    meta = {"mode": "intranode", "world_size": world, "hidden": args.hidden, "topk": args.topk,
            "experts": args.experts, "num_nvl_bytes": nbytes, "peak_GBps": link, "peak_note": link_note,
            "timing": f"median of {args.reps} after {args.warmup} warm-up, max over ranks; bytes averaged over ranks"}
    finish(args, rows, meta)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "intranode":
        run_intranode(args)
    elif args.mode == "low-latency":
        from _bench_moe_modes import run_low_latency

        run_low_latency(args)
    else:
        from _bench_moe_modes import run_internode

        run_internode(args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
