"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU: the interpreter runs the kernels' math
but not Triton's compiler, whose layout passes refuse some programs the interpreter accepts (a name typed
differently in the two branches of an `if`, a tensor carried through a loop in a way a pass cannot lower).
Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET (which turns @triton.jit functions
into interpreted ones); prints one line per kernel and exits 1 if any failed.

    python tests/_sm90_compile.py [name ...]
"""
import sys
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def _desc(dtype, block):
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}]>"


def _gemm(dtype, bm, bn, bk, mode, edge, b_t=True, warps=8, stages=3):
    from turbo_dist.kernels import gemm as kg

    sig = dict(a_desc=_desc(dtype, (bm, bk)), b_desc=_desc(dtype, (bn, bk) if b_t else (bk, bn)), c_ptr="*bf16",
               sa_ptr="*fp32", sb_ptr="*fp32", M="i32", N="i32", K="i32", stride_cm="i32", stride_cn="i32",
               stride_sam="i32", stride_sak="i32", stride_sbk="i32", stride_sbn="i32")
    const = dict(A_T=False, B_T=b_t, SCALE_MODE=mode, SB_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                 WS=False, RESCALE=False, EDGE_N=edge)
    sig.update({k: "constexpr" for k in const})
    sig["be_desc"] = _desc(dtype, ((edge or bn), bk) if b_t else (bk, (edge or bn)))
    return kg._gemm_tma_kernel, sig, const, dict(num_warps=warps, num_stages=stages)


def _split_tail():
    from turbo_dist.kernels import gemm_persistent as gp

    _, sig, const, opts = _gemm("bf16", 256, 128, 64, 0, 0)
    sig.update(ws_ptr="*fp32", cnt_ptr="*i32")
    const.pop("EDGE_N")
    const.update(NUM_PROGS=132, SPLIT_TAIL=True, MAX_SPLIT=16, MIN_SPLIT_STEPS=4, TAIL_ONLY=False)
    sig.update({k: "constexpr" for k in const})
    return gp._gemm_tma_persistent_kernel, sig, const, opts


def _grouped(dtype, bm, bn, bk, mode, warps, stages, lens=False):
    from turbo_dist.kernels import grouped_gemm as gg

    sig = dict(a_desc=_desc(dtype, (bm, bk)), b_desc=f"tensordesc<{dtype}[1, {bn}, {bk}]>", c_ptr="*bf16",
               offs_ptr="*i64", sa_ptr="*fp32", sb_ptr="*fp32", G="i32", N="i32", K="i32", stride_cm="i32",
               stride_cn="i32", stride_sam="i32", stride_sak="i32", stride_sbg="i32", stride_sbk="i32",
               stride_sbn="i32")
    const = dict(NUM_PROGS=132, G_POW2=32, B_T=True, SCALE_MODE=mode, SB_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 WS=False, RESCALE=False, LENS=lens)
    sig.update({k: "constexpr" for k in const})
    return gg._grouped_gemm_tma_kernel, sig, const, dict(num_warps=warps, num_stages=stages)


def _ll_wait():
    from turbo_dist.kernels import moe_ll

    sig = dict(cnt_ptr="*i64", err_addr="i64", stats_ptr="*i64", num_src="i32", expected="i64", code="i32",
               timeout_ns="i64", max_iters="i64", BLOCK="constexpr", USE_TIMER="constexpr", HAS_STATS="constexpr",
               mask_ptr="*i32", HAS_MASK="constexpr")
    const = dict(BLOCK=8, USE_TIMER=True, HAS_STATS=True, HAS_MASK=True)
    return moe_ll._ll_wait_kernel, sig, const, dict(num_warps=1)


def _ll_dispatch_send_fp8():
    from turbo_dist.kernels import moe_ll

    sig = dict(x_ptr="*bf16", s_ptr="*bf16", idx_ptr="*i64", num_tokens="i32", peer_ptrs="*i64", me="i32",
               experts_per_rank="i32", num_max="i32", x_off="i64", s_off="i64", idx_off="i64", cnt_off="i64",
               stride_x="i32", mask_ptr="*i32")
    const = dict(X_WORDS=1, S_WORDS=1, K=8, BLOCK_K=8, BLOCK=1024, HAS_S=True, CAST=True, ROUND_SCALE=True,
                 GROUPS=56, G_POW2=64, HAS_MASK=True)
    sig.update({k: "constexpr" for k in const})
    return moe_ll._ll_dispatch_send_kernel, sig, const, dict(num_warps=4)


def _ll_combine_send():
    from turbo_dist.kernels import moe_ll

    sig = dict(y_ptr="*i32", dst_ptr="*i64", peer_ptrs="*i64", me="i32", num_max="i32", comb_off="i64",
               cnt_off="i64", Y_WORDS="constexpr", K="constexpr", BLOCK="constexpr", mask_ptr="*i32",
               HAS_MASK="constexpr")
    const = dict(Y_WORDS=3584, K=8, BLOCK=1024, HAS_MASK=True)
    return moe_ll._ll_combine_send_kernel, sig, const, dict(num_warps=4)


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
    sig = {a: "i32" for a in fn.arg_names}  # strides and sizes
    sig.update({a: "*bf16" for a in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")},
               LSE="*fp32", DELTA="*fp32", qk_scale="fp32", sm_scale="fp32", CU_Q=meta, CU_K=meta, SID_Q=meta,
               SID_K=meta)
    sig.update({k: "constexpr" for k in const})
    return fn, sig, const, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


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
    "ll_combine_send_mask": _ll_combine_send,
    "ll_dispatch_send_fp8_mask": _ll_dispatch_send_fp8,
    "attn_fwd_causal": lambda: _attn("fwd", False),
    "attn_fwd_varlen": lambda: _attn("fwd", True),
    "attn_bwd_dkdv_causal": lambda: _attn("dkdv", False),
    "attn_bwd_dq_varlen": lambda: _attn("dq", True),
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


def main(names):
    if names == ["--probe"]:
        why = probe()
        print(why or "ok")
        return 2 if why else 0
    failed = 0
    for name in names or KERNELS:
        try:
            fn, sig, const, opts = KERNELS[name]()
            sig = {a: sig[a] for a in fn.arg_names}  # every parameter, in order (KeyError: one left out)
            k = triton.compile(ASTSource(fn, sig, const), target=TARGET, options=opts)
            print(f"{name}: ok ({len(k.asm['ptx'])} chars of PTX)")
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
