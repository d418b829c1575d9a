"""Megatron-core integration: turbo_dist.moe as the backend of Megatron's flex ("deepep") token dispatcher,
turbo_dist.tp for its sequence-parallel linears, turbo_dist.cp as its context-parallel core attention.

    import turbo_dist.integrations.megatron as tdm
    spec = get_gpt_layer_local_spec(num_experts=...)
    tdm.enable(moe_dispatcher=True, async_tp=True, cp_attention=True, layer_spec=spec)  # logs every change
    config = TransformerConfig(..., moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep",
                               moe_router_dtype="fp32")
    ...
    tdm.disable()                              # puts every rebound name back

How it plugs in. Megatron's flex dispatcher (`MoEFlexTokenDispatcher` -> `_DeepepManager`) reaches DeepEP
only through module-level names of `megatron.core.transformer.moe.fused_a2a` (`Buffer`, `get_buffer`,
`EventOverlap`, `EventHandle`, `fused_dispatch`, `fused_combine`, `set_deepep_num_sms`), three of which
`token_dispatcher` copied at import time. Megatron has no registration API for this backend, so
`enable()` rebinds exactly those names (Megatron's own `FusedDispatch`/`FusedCombine` autograd functions
stay in use: they call our DeepEP-compatible `turbo_dist.moe.Buffer` instead of `deep_ep.Buffer`), logs
each rebinding with the old and new value at INFO on the "turbo_dist" logger, and `disable()` restores
the originals. Nothing happens at import time.

Tested against megatron-core 0.16.1 (the `megatron` extra). HybridEP (`moe_flex_dispatcher_backend=
"hybridep"`) is not covered.

Async TP and CP attention go through Megatron's own per-model extension point, the layer spec (there is
no global switch to flip, so `enable(async_tp=True)` / `enable(cp_attention=True)` need `layer_spec=` and
change that spec; without it they raise ValueError pointing here):
- `use_turbo_dist_linears(spec)`: the spec's ColumnParallelLinear / RowParallelLinear (linear_qkv,
  linear_proj, linear_fc1, linear_fc2) become `TurboDistColumnParallelLinear` / `TurboDistRowParallelLinear`:
  Megatron's classes (same parameters, init, checkpoints) whose sequence-parallel all-gather + GEMM and
  GEMM + reduce-scatter run fused on turbo_dist.tp (forward and backward).
- `use_turbo_dist_core_attention(spec)`: `TurboDistCoreAttention` as core attention; context-parallel
  attention on turbo_dist.cp (cp_comm_type "p2p" -> ring, "a2a", "all_gather"; Megatron's zigzag CP
  sharding is our load_balance=True layout).
"""
import logging

import torch

import turbo_dist.ops as _ops
import turbo_dist.tp as _tp
from turbo_dist.tp import wgrad as _wgrad
from turbo_dist.moe import Buffer, EventOverlap
from turbo_dist.ops import flash_attn_func, flash_attn_varlen_func
from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints, host_values, memo

try:
    from megatron.core import parallel_state as _parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe import fused_a2a as _fused_a2a
    from megatron.core.transformer.moe import token_dispatcher as _token_dispatcher
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
except ImportError as _exc:  # pragma: no cover - exercised only without megatron-core
    raise ImportError(
        "turbo_dist.integrations.megatron needs megatron-core (tested: 0.16.1): "
        "pip install 'turbo_dist[megatron]'"
    ) from _exc

log = logging.getLogger("turbo_dist")

TESTED_VERSIONS = ("0.16.1",)

