"""Packed-sequence attention calls inside the CP modes: the inputs were validated once at the entry
(cp.context_parallel_attention) and the local cu_seqlens are built by the modes, so these go straight to
the dispatcher (the public functions would read cu_seqlens back to the host on every ring step)."""
from turbo_dist.ops import dispatcher


def varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """o [Tq, Hq, D], lse [Hq, Tq]."""
    return dispatcher.dispatch("attention_varlen_fwd", q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """dq, dk, dv."""
    do = do if do.dtype == q.dtype else do.to(q.dtype)
    return dispatcher.dispatch("attention_varlen_bwd", do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal,
                               scale)
