"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU: the interpreter runs the kernels' math
but not Triton's compiler, whose layout passes refuse some programs the interpreter accepts (a name typed
differently in the two branches of an `if`, a tensor carried through a loop in a way a pass cannot lower).
Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET (which turns @triton.jit functions
into interpreted ones); prints one line per kernel and exits 1 if any failed.

    python tests/_sm90_compile.py [name ...]
    python tests/_sm90_compile.py --ptxas [name ...]   # also registers / spills per kernel (ptxas -v; no GPU)
    python tests/_sm90_compile.py --count 'trap;' name  # also how often a string occurs in the kernel's PTX
"""
import os
import re
import subprocess
import sys
import tempfile
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def _desc(dtype, block):
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}]>"


def _kernel(fn, const, opts, types):
    """(fn, signature, const, opts): the type `types` gives a parameter, constexpr for the names in `const`, i32
    for the rest (sizes, strides, ranks, epochs: Python ints below 2**31 at the real launches)."""
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    sig.update({k: "constexpr" for k in const})
    return fn, sig, const, opts


def _gemm_tma_types(dtype, bm, bn, bk, b_t):
    return dict(a_desc=_desc(dtype, (bm, bk)), b_desc=_desc(dtype, (bn, bk) if b_t else (bk, bn)), c_ptr="*bf16",
                sa_ptr="*fp32", sb_ptr="*fp32")


def _gemm(dtype, bm, bn, bk, mode, edge, b_t=True, warps=8, stages=3):
    from turbo_dist.kernels import gemm as kg

    types = _gemm_tma_types(dtype, bm, bn, bk, b_t)
    types["be_desc"] = _desc(dtype, ((edge or bn), bk) if b_t else (bk, (edge or bn)))
    const = dict(A_T=False, B_T=b_t, SCALE_MODE=mode, SB_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                 WS=False, RESCALE=False, EDGE_N=edge)
    return _kernel(kg._gemm_tma_kernel, const, dict(num_warps=warps, num_stages=stages), types)


def _split_tail():
    from turbo_dist.kernels import gemm_persistent as gp

    types = dict(_gemm_tma_types("bf16", 256, 128, 64, True), ws_ptr="*fp32", cnt_ptr="*i32")
    const = dict(A_T=False, B_T=True, SCALE_MODE=0, SB_N=128, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                 NUM_PROGS=132, WS=False, RESCALE=False, SPLIT_TAIL=True, MAX_SPLIT=16, MIN_SPLIT_STEPS=4,
                 TAIL_ONLY=False)
    return _kernel(gp._gemm_tma_persistent_kernel, const, dict(num_warps=8, num_stages=3), types)


def _grouped(dtype, bm, bn, bk, mode, warps, stages, lens=False):
    from turbo_dist.kernels import grouped_gemm as gg

    types = dict(a_desc=_desc(dtype, (bm, bk)), b_desc=_desc(dtype, (1, bn, bk)), c_ptr="*bf16", offs_ptr="*i64",
                 sa_ptr="*fp32", sb_ptr="*fp32")
    const = dict(NUM_PROGS=132, G_POW2=32, B_T=True, SCALE_MODE=mode, SB_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 WS=False, RESCALE=False, LENS=lens)
    return _kernel(gg._grouped_gemm_tma_kernel, const, dict(num_warps=warps, num_stages=stages), types)


def _ll_wait(mask=True):
    from turbo_dist.kernels import moe_ll

    types = dict(cnt_ptr="*i64", err_addr="i64", stats_ptr="*i64", expected="i64", timeout_ns="i64",
                 max_iters="i64", mask_ptr="*i32")
    const = dict(BLOCK=8, USE_TIMER=True, HAS_STATS=True, HAS_MASK=mask)
    if not mask:
        const["mask_ptr"] = None
    return _kernel(moe_ll._ll_wait_kernel, const, dict(num_warps=1), types)


def _ll_dispatch_send_fp8():
    from turbo_dist.kernels import moe_ll

    types = dict(x_ptr="*bf16", s_ptr="*bf16", idx_ptr="*i64", peer_ptrs="*i64", x_off="i64", s_off="i64",
                 idx_off="i64", cnt_off="i64", mask_ptr="*i32")
    const = dict(X_WORDS=1, S_WORDS=1, K=8, BLOCK_K=8, BLOCK=1024, HAS_S=True, CAST=True, ROUND_SCALE=True,
                 GROUPS=56, G_POW2=64, HAS_MASK=True)
    return _kernel(moe_ll._ll_dispatch_send_kernel, const, dict(num_warps=4), types)


def _ll_combine_send():
    from turbo_dist.kernels import moe_ll

    types = dict(y_ptr="*i32", dst_ptr="*i64", peer_ptrs="*i64", comb_off="i64", cnt_off="i64", mask_ptr="*i32")
    const = dict(Y_WORDS=3584, K=8, BLOCK=1024, HAS_MASK=True)
    return _kernel(moe_ll._ll_combine_send_kernel, const, dict(num_warps=4), types)


def _attn(which, varlen, causal=True, d=128):
    from turbo_dist.kernels import flash_attn as fa
    from turbo_dist.kernels import flash_attn_bwd as fb

    fn, cfgs = {"fwd": (fa._fwd_kernel, fa.FWD_CONFIGS), "dkdv": (fb._bwd_dkdv_kernel, fa.BWD_DKDV_CONFIGS),
                "dq": (fb._bwd_dq_kernel, fa.BWD_DQ_CONFIGS)}[which]
    cfg = cfgs[d]
    const = dict(CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=d, PRECISION="tf32",
                 VARLEN=varlen, WIDE=False)
    if which == "fwd":
        const["EVEN_D"] = True
    meta = "*i32" if varlen else "*fp32"
    types = {a: "*bf16" for a in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
    types.update(LSE="*fp32", DELTA="*fp32", qk_scale="fp32", sm_scale="fp32", CU_Q=meta, CU_K=meta, SID_Q=meta,
                 SID_K=meta)
    return _kernel(fn, const, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), types)


def _gemm_ptr(dtype, mode, bm, bn, bk, warps, stages):
    from turbo_dist.kernels import gemm as kg

    # the scales are fp32 in FP8 modes; without scales the launch passes C as the (unread) dummy
    s = "*fp32" if mode else "*bf16"
    const = dict(SCALE_MODE=mode, SB_N=128, ALLOW_TF32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    types = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr="*bf16", sa_ptr=s, sb_ptr=s)
    return _kernel(kg._gemm_kernel, const, dict(num_warps=warps, num_stages=stages), types)


def _grouped_ptr_fp8_blockwise():
    from turbo_dist.kernels import grouped_gemm as gg

    # FP8 with B stored [G, K, N] (not K-major) takes this kernel on Hopper too (see grouped_gemm.tma_operands)
    const = dict(NUM_PROGS=132, G_POW2=32, SCALE_MODE=3, SB_N=128, IEEE=False, BLOCK_M=128, BLOCK_N=128,
                 BLOCK_K=128, LENS=False)
    types = dict(a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", c_ptr="*bf16", offs_ptr="*i64", sa_ptr="*fp32", sb_ptr="*fp32")
    return _kernel(gg._grouped_gemm_kernel, const, dict(num_warps=8, num_stages=4), types)


def _grouped_wgrad():
    from turbo_dist.kernels import grouped_wgrad as gw

    const = dict(IEEE=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    types = dict(x_ptr="*bf16", y_ptr="*bf16", c_ptr="*bf16", offs_ptr="*i64")
    return _kernel(gw._grouped_wgrad_kernel, const, dict(num_warps=8, num_stages=4), types)


def _grouped_wgrad_tma(bm=128, bn=128, bk=64, warps=8, stages=4):
    from turbo_dist.kernels import grouped_wgrad as gw

    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    types = dict(x_desc=_desc("bf16", (bk, bm)), y_desc=_desc("bf16", (bk, bn)), x_ptr="*bf16", y_ptr="*bf16",
                 c_ptr="*bf16", offs_ptr="*i64")
    return _kernel(gw._grouped_wgrad_tma_kernel, const, dict(num_warps=warps, num_stages=stages), types)


# kernels/moe_nvlink.py as moe/nvlink.py launches it: 8 ranks, 20 channels (Config.num_sms), hidden 7168 moved as
# int32 words (1792 for FP8, 3584 for bf16), 56 fp32 scales and top-8 per token, the global-timer waits.
_NVL = dict(data_ptrs="*i64", sig_ptrs="*i64", sig_local="*i32", err_ptr="*i32", timeout_ns="i64",
            off_x="i64", off_s="i64", off_i="i64", off_w="i64", off_src="i64")  # byte offsets into the buffer


def _nvl_notify():
    from turbo_dist.kernels import moe_nvlink as kn

    types = dict(_NVL, row_ptr="*i32", expert_ptr="*i32", out_ptr="*i32")
    const = dict(BLOCK_R=8, BLOCK_L=32, USE_TIMER=True)  # 32 local experts (256 over 8 ranks)
    return _kernel(kn._notify_kernel, const, dict(num_warps=1), types)


def _nvl_dispatch_send():
    from turbo_dist.kernels import moe_nvlink as kn

    types = dict(_NVL, x_ptr="*i32", scales_ptr="*fp32", idx_ptr="*i64", w_ptr="*fp32", in_rank_ptr="*i8",
                 send_head_ptr="*i32", recv_off_ptr="*i32", recv_total_ptr="*i32")
    # every branch: the dispatch's top-k and weights with the cached dispatch's barrier
    const = dict(BLOCK_T=4, BLOCK_H=1024, BLOCK_S=64, BLOCK_K=8, BLOCK_R=8, HAS_SCALES=True, HAS_TOPK=True,
                 HAS_W=True, BARRIER=True, USE_TIMER=True)
    return _kernel(kn._dispatch_send_kernel, const, dict(num_warps=8), types)


def _nvl_dispatch_recv():
    from turbo_dist.kernels import moe_nvlink as kn

    types = dict(_NVL, num_recv_ptr="*i32")
    for side in ("buf", "out"):
        types.update({f"{side}_x": "*i32", f"{side}_s": "*fp32", f"{side}_i": "*i64", f"{side}_w": "*fp32",
                      f"{side}_src": "*i32"})
    const = dict(BLOCK_T=4, BLOCK_H=1024, BLOCK_S=64, BLOCK_K=8, BLOCK_RC=256, HAS_SCALES=True, HAS_TOPK=True,
                 HAS_W=True, USE_TIMER=True)
    return _kernel(kn._dispatch_recv_kernel, const, dict(num_warps=4), types)


def _nvl_combine_send():
    from turbo_dist.kernels import moe_nvlink as kn

    types = dict(_NVL, x_ptr="*i32", w_ptr="*fp32", seg_end_ptr="*i32", seg_cnt_ptr="*i32", dst_off_ptr="*i32",
                 send_total_ptr="*i32")
    const = dict(BLOCK_T=4, BLOCK_H=1024, BLOCK_K=8, BLOCK_R=8, HAS_W=True, USE_TIMER=True)
    return _kernel(kn._combine_send_kernel, const, dict(num_warps=8), types)


def _nvl_combine_recv():
    from turbo_dist.kernels import moe_nvlink as kn

    # the rows come back as bf16 (not words): the receiver sums them in fp32, plus two biases
    types = dict(_NVL, buf_x="*bf16", buf_w="*fp32", in_rank_ptr="*i8", send_head_ptr="*i32", send_off_ptr="*i32",
                 out_ptr="*bf16", out_w="*fp32", bias0="*bf16", bias1="*bf16")
    const = dict(BLOCK_T=4, BLOCK_H=512, BLOCK_K=8, BLOCK_RC=256, HAS_W=True, NUM_BIAS=2, USE_TIMER=True)
    return _kernel(kn._combine_recv_kernel, const, dict(num_warps=4), types)


# The low-latency receive side (moe/low_latency.py): 8 ranks x 128 tokens, top-8, hidden 7168, 32 local experts.
def _ll_place_index():
    from turbo_dist.kernels import moe_ll_place as lp

    types = dict(idx_ptr="*i32", dst_ptr="*i64", src_info_ptr="*i32", count_ptr="*i32", range_ptr="*i64",
                 stats_ptr="*i32")
    return _kernel(lp._ll_place_index_kernel, dict(K=8, HAS_STATS=True, BLOCK=1024), dict(num_warps=4), types)


def _ll_place_rows():
    from turbo_dist.kernels import moe_ll_place as lp

    # FP8 rows (1792 words) with their scales packed as UE8M0 bytes into int32 words
    types = dict(src_ptr="*i32", target_ptr="*i64", out_ptr="*i32", s_src_ptr="*fp32", s_out_ptr="*i32")
    const = dict(K=8, WORDS=1792, BLOCK=1024, HAS_S=True, GROUPS=56, G_POW2=64, UE8M0=True)
    return _kernel(lp._ll_place_rows_kernel, const, dict(num_warps=4), types)


def _ll_reduce(logfmt):
    from turbo_dist.kernels import moe_ll_logfmt as lf
    from turbo_dist.kernels import moe_ll_place as lp

    types = dict(rows_ptr="*u8" if logfmt else "*bf16", idx_ptr="*i64", w_ptr="*fp32", out_ptr="*bf16")
    if logfmt:
        return _kernel(lf._ll_combine_reduce_logfmt_kernel, dict(H=7168, K=8, BLOCK_H=1024), dict(num_warps=4), types)
    return _kernel(lp._ll_combine_reduce_kernel, dict(K=8, BLOCK_H=1024), dict(num_warps=4), types)


def _ll_combine_send_logfmt():
    from turbo_dist.kernels import moe_ll_logfmt as lf

    types = dict(y_ptr="*bf16", dst_ptr="*i64", peer_ptrs="*i64", comb_off="i64", cnt_off="i64", mask_ptr="*i32")
    const = dict(H=7168, K=8, GB=16, HAS_MASK=True)
    return _kernel(lf._ll_combine_send_logfmt_kernel, const, dict(num_warps=4), types)


def _tp_signal(wait):
    from turbo_dist.kernels import tp_signal as ts

    if wait:
        types = dict(pad_ptr="*i32", err_ptr="*i32", timeout_ns="i64")
        return _kernel(ts._wait_signal_kernel, dict(USE_TIMER=True), dict(num_warps=1), types)
    return _kernel(ts._put_signal_kernel, {}, dict(num_warps=1), dict(pad_ptrs="*i64"))


def _fp8_quant(row):
    from turbo_dist.kernels import fp8_quant as fq

    # bf16 -> e4m3 as the GPU runs it (EXACT_ROUND only under the interpreter); the tile kernel with 1 x 128
    # blocks (activations: a scale vector per tile, where 128 x 128 blocks have one scalar)
    types = dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32")
    const = dict(FP8_MAX=448.0, EXACT_ROUND=False, MBITS=3, EMIN=-6)
    if row:
        return _kernel(fq._quant_row_kernel, dict(const, BLOCK_R=16, BLOCK_C=512), {}, types)
    const.update(MODE=fq.MODE_1XB, BLOCK_R=32, BLOCK_C=128)
    return _kernel(fq._quant_tile_kernel, const, dict(num_warps=4), types)


def _fp8_grouped_m_major():
    from turbo_dist.kernels import fp8_quant as fq

    types = dict(src_ptr="*fp32", dst_ptr="*fp32", offs_ptr="*i64")
    return _kernel(fq._grouped_m_major_kernel, dict(G_POW2=32, BLOCK_R=128, BLOCK_K=16), {}, types)


def _dispatch_layout():
    from turbo_dist.kernels import moe_layout as ml

    # 256 experts over 8 ranks, top-8: BLOCK_T = min(128, 8192 // (8 * 8)); is_token_in_rank is bool (*i1)
    types = dict(idx_ptr="*i64", per_rank_ptr="*i32", per_expert_ptr="*i32", in_rank_ptr="*i1")
    const = dict(K=8, K_POW2=8, R=8, R_POW2=8, BLOCK_T=128)
    return _kernel(ml._dispatch_layout_kernel, const, dict(num_warps=4), types)


KERNELS = {
    "gemm_bf16": lambda: _gemm("bf16", 128, 256, 64, 0, 0),
    "gemm_bf16_edge_256x128": lambda: _gemm("bf16", 256, 128, 64, 0, 64, stages=4),
    "gemm_bf16_edge_kn_128x256": lambda: _gemm("bf16", 128, 256, 64, 0, 64, b_t=False),
    "gemm_fp8_rowwise_edge": lambda: _gemm("fp8e4nv", 256, 128, 128, 2, 64),
    "gemm_fp8_blockwise_edge": lambda: _gemm("fp8e4nv", 128, 128, 128, 3, 64, stages=4),
    "gemm_split_tail": _split_tail,
    "grouped_bf16": lambda: _grouped("bf16", 128, 256, 64, 0, 8, 3),
    "grouped_fp8_blockwise_lens": lambda: _grouped("fp8e4nv", 128, 128, 128, 3, 8, 4, lens=True),
    "ll_wait_stats_mask": _ll_wait,
    "ll_wait_stats": lambda: _ll_wait(mask=False),
    "ll_combine_send_mask": _ll_combine_send,
    "ll_dispatch_send_fp8_mask": _ll_dispatch_send_fp8,
    "attn_fwd_causal": lambda: _attn("fwd", False),
    "attn_fwd_varlen": lambda: _attn("fwd", True),
    "attn_bwd_dkdv_causal": lambda: _attn("dkdv", False),
    "attn_bwd_dq_varlen": lambda: _attn("dq", True),
    "gemm_ptr_bf16": lambda: _gemm_ptr("bf16", 0, 128, 256, 64, 8, 3),
    "gemm_ptr_fp8_blockwise": lambda: _gemm_ptr("fp8e4nv", 3, 128, 128, 128, 8, 4),
    "grouped_ptr_fp8_blockwise": _grouped_ptr_fp8_blockwise,
    "grouped_wgrad_bf16": _grouped_wgrad,
    "grouped_wgrad_tma_bf16": _grouped_wgrad_tma,
    "grouped_wgrad_tma_bf16_128x256": lambda: _grouped_wgrad_tma(128, 256, 64, 8, 3),
    "grouped_wgrad_tma_bf16_128x128x16": lambda: _grouped_wgrad_tma(128, 128, 16, 4, 6),
    "nvl_notify": _nvl_notify,
    "nvl_dispatch_send_fp8_barrier": _nvl_dispatch_send,
    "nvl_dispatch_recv_fp8": _nvl_dispatch_recv,
    "nvl_combine_send": _nvl_combine_send,
    "nvl_combine_recv_bias": _nvl_combine_recv,
    "ll_place_index_stats": _ll_place_index,
    "ll_place_rows_fp8_ue8m0": _ll_place_rows,
    "ll_combine_reduce": lambda: _ll_reduce(False),
    "ll_combine_send_logfmt_mask": _ll_combine_send_logfmt,
    "ll_combine_reduce_logfmt": lambda: _ll_reduce(True),
    "tp_put_signal": lambda: _tp_signal(False),
    "tp_wait_signal": lambda: _tp_signal(True),
    "fp8_quant_1x128": lambda: _fp8_quant(False),
    "fp8_quant_row": lambda: _fp8_quant(True),
    "fp8_grouped_m_major": _fp8_grouped_m_major,
    "moe_dispatch_layout": _dispatch_layout,
}


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def probe():
    """Whether this Triton can compile for sm_90 here at all (its NVIDIA backend and ptxas)."""
    try:
        triton.compile(ASTSource(_probe_kernel, {"x_ptr": "*fp32"}, {}), target=TARGET)
        return None
    except Exception as exc:  # reported as the reason to skip
        return f"{type(exc).__name__}: {exc}"


def ptxas_usage(ptx):
    """'R registers, S bytes spilled' from ptxas -v on the PTX (Triton's bundled ptxas, sm_90a): register pressure
    and spills can be read without a GPU (Triton's own n_regs / n_spills need the driver to load the binary)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "--gpu-name", "sm_90a", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return f"{regs[-1] if regs else '?'} registers, {spills[-1] if spills else '?'} bytes spilled"


def main(names):
    if names == ["--probe"]:
        why = probe()
        print(why or "ok")
        return 2 if why else 0
    count = None
    if names[:1] == ["--count"]:  # also how often a string occurs in each kernel's PTX (e.g. an instruction)
        count, names = names[1], names[2:]
    usage = names[:1] == ["--ptxas"]
    names = names[1:] if usage else names
    failed = 0
    for name in names or KERNELS:
        try:
            fn, sig, const, opts = KERNELS[name]()
            sig = {a: sig[a] for a in fn.arg_names}  # every parameter, in order (KeyError: one left out)
            k = triton.compile(ASTSource(fn, sig, const), target=TARGET, options=opts)
            extra = f"; {ptxas_usage(k.asm['ptx'])}" if usage else ""
            extra += f"; {count!r} x{k.asm['ptx'].count(count)}" if count else ""
            print(f"{name}: ok ({len(k.asm['ptx'])} chars of PTX{extra})")
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