_ASYNC_TP_REASON = (
    "Megatron-core has no global hook for the communication of its sequence-parallel linears (the local "
    "ColumnParallelLinear/RowParallelLinear call linear_with_grad_accumulation_and_async_allreduce and "
    "reduce_scatter_to_sequence_parallel_region directly; tp_comm_overlap is TransformerEngine userbuffers) "
    "and turbo_dist does not patch Megatron's functions. Its linears are chosen per model by the layer spec: "
    "pass it (enable(async_tp=True, layer_spec=spec), i.e. use_turbo_dist_linears(spec))"
)
_CP_REASON = (
    "Megatron-core picks core attention per layer through the layer spec (its local DotProductAttention "
    "requires context_parallel_size == 1, TEDotProductAttention runs TransformerEngine's CP); there is no "
    "global switch to flip. Pass the spec (enable(cp_attention=True, layer_spec=spec), i.e. "
    "use_turbo_dist_core_attention(spec)) to put TurboDistCoreAttention in it"
)

# Rebinding records: (module, attribute, previous value or _ABSENT). Restored in reverse order.
_ABSENT = object()
_swaps = []
_state = {"moe_dispatcher": False, "buffer": None, "transport": None, "num_nvl_bytes": None, "num_sms": None,
          "async_tp": False, "cp_attention": False}


def _megatron_version():
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:
        return "unknown"


def _qualname(value):
    if value is _ABSENT:
        return "<absent>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    mod = getattr(value, "__module__", None) or type(value).__module__
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{mod}.{name}"


def _rebind(module, name, value):
    old = getattr(module, name, _ABSENT)
    _swaps.append((module, name, old))
    setattr(module, name, value)
    log.info("turbo_dist.integrations.megatron: %s.%s: %s -> %s", module.__name__, name, _qualname(old),
             _qualname(value))


# ---------------------------------------------------------------------------------------------- the DeepEP hook
def event_handle():
    """DeepEP's `EventHandle()`: an event on the current CUDA stream (None on CPU, where work is synchronous)."""
    return EventOverlap.record().event


def get_buffer(group, hidden_bytes):
    """Megatron's `fused_a2a.get_buffer`, returning a `turbo_dist.moe.Buffer`.

    Sized like Megatron sizes DeepEP's (the larger of the dispatch/combine configs' NVL hints) unless
    `enable(moe_num_nvl_bytes=...)` fixed the size; re-created when the group changes or the hint grows.
    """
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"get_buffer: group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if not isinstance(hidden_bytes, int) or hidden_bytes <= 0:
        raise ValueError(f"get_buffer: hidden_bytes must be a positive int, got {hidden_bytes!r}")
    n = group.size()
    if _state["num_nvl_bytes"] is not None:
        num_nvl_bytes = _state["num_nvl_bytes"]
    else:
        num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, n)
                            for cfg in (Buffer.get_dispatch_config(n), Buffer.get_combine_config(n)))
    buf = _state["buffer"]
    if buf is None or buf.group is not group or buf.num_nvl_bytes < num_nvl_bytes:
        buf = Buffer(group, num_nvl_bytes, 0, transport=_state["transport"])
        _state["buffer"] = buf
    return buf


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False):
    """Megatron's `fused_dispatch` (defined by Megatron only when deep_ep imports): its `FusedDispatch`.

    x: [num_tokens, hidden]; token_indices: [num_tokens, topk] int64 (-1 = dropped);
    token_probs: [num_tokens, topk] fp32; group: the TPxEP group.
    """
    return _fused_a2a.FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group,
                                          async_finish, allocate_on_comm_stream)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Megatron's `fused_combine`: its `FusedCombine` over our Buffer."""
    return _fused_a2a.FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms):
    """Megatron's `set_deepep_num_sms` (config.moe_deepep_num_sms): programs our nvlink kernels use."""
    Buffer.set_num_sms(num_sms)


