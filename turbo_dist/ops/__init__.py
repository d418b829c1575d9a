"""Shared kernels behind one backend dispatcher: GEMM, grouped GEMM, FP8, attention with LSE."""
from . import dispatcher
from .attention import attention, attention_backward, attention_forward
from .gemm import gemm
from .grouped_gemm import grouped_gemm
from .fp8 import (Float8QuantConfig, Format, ScalingGranularity, dequantize_fp8, gemm_fp8, grouped_gemm_fp8,
                  grouped_scaled_mm, quantize_fp8, scaled_mm)


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


__all__ = ["dispatcher", "gemm", "grouped_gemm", "gemm_fp8", "grouped_gemm_fp8", "scaled_mm", "grouped_scaled_mm", "quantize_fp8",
           "dequantize_fp8", "Float8QuantConfig", "Format", "ScalingGranularity", "attention", "attention_forward", "attention_backward", "flash_attn_func"]
