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


def _unsupported_flash_args(dropout_p, window_size, bias, alibi_slopes, deterministic, return_attn_probs):
    """flash-attn / Primus-Turbo arguments we take in their positions but do not implement: refused unless at
    their defaults (never silently ignored)."""
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not supported (pass 0.0)")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size={tuple(window_size)}: sliding-window attention is not supported")
    if bias is not None or alibi_slopes is not None:
        raise NotImplementedError("attention bias / alibi_slopes are not supported")
    if deterministic:
        raise NotImplementedError("deterministic=True is not promised by every backend (cuDNN / flash SDPA "
                                  "backwards may use atomics); our Triton backward has none: "
                                  "TURBO_DIST_ATTENTION_BWD_BACKEND=triton (and _VARLEN_BWD_), deterministic=False")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs is not supported (the probabilities are never materialized)")


_BUNDLE_KEYS = ("cp_group", "cp_comm_type", "load_balance", "num_chunks", "cp_stream")


def _cp_kwargs(bundle, causal, dense):
    """cp_param_bundle -> context_parallel_attention's keywords. cp_stream (Primus-Turbo's key) is accepted and
    unused: the runtime's comm stream carries the CP traffic. Causal dense attention over 2+ ranks needs the shard
    layout named: zigzag (turbo_dist.cp.shard, Megatron, TorchTitan) and contiguous chunks (Primus-Turbo) give
    different, equally plausible-looking results, so neither is assumed."""
    if not isinstance(bundle, dict):
        raise TypeError(f"cp_param_bundle must be a dict, got {type(bundle).__name__}")
    unknown = sorted(set(bundle) - set(_BUNDLE_KEYS))
    if unknown:
        raise TypeError(f"cp_param_bundle: unknown keys {unknown}; accepted: {list(_BUNDLE_KEYS)}")
    kw = {key: val for key, val in bundle.items() if key != "cp_stream"}
    if dense and causal and "load_balance" not in kw:
        import torch.distributed as dist

        group = kw.get("cp_group")
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            raise ValueError(
                "causal context-parallel flash_attn_func: name the shards' layout in cp_param_bundle: "
                "'load_balance': True (zigzag: rank r holds chunks r and 2cp-1-r of 2cp, as turbo_dist.cp.shard, "
                "Megatron and TorchTitan cut them) or False (contiguous: rank r holds chunk r of cp, as "
                "Primus-Turbo's CP tests cut them)")
    return kw


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), bias=None,
                    alibi_slopes=None, deterministic=False, return_lse=False, return_attn_probs=False,
                    cp_param_bundle=None):
    """Attention on [B, S, H, D] (GQA allowed); with `cp_param_bundle` the sequence is context-parallel.

    flash-attn's / Primus-Turbo's signature: dropout_p, window_size, bias, alibi_slopes, deterministic and
    return_attn_probs are taken in their positions and refused (NotImplementedError) unless at their defaults.
    Returns o [B, S, Hq, D], and with return_lse also lse [B, Hq, S] fp32.

    cp_param_bundle: {"cp_group": ProcessGroup, "cp_comm_type": "a2a" (or "all2all", "ulysses") | "ring" |
    "allgather", "load_balance": True (zigzag) | False (contiguous) -- required when causal over 2+ ranks --,
    "num_chunks": int, "cp_stream": accepted, unused}; q/k/v are then this rank's shard of the sequence (see
    turbo_dist.cp.shard) and lse its rows.
    """
    _unsupported_flash_args(dropout_p, window_size, bias, alibi_slopes, deterministic, return_attn_probs)
    if cp_param_bundle is None:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)
    # The public facade reaches up to the CP feature only when asked to; ops itself never needs it.
    from turbo_dist import cp

    return cp.context_parallel_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                                         **_cp_kwargs(cp_param_bundle, causal, dense=True))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), bias=None, alibi_slopes=None,
                           deterministic=False, return_lse=False, return_attn_probs=False, cp_param_bundle=None):
    """Attention on packed variable-length sequences (flash-attn's / Primus-Turbo's varlen signature: the
    unsupported arguments are refused unless at their defaults, as in flash_attn_func); differentiable.

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (Hq % Hkv == 0), fp16/bf16/fp32; sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
    cu_seqlens_q/_k: [B+1] int32/int64 on q's device, starting at 0, non-decreasing, ending at Tq/Tk
    (empty sequences allowed). max_seqlen_q/_k: an int >= the longest sequence (a hint; None: computed).
    causal: per sequence, bottom-right aligned (query i of a sequence sees key j <= i + lk - lq).
    Returns o [Tq, Hq, D] (q's dtype), and lse [Hq, Tq] fp32 (-inf where a row sees no key) if return_lse.

    cp_param_bundle: as flash_attn_func's ("load_balance" defaults to False here: q/k/v are then this rank's
    contiguous shard [T/cp, H, D] of the packed sequence; True: the per-sequence zigzag of cp.shard_packed) and
    cu_seqlens stay global (over the whole packed T, the same on every rank); returns this rank's shard of o.
    Causal "ring" needs cu_seqlens_q == cu_seqlens_k; with return_lse the lse is this rank's [Hq, T/cp].
    """
    _unsupported_flash_args(dropout_p, window_size, bias, alibi_slopes, deterministic, return_attn_probs)
    if cp_param_bundle is None:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                softmax_scale=softmax_scale, return_lse=return_lse)
    from turbo_dist import cp

    return cp.context_parallel_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse,
                                         **_cp_kwargs(cp_param_bundle, causal, dense=False))


__all__ = ["dispatcher", "gemm", "grouped_gemm", "gemm_fp8", "grouped_gemm_fp8", "scaled_mm", "grouped_scaled_mm", "quantize_fp8",
           "dequantize_fp8", "cache_fp8_weights", "Float8QuantConfig", "Format", "ScalingGranularity", "attention", "attention_forward", "attention_backward", "flash_attn_func",
           "varlen_attention", "varlen_attention_forward", "varlen_attention_backward", "flash_attn_varlen_func"]