# ---------------------------------------------------------------------------------------------- public switch
def enable(moe_dispatcher=True, async_tp=False, cp_attention=False, *, layer_spec=None, moe_transport=None,
           moe_num_nvl_bytes=None):
    """Turn turbo_dist on inside Megatron-core; returns `enabled()`. Every change is logged (INFO, "turbo_dist").

    moe_dispatcher: Megatron's flex token dispatcher with backend "deepep" (`moe_token_dispatcher_type=
        "flex"`, `moe_flex_dispatcher_backend="deepep"`, or the deprecated `moe_enable_deepep=True`) runs
        on turbo_dist.moe.Buffer. Call before the dispatchers are built (they check for the backend in
        their constructor). Idempotent; `disable()` undoes it.
    async_tp: the sequence-parallel ColumnParallelLinear/RowParallelLinear of `layer_spec` become
        TurboDistColumnParallelLinear/TurboDistRowParallelLinear (`use_turbo_dist_linears`).
    cp_attention: `layer_spec`'s core attention becomes TurboDistCoreAttention (`use_turbo_dist_core_attention`).
    layer_spec: the transformer-layer ModuleSpec (or a list of them, e.g. a TransformerBlockSubmodules'
        `layer_specs`) to change, required by async_tp / cp_attention: Megatron chooses these modules per
        model through the layer spec and has no global switch, so turbo_dist changes the spec you pass, before
        the model is built from it. `disable()` does not undo spec changes (the spec is yours; rebuild it).
    moe_transport: "nvlink" | "collective" | None (Buffer's choice: TURBO_DIST_MOE_TRANSPORT, else nvlink
        with peer access and a buffer, else collective).
    moe_num_nvl_bytes: size of the symmetric buffer; default Megatron's DeepEP-style hint. Our nvlink
        transport sizes by token count: `Buffer.get_nvl_buffer_size_hint(max_tokens_per_rank, hidden,
        ep_size, topk)` fits any routing of up to that many tokens.
    """
    if (async_tp or cp_attention) and layer_spec is None:
        raise ValueError("enable(async_tp=True / cp_attention=True) needs layer_spec=: "
                         + (_ASYNC_TP_REASON if async_tp else _CP_REASON))
    specs = list(layer_spec) if isinstance(layer_spec, (list, tuple)) else [layer_spec]
    if layer_spec is not None and not (async_tp or cp_attention):
        raise ValueError("enable(layer_spec=...) without async_tp=True or cp_attention=True changes nothing")
    if moe_transport not in (None, "nvlink", "collective"):
        raise ValueError(f"moe_transport must be None, 'nvlink' or 'collective', got {moe_transport!r}")
    if moe_num_nvl_bytes is not None and (not isinstance(moe_num_nvl_bytes, int) or moe_num_nvl_bytes < 0):
        raise ValueError(f"moe_num_nvl_bytes must be None or an int >= 0, got {moe_num_nvl_bytes!r}")
    for spec in specs if layer_spec is not None else []:
        if async_tp:
            use_turbo_dist_linears(spec)
            _state["async_tp"] = True
        if cp_attention:
            use_turbo_dist_core_attention(spec)
            _state["cp_attention"] = True
    if moe_dispatcher:
        if _state["moe_dispatcher"]:
            log.info("turbo_dist.integrations.megatron: MoE dispatcher already enabled")
        else:
            _enable_moe_dispatcher(moe_transport, moe_num_nvl_bytes)
    return enabled()


def _enable_moe_dispatcher(transport, num_nvl_bytes):
    missing = [n for n in ("FusedDispatch", "FusedCombine", "get_buffer") if not hasattr(_fused_a2a, n)]
    if missing or not hasattr(_token_dispatcher, "_DeepepManager"):
        raise RuntimeError(
            f"megatron-core {_megatron_version()} does not have the DeepEP hook turbo_dist plugs into "
            f"(missing {missing or ['token_dispatcher._DeepepManager']}); tested versions: {TESTED_VERSIONS}"
        )
    version = _megatron_version()
    if version not in TESTED_VERSIONS:
        log.warning("turbo_dist.integrations.megatron: megatron-core %s is not a tested version %s", version,
                    TESTED_VERSIONS)
    if getattr(_fused_a2a, "HAVE_DEEP_EP", False):
        log.info("turbo_dist.integrations.megatron: deep_ep is installed; replacing it for the flex dispatcher")
    _state.update(transport=transport, num_nvl_bytes=num_nvl_bytes, buffer=None, num_sms=Buffer.num_sms)
    for name, value in (("Buffer", Buffer), ("EventOverlap", EventOverlap), ("EventHandle", event_handle),
                        ("get_buffer", get_buffer), ("fused_dispatch", fused_dispatch),
                        ("fused_combine", fused_combine), ("set_deepep_num_sms", set_deepep_num_sms),
                        ("HAVE_DEEP_EP", True)):
        _rebind(_fused_a2a, name, value)
    # token_dispatcher bound these three at import (`from ...fused_a2a import ...`): rebind its copies too.
    for name, value in (("fused_dispatch", fused_dispatch), ("fused_combine", fused_combine),
                        ("set_deepep_num_sms", set_deepep_num_sms)):
        _rebind(_token_dispatcher, name, value)
    _state["moe_dispatcher"] = True
    log.info("turbo_dist.integrations.megatron: flex/deepep token dispatcher -> turbo_dist.moe.Buffer "
             "(transport=%s, megatron-core %s)", transport or "auto", version)


