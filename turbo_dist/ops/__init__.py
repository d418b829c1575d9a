"""Shared kernels behind one backend dispatcher: GEMM, grouped GEMM, FP8, attention with LSE."""
from . import dispatcher
from .attention import attention, attention_backward, attention_forward
from .attention_varlen import varlen_attention, varlen_attention_backward, varlen_attention_forward
from .gemm import gemm
from .grouped_gemm import grouped_gemm
from .fp8 import (Float8QuantConfig, Format, ScalingGranularity, cache_fp8_weights, dequantize_fp8, gemm_fp8,
                  quantize_fp8, scaled_mm)
from .fp8_grouped import grouped_gemm_fp8, grouped_scaled_mm
from . import fp8_wgmma  # noqa: E402,F401  (registers grouped_scaled_mm's backend "wgmma")
from . import grouped_wgmma  # noqa: E402,F401  (registers grouped_gemm's backend "wgmma", opt-in)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, cp_param_bundle=None):
    """Attention on [B, S, H, D] (GQA allowed); with `cp_param_bundle` the sequence is context-parallel.

    cp_param_bundle: {"cp_group": ProcessGroup, "cp_comm_type": "a2a" | "ring" | "allgather"}; q/k/v
    are then this rank's shard of the sequence (see turbo_dist.cp.shard).
    """
    if cp_param_bundle is None:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    # The public facade reaches up to the CP feature only when asked to; ops itself never needs it.
    from turbo_dist import cp

    return cp.context_parallel_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, **cp_param_bundle)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, return_lse=False, cp_param_bundle=None):
    """Attention on packed variable-length sequences (flash-attn's varlen signature); differentiable.

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (Hq % Hkv == 0), fp16/bf16/fp32; sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
    cu_seqlens_q/_k: [B+1] int32/int64 on q's device, starting at 0, non-decreasing, ending at Tq/Tk
    (empty sequences allowed). max_seqlen_q/_k: an int >= the longest sequence (a hint; None: computed).
    causal: per sequence, bottom-right aligned (query i of a sequence sees key j <= i + lk - lq).
    Returns o [Tq, Hq, D] (q's dtype), and lse [Hq, Tq] fp32 (-inf where a row sees no key) if return_lse.

    cp_param_bundle: {"cp_group": ProcessGroup, "cp_comm_type": "ring" | "a2a" | "allgather"}: q/k/v are
    then this rank's contiguous shard [T/cp, H, D] of the packed sequence and cu_seqlens stay global (over
    the whole packed T, the same on every rank); returns this rank's shard of o. Causal "ring" needs
    cu_seqlens_q == cu_seqlens_k; with return_lse the lse is this rank's [Hq, T/cp].
    """
    if cp_param_bundle is None:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                softmax_scale=softmax_scale, return_lse=return_lse)
    from turbo_dist import cp

    return cp.context_parallel_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse,
                                         **cp_param_bundle)


__all__ = ["dispatcher", "gemm", "grouped_gemm", "gemm_fp8", "grouped_gemm_fp8", "scaled_mm", "grouped_scaled_mm", "quantize_fp8",
           "dequantize_fp8", "cache_fp8_weights", "Float8QuantConfig", "Format", "ScalingGranularity", "attention", "attention_forward", "attention_backward", "flash_attn_func",
           "varlen_attention", "varlen_attention_forward", "varlen_attention_backward", "flash_attn_varlen_func"]