def disable():
    """Undo `enable(moe_dispatcher=True)`: every rebound name gets its previous value (or is deleted if it
    had none). Layer specs changed by async_tp / cp_attention stay changed."""
    while _swaps:
        module, name, old = _swaps.pop()
        if old is _ABSENT:
            delattr(module, name)
        else:
            setattr(module, name, old)
        log.info("turbo_dist.integrations.megatron: restored %s.%s = %s", module.__name__, name, _qualname(old))
    if _state["num_sms"] is not None:
        Buffer.num_sms = _state["num_sms"]
    _state.update(moe_dispatcher=False, buffer=None, transport=None, num_nvl_bytes=None, num_sms=None,
                  async_tp=False, cp_attention=False)


def enabled():
    """{"moe_dispatcher", "async_tp", "cp_attention"}: bools; the last two: applied to a layer spec since
    the last `disable()`."""
    return {k: _state[k] for k in ("moe_dispatcher", "async_tp", "cp_attention")}


# ---------------------------------------------------------------------------------------------- async TP
def _weight_grad(weight, compute, fusion):
    """dW = compute(out_dtype) ([N, K]), Megatron's way: returned as the weight's grad, or with
    gradient_accumulation_fusion added into weight.main_grad (computed in main_grad's dtype: fp32 accumulation)
    and a placeholder returned where Megatron's DDP expects one (`grad_added_to_main_grad`), as
    LinearWithGradAccumulationAndAsyncCommunication does."""
    if not fusion:
        return compute(None)
    if hasattr(weight, "__fsdp_param__"):  # Megatron-FSDP: the buffer is handed out per call, overwritten
        weight.main_grad = weight.get_main_grad()
        weight.main_grad.copy_(compute(weight.main_grad.dtype))
    else:
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            raise RuntimeError("gradient_accumulation_fusion: the weight has no main_grad buffer (Megatron's DDP "
                               "wrapper creates it); wrap the model or turn the fusion off")
        if main_grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"gradient_accumulation_fusion: unsupported main_grad dtype {main_grad.dtype}")
        main_grad.add_(compute(main_grad.dtype))
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    shape, dev = weight.main_grad.shape, weight.main_grad.device
    dummy = (torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty)(shape, dtype=weight.dtype,
                                                                                        device=dev)
    weight.grad_added_to_main_grad = True
    return dummy


class _AllGatherLinear(torch.autograd.Function):
    """y [s, b, n] = all_gather_seq(x [s/tp, b, h]) @ w.T (+ bias); dx by GEMM + reduce-scatter, both fused; dW
    from the 1/tp of the gathered input the forward keeps (turbo_dist.tp.wgrad: Megatron's activation memory),
    gathered again under the weight-gradient GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, fusion=False, keep=True):
        s, b, h = x.shape
        x2 = x.reshape(s * b, h)
        a_full, (y,) = _tp.all_gather_matmul(x2, [weight.t()], gather_dim=0, group=group)
        kept, ctx.kept_how = _wgrad.keep_input(group, x2, a_full, 0) if keep else (None, None)
        ctx.save_for_backward(kept, weight)
        ctx.group, ctx.has_bias, ctx.fusion = group, bias is not None, fusion
        y = y.view(-1, b, weight.shape[0])
        return y + bias if bias is not None else y

    @staticmethod
    @first_order_only("turbo_dist Megatron linear (async TP)")
    def backward(ctx, dy):
        kept, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _tp.matmul_reduce_scatter(dy2, weight, scatter_dim=0, group=ctx.group)
            dx = dx.view(-1, dy.shape[1], weight.shape[1])
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(weight, lambda dt: _wgrad.weight_grads(ctx.group, kept, ctx.kept_how, [dy2],
                                                                     out_dtype=dt)[0], ctx.fusion)
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


class _LinearReduceScatter(torch.autograd.Function):
    """y [s/tp, b, n] = reduce_scatter_seq(x [s, b, k/tp] @ w.T); dx by all-gather + GEMM, both fused."""

    @staticmethod
    def forward(ctx, x, weight, group, fusion=False):
        s, b, k = x.shape
        x2 = x.reshape(s * b, k)
        y = _tp.matmul_reduce_scatter(x2, weight.t(), scatter_dim=0, group=group)
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight)
        ctx.group, ctx.x_shape, ctx.fusion = group, x.shape, fusion
        return y.view(-1, b, weight.shape[0])

    @staticmethod
    @first_order_only("turbo_dist Megatron linear (async TP)")
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy_full, (dx,) = _tp.all_gather_matmul(dy.reshape(-1, dy.shape[-1]).contiguous(), [weight], gather_dim=0,
                                               group=ctx.group)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(weight, lambda dt: _ops.gemm(dy_full, x2, trans_a=True, out_dtype=dt), ctx.fusion)
        return dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None, dw, None, None


_NOTED = set()


def _note_own_path(layer, why):
    """Log once per class that Megatron's own implementation ran instead of turbo_dist's."""
    name = type(layer).__name__
    if name not in _NOTED:
        _NOTED.add(name)
        log.info("%s: %s; Megatron's own implementation runs (nothing on turbo_dist.tp)", name, why)


def _check_fusable(layer, grad_output_buffer=None):
    if grad_output_buffer is not None:
        raise NotImplementedError(f"{type(layer).__name__}: defer_embedding_wgrad_compute is not supported")


class TurboDistColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear; with sequence_parallel its all-gather + GEMM runs on turbo_dist.tp.

    input [s/tp, b, h] -> output [s, b, n/tp] (Megatron's SP layout). Without sequence parallelism there is
    no all-gather to overlap and Megatron's own implementation runs unchanged.
    """

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      **kwargs):
        if not sequence_parallel:
            _note_own_path(self, "sequence_parallel is off (no all-gather to overlap)")
            return super()._forward_impl(input=input, weight=weight, bias=bias,
                                         gradient_accumulation_fusion=gradient_accumulation_fusion,
                                         allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                                         grad_output_buffer=grad_output_buffer,
                                         wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group, **kwargs)
        _check_fusable(self, grad_output_buffer)
        if input.dim() != 3:
            raise ValueError(f"{type(self).__name__}: input must be [s/tp, b, h], got {tuple(input.shape)}")
        return _AllGatherLinear.apply(input, weight, bias, tp_group if tp_group is not None else self.tp_group,
                                      bool(gradient_accumulation_fusion), _wgrad.needed(weight))


class TurboDistRowParallelLinear(RowParallelLinear):
    """Megatron's RowParallelLinear; with sequence_parallel its GEMM + reduce-scatter runs on turbo_dist.tp.

    input [s, b, k/tp] -> output [s/tp, b, n]. Other configurations run Megatron's implementation.
    """

    def forward(self, input_):
        if not self.sequence_parallel or self.explicit_expert_comm or not self.input_is_parallel:
            _note_own_path(self, f"sequence_parallel={self.sequence_parallel}, explicit_expert_comm="
                                 f"{self.explicit_expert_comm}, input_is_parallel={self.input_is_parallel}")
            return super().forward(input_)
        if input_.dim() != 3:
            raise ValueError(f"{type(self).__name__}: input must be [s, b, k/tp], got {tuple(input_.shape)}")
        output_ = _LinearReduceScatter.apply(input_, self.weight, self.tp_group, bool(self.gradient_accumulation_fusion))
        if not self.skip_bias_add:
            return (output_ + self.bias if self.bias is not None else output_), None
        return output_, self.bias


def use_turbo_dist_linears(layer_spec):
    """Swap Megatron's ColumnParallelLinear/RowParallelLinear in a layer spec (attention linear_qkv/linear_proj,
    MLP linear_fc1/linear_fc2) for the turbo_dist subclasses; returns the spec. Expert MLPs are left alone."""
    swapped = []
    for path in ("self_attention", "mlp"):
        sub = getattr(getattr(layer_spec.submodules, path, None), "submodules", None)
        if sub is None:
            continue
        for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
            cls = getattr(sub, name, None)
            new = {ColumnParallelLinear: TurboDistColumnParallelLinear,
                   RowParallelLinear: TurboDistRowParallelLinear}.get(cls) if isinstance(cls, type) else None
            if new is not None:
                setattr(sub, name, new)
                swapped.append(f"{path}.{name}")
    if not swapped:
        raise TypeError("use_turbo_dist_linears: the spec has no Megatron ColumnParallelLinear/RowParallelLinear "
                        "(TransformerEngine specs use TE's fused layers, which turbo_dist does not replace)")
    log.info("turbo_dist.integrations.megatron: layer spec %s -> turbo_dist.tp linears", ", ".join(swapped))
    return layer_spec


# ---------------------------------------------------------------------------------------------- CP attention
_CP_COMM_TYPES = {None: "ring", "p2p": "ring", "a2a": "a2a", "all_gather": "allgather"}


class TurboDistCoreAttention(MegatronModule):
    """Megatron core attention (the `core_attention` of a layer spec) on turbo_dist, context-parallel aware.

    Same constructor and forward signature as Megatron's DotProductAttention / TEDotProductAttention.
    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn] (GQA: np % ng == 0), attention_mask (ignored:
    the mask type decides), attn_mask_type) -> [sq, b, np * hn]. With context_parallel_size > 1 the inputs
    are this rank's zigzag shard of the sequence (Megatron's get_batch_on_this_cp_rank layout) and the
    attention spans the whole sequence over the CP group: cp_comm_type "p2p" (ring), "a2a" (Ulysses) or
    "all_gather". Supported: causal or no mask, no dropout, vanilla softmax, no sliding window, no attention
    bias; packed sequences (PackedSeqParams, qkv_format "thd": query [t, np, hn] -> [t, np * hn]), with
    context parallelism in Megatron's THD layout through any of the three; anything else raises
    NotImplementedError.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError(f"TurboDistCoreAttention: attention dropout {dropout} (set attention_dropout=0)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"TurboDistCoreAttention: attn_mask_type {attn_mask_type} (causal or no_mask)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise NotImplementedError("TurboDistCoreAttention: only vanilla softmax without a sliding window")
        if isinstance(cp_comm_type, list):
            cp_comm_type = cp_comm_type[max(1, layer_number) - 1] if cp_comm_type else None
        if cp_comm_type not in _CP_COMM_TYPES:
            raise NotImplementedError(f"TurboDistCoreAttention: cp_comm_type {cp_comm_type!r}; supported: "
                                      "'p2p' (ring), 'a2a', 'all_gather'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.cp_comm_type = _CP_COMM_TYPES[cp_comm_type]
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling: Megatron divides the scores' scale by the layer number for fp16 range and
        # multiplies it back inside its softmax (FusedScaleMaskSoftmax(scale=layer_number)): the net scale is this
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = _parallel_state.get_context_parallel_group()
        self.cp_group = cp_group if config.context_parallel_size > 1 else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise NotImplementedError("TurboDistCoreAttention: attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, mask_type == AttnMaskType.causal, packed_seq_params)
        if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
            raise ValueError(f"expected query [sq, b, np, hn] and key/value [sk, b, ng, hn], got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        bundle = None if self.cp_group is None else {"cp_group": self.cp_group, "cp_comm_type": self.cp_comm_type,
                                                     "load_balance": True}  # Megatron's zigzag CP shards
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))  # -> [b, s, heads, hn]
        out = flash_attn_func(q, k, v, softmax_scale=self.softmax_scale, causal=mask_type == AttnMaskType.causal,
                              cp_param_bundle=bundle)
        sq, b, heads, hn = query.shape
        return out.transpose(0, 1).reshape(sq, b, heads * hn)

    def _forward_packed(self, query, key, value, causal, params):
        """THD: query [t, np, hn], key/value [t, ng, hn], sequences at cu_seqlens (their padded layout when
        Megatron pads each sequence: real tokens first, padding after) -> [t, np * hn]."""
        if getattr(params, "qkv_format", None) != "thd":
            raise NotImplementedError(f"TurboDistCoreAttention: packed qkv_format {params.qkv_format!r} (thd only)")
        bundle = None
        if self.cp_group is not None:  # Megatron's THD CP layout: chunks r and 2cp-1-r of every sequence
            bundle = {"cp_group": self.cp_group, "cp_comm_type": self.cp_comm_type, "load_balance": True}
        if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
            raise ValueError(f"thd expects query [t, np, hn] and key/value [t, ng, hn], got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        # (values compared on the host, read back once per cu_seqlens tensor: every layer gets the same params)
        padded = any(p is not None and p is not c and host_values(p) != host_values(c) for p, c in (
            (params.cu_seqlens_q_padded, params.cu_seqlens_q), (params.cu_seqlens_kv_padded, params.cu_seqlens_kv)))
        if padded and not causal:
            # causal: a real token never sees the padding after it in its slot; without a mask it would
            raise NotImplementedError("TurboDistCoreAttention: padded thd sequences (cu_seqlens_*_padded != "
                                      "cu_seqlens_*) need a causal mask")
        out = flash_attn_varlen_func(query, key, value, _on(cu_q, query.device), _on(cu_k, query.device), None, None,
                                     softmax_scale=self.softmax_scale, causal=causal, cp_param_bundle=bundle)
        return out.reshape(out.shape[0], -1)


def _on(cu, device):
    """cu_seqlens on `device`: one copy per cu tensor (the same for every layer, so the packed path's plan, kept
    per tensor, is made once per batch)."""
    if not isinstance(cu, torch.Tensor) or cu.device == torch.device(device):
        return cu
    return memo(cu, ("on", str(device)), lambda: device_ints(host_values(cu), cu.dtype, device, remember=True))


def use_turbo_dist_core_attention(layer_spec):
    """Point a Megatron transformer-layer spec's self-attention at TurboDistCoreAttention (returns the spec)."""
    try:
        submodules = layer_spec.submodules.self_attention.submodules
        _ = submodules.core_attention
    except AttributeError as exc:
        raise TypeError("use_turbo_dist_core_attention expects a transformer-layer ModuleSpec with "
                        "submodules.self_attention.submodules.core_attention") from exc
    log.info("turbo_dist.integrations.megatron: layer spec core_attention %s -> TurboDistCoreAttention",
             _qualname(submodules.core_attention))
    submodules.core_attention = TurboDistCoreAttention
    return layer_spec


__all__ = ["enable", "disable", "enabled", "TurboDistColumnParallelLinear", "TurboDistRowParallelLinear",
           "use_turbo_dist_linears", "TurboDistCoreAttention", "use_turbo_dist_core_attention", "get_buffer",
           "fused_dispatch", "fused_combine", "set_deepep_num_sms", "event_handle", "TESTED_VERSIONS"]
