"""ring-flash-attn's Hugging Face adapter (`ring_flash_attn.adapters.hf_adapter`) on turbo_dist's llama3 context
parallelism: a transformers model's attention runs over a packed row sharded across `process_group`.

    from turbo_dist.cp.hf_adapter import ATTN_IMPLEMENTATION, substitute_hf_flash_attn, update_ring_flash_attn_params
    substitute_hf_flash_attn(cp_group, heads_k_stride=1)   # once, before the model is built
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION)  # or "flash_attention_2"
    for cu_seqlens, input_ids, position_ids in batches:     # one packed row [1, T]; T % cp == 0 (pad it)
        update_ring_flash_attn_params(cu_seqlens, cp_group) # global cu_seqlens [num_docs + 1] of the row
        per = T // cp; mine = slice(cp_rank * per, (cp_rank + 1) * per)
        logits = model(input_ids[:, mine], position_ids=position_ids[:, mine], use_cache=False).logits

The contract of ring-flash-attn's adapter, on transformers' attention-interface API (`AttentionInterface`,
`ALL_ATTENTION_FUNCTIONS`, `masking_utils.AttentionMaskInterface`: transformers 5.x; tested with 5.25.0; a
transformers without them raises ImportError naming its version):
- `update_ring_flash_attn_params(cu_seqlens, process_group)`: the plan of this rank for the next forward/backward
  (`llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal=True, rank, world_size)`); rank r holds the contiguous
  shard r of the packed tokens. Documents are those of cu_seqlens (position_ids only feed the rotary embedding).
- `substitute_hf_flash_attn(process_group, heads_k_stride)`: the "flash_attention_2" attention function runs
  `llama3_flash_attn_varlen_func` on `process_group` with that plan (K/V all-gathered `heads_k_stride` kv heads at a
  time) while `use_ring_attn(True)` (the default), transformers' own function after `use_ring_attn(False)`. It also
  registers "turbo_dist_ring" (`ATTN_IMPLEMENTATION`): the same ring attention under a name of ours, usable as
  `attn_implementation=` without the flash_attn package (transformers checks for it behind "flash_attention_2"),
  with flash_attention_2's masks (none for a packed row). That name has no non-ring path: with the switch off it
  raises (switch the model with `model.set_attn_implementation("sdpa")` instead).
- `restore_hf_flash_attn()` (ours): puts transformers' functions back and forgets the plan and the group.

fp32 queries (norms kept in fp32, as PEFT does) are cast to the dtype flash attention would run in (autocast's,
else the module's Linear weights') and the output back to fp32, as ring-flash-attn's adapter does.

Per layer call the plan's boundaries are checked from their host copy (kept by update_ring_flash_attn_params): no
read-back from the device; the one device sync left is the group's refusal flag (llama3's one-int all-reduce).

Refused while the ring is on, never replaced by attention that is not the ring's: non-causal modules
(NotImplementedError), dropout > 0 (a training model with attention_dropout), softcap, attention sinks (s_aux),
a sliding window shorter than the longest document, a padding mask (attention_mask with zeros: make the padding a
document of its own in cu_seqlens), keys longer than the queries (a KV cache); ValueError for a batch of more than
one row, no plan, a plan for another group, a shard whose length is not the plan's, and calls before
`substitute_hf_flash_attn`. The checks of the model's arguments are the same on every rank; a shard of the wrong
length makes every rank of the group raise together (llama3_flash_attn_varlen_func's collective check).
"""
import logging
import operator

import torch
import torch.distributed as dist

from turbo_dist.ops._host import device_ints

log = logging.getLogger("turbo_dist")

ATTN_IMPLEMENTATION = "turbo_dist_ring"
_FA2 = "flash_attention_2"

# Process-wide, as ring-flash-attn's: the adapter is set up once, the plan changes with every packed batch.
_state = {"group": None, "ranks": None, "heads_k_stride": None, "saved": None, "plan": None, "switch": True}


def _hf_api():
    """(version, ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface);
    transformers is optional: imported here, on first use."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("turbo_dist.cp.hf_adapter needs transformers (pip install transformers); it is not "
                          f"importable here: {exc}") from exc
    version = getattr(transformers, "__version__", "unknown")
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError as exc:
        raise ImportError(f"turbo_dist.cp.hf_adapter needs transformers' attention-interface API "
                          f"(modeling_utils.AttentionInterface / ALL_ATTENTION_FUNCTIONS, masking_utils."
                          f"AttentionMaskInterface); transformers {version} does not have it ({exc}): upgrade "
                          "transformers (5.x)") from exc
    return version, ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _group_ranks(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("the Hugging Face ring adapter needs torch.distributed initialized (init_process_group) "
                         "before substitute_hf_flash_attn / update_ring_flash_attn_params")
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not in the process group it was given")
    return tuple(dist.get_process_group_ranks(group))


# ----------------------------------------------------------------------------------------------- public surface
def update_ring_flash_attn_params(cu_seqlens, process_group):
    """Sets the plan of the next forward/backward: cu_seqlens [num_docs + 1] int32/int64, the GLOBAL boundaries of
    the packed row (0, ..., T; the same on every rank; T divisible by the group size), rank r of `process_group`
    (None: the default group) holding the contiguous tokens r*T/W .. (r+1)*T/W. Causal."""
    from .ring_flash_attn import _llama3_plan

    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be a 1-D int32/int64 tensor [num_docs + 1] of the packed row's global "
                        "document boundaries, got " + (f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
                                                       if isinstance(cu_seqlens, torch.Tensor) else
                                                       type(cu_seqlens).__name__))
    ranks = _group_ranks(process_group)
    group = dist.group.WORLD if process_group is None else process_group
    rank, world = dist.get_rank(group), len(ranks)
    bounds = [int(c) for c in cu_seqlens.tolist()]  # read once; the plan is made on the host
    # (llama3_flash_attn_prepare_cu_seqlens' plan and checks: boundaries from 0, not decreasing, the packed length
    # divisible by the group size)
    host_q, host_k, max_q, max_k, k_slice = _llama3_plan(bounds, True, rank, world)
    cu_q, cu_k = (device_ints(c, cu_seqlens.dtype, cu_seqlens.device) for c in (host_q, host_k))  # no stream wait
    # the plan's boundaries also kept on the host: every layer's check reads them there, not back from the GPU
    _state["plan"] = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "host_cu": (host_q, host_k),
                      "max_seqlen_q": max_q, "max_seqlen_k": max_k,
                      "local_k_slice": k_slice, "ranks": ranks, "rank": rank, "total": bounds[-1],
                      "local_tokens": bounds[-1] // world,
                      "longest": max(b - a for a, b in zip(bounds, bounds[1:]))}


def use_ring_attn(flag):
    """Switches the substituted "flash_attention_2" between ring attention (True, the default) and transformers'
    own flash attention on this process's tokens alone (False)."""
    _state["switch"] = bool(flag)


def substitute_hf_flash_attn(process_group, heads_k_stride):
    """Makes transformers' "flash_attention_2" attention, and the name `ATTN_IMPLEMENTATION` ("turbo_dist_ring"),
    ring attention over `process_group` (None: the default group) with the plan of update_ring_flash_attn_params.
    heads_k_stride: kv heads all-gathered at a time (a divisor of the model's kv heads; the gathered buffer holds
    that many). Call it before building a model with attn_implementation=ATTN_IMPLEMENTATION (transformers
    validates the name then); calling it again changes the group / stride."""
    _, functions, interface_cls, masks, mask_cls = _hf_api()
    if isinstance(heads_k_stride, bool):
        raise TypeError("heads_k_stride must be an int, got a bool")
    try:
        stride = operator.index(heads_k_stride)
    except TypeError:
        raise TypeError(f"heads_k_stride must be an int, got {type(heads_k_stride).__name__}") from None
    if stride < 1:
        raise ValueError(f"heads_k_stride must be >= 1 (a divisor of the model's kv heads), got {stride}")
    ranks = _group_ranks(process_group)
    if _state["saved"] is None:
        # the class-wide entry (what every AttentionInterface instance falls back to), the one the shared
        # instance answers (a local override, e.g. another adapter's, wins there) and whether that was local
        _state["saved"] = (interface_cls()[_FA2], functions[_FA2], _FA2 in functions._local_mapping)
        interface_cls.register(_FA2, _flash_attention_2_entry)
        functions[_FA2] = _flash_attention_2_entry
    interface_cls.register(ATTN_IMPLEMENTATION, _named_entry)
    mask_cls.register(ATTN_IMPLEMENTATION, masks[_FA2])  # flash attention's masks: none unless there is padding
    _state.update(group=process_group, ranks=ranks, heads_k_stride=stride)
    log.info("hf_adapter: %s and %s run ring attention over ranks %s (heads_k_stride=%d)", _FA2,
             ATTN_IMPLEMENTATION, list(ranks), stride)


def restore_hf_flash_attn():
    """Undoes substitute_hf_flash_attn (transformers' "flash_attention_2" back; "turbo_dist_ring" stays registered
    and raises until the next substitution) and forgets the plan. Not in ring-flash-attn."""
    if _state["saved"] is not None:
        _, functions, interface_cls, _, _ = _hf_api()
        class_wide, shared, was_local = _state["saved"]
        interface_cls.register(_FA2, class_wide)
        if was_local:
            functions[_FA2] = shared
        else:  # no local override of ours left behind: a later AttentionInterface.register reaches the models
            functions._local_mapping.pop(_FA2, None)
    _state.update(group=None, ranks=None, heads_k_stride=None, saved=None, plan=None, switch=True)


# ---------------------------------------------------------------------------------------------- attention entries
def _flash_attention_2_entry(module, query, key, value, attention_mask, *args, **kwargs):
    if not _state["switch"]:
        return _state["saved"][1](module, query, key, value, attention_mask, *args, **kwargs)
    return ring_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _named_entry(module, query, key, value, attention_mask, *args, **kwargs):
    if not _state["switch"]:
        raise ValueError(f'use_ring_attn(False): "{ATTN_IMPLEMENTATION}" has no attention other than the ring; '
                         'switch the model to another implementation (model.set_attn_implementation("sdpa")) for '
                         "unsharded runs")
    return ring_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _target_dtype(query, module):
    """The dtype flash attention runs fp32 queries in: autocast's, a quantized model's, else its Linear weights'."""
    if query.dtype != torch.float32:
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    config = getattr(module, "config", None)
    if getattr(config, "_pre_quantization_dtype", None) is not None:
        return config._pre_quantization_dtype
    if getattr(config, "_is_quantized", False):
        return config.dtype
    linear = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return torch.float32 if linear is None else linear.weight.dtype


def _active_plan():
    """(group, heads_k_stride, plan), or ValueError naming the missing step."""
    if _state["ranks"] is None:
        raise ValueError("the ring attention adapter is not set up: call turbo_dist.cp.hf_adapter."
                         "substitute_hf_flash_attn(process_group, heads_k_stride) first")
    plan = _state["plan"]
    if plan is None:
        raise ValueError("no ring attention plan: call update_ring_flash_attn_params(cu_seqlens, process_group) "
                         "with the packed batch's global cu_seqlens before the forward")
    if plan["ranks"] != _state["ranks"]:
        raise ValueError(f"the plan of update_ring_flash_attn_params is for the group of ranks {list(plan['ranks'])} "
                         f"(size {len(plan['ranks'])}), but substitute_hf_flash_attn set up ring attention over "
                         f"ranks {list(_state['ranks'])}: pass the same process group to both")
    return _state["group"], _state["heads_k_stride"], plan


def ring_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-interface function on ring attention: query [1, Hq, S/W, D], key/value
    [1, Hkv, S/W, D] (this rank's contiguous shard of the packed row, as the plan says), attention_mask None;
    returns (out [1, S/W, Hq, D], None). scaling: default 1/sqrt(D); is_causal (kwarg) defaults to
    module.is_causal. Other kwargs (position_ids, output_attentions, ...) are not used."""
    from .ring_flash_attn import _llama3

    group, stride, plan = _active_plan()  # process-wide state, the same on every rank that set it up alike
    original_dtype, v_dim = getattr(query, "dtype", None), getattr(value, "shape", (0,))[-1]
    # What this rank's arguments would refuse (a padding mask on one rank's slice only, a shard of another length)
    # can differ between ranks: the error is raised inside the llama3 call after the group's flag all-reduce, on
    # every rank together, instead of here, where the other ranks would wait in the K/V all-gather.
    refused = q = k = v = None
    try:
        q, k, v = _checked_inputs(module, query, key, value, attention_mask, dropout, sliding_window, softcap, plan,
                                  kwargs)
    except (ValueError, NotImplementedError) as exc:
        refused = exc
    if q is not None and plan["cu_seqlens_q"].device != q.device:  # moved once per plan
        plan["cu_seqlens_q"], plan["cu_seqlens_k"] = (device_ints(c, plan["cu_seqlens_q"].dtype, q.device)
                                                      for c in plan["host_cu"])
    out = _llama3(q, k, v, plan["cu_seqlens_q"], plan["cu_seqlens_k"], plan["max_seqlen_q"], plan["max_seqlen_k"],
                  stride, plan["local_k_slice"], 0.0, scaling, True, (-1, -1), None, False, False, group,
                  refused=refused, host_cu=plan["host_cu"], per_call=True)
    out = out[..., :v_dim].unsqueeze(0).to(original_dtype)
    return out, None


def _checked_inputs(module, query, key, value, attention_mask, dropout, sliding_window, softcap, plan, kwargs):
    """This rank's (q, k, v) [S/W, H, D] in the dtype flash attention would run, or the error refusing the call."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"ring attention takes one packed row (batch 1: the documents in cu_seqlens), got batch "
                         f"{query.shape[0]}: pack the batch into one row")
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if not is_causal:
        raise NotImplementedError(f"ring attention is causal only ({type(module).__name__} is not causal)")
    if dropout:
        raise NotImplementedError(f"attention dropout ({dropout}) is not supported by ring attention: set the "
                                  "model's attention_dropout to 0")
    if softcap is not None:
        raise NotImplementedError(f"attention logit softcapping (softcap={softcap}) is not supported by ring "
                                  "attention")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by ring attention")
    if attention_mask is not None:
        raise NotImplementedError(
            f"ring attention applies no attention mask (got {type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}): its documents are update_ring_flash_attn_params' "
            "cu_seqlens. For padding, make the pad tokens a document of their own in cu_seqlens and pass no "
            "attention_mask (or all ones)")
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(f"keys ({key.shape[2]}) and queries ({query.shape[2]}) of different lengths (a KV "
                                  "cache, generation): ring attention takes the shard's own keys only")
    if sliding_window is not None and plan["longest"] > sliding_window:
        # a window at least the longest document's length masks nothing: the plain causal mask is exact
        raise NotImplementedError(f"sliding-window attention (window {sliding_window} < the longest document, "
                                  f"{plan['longest']} tokens) is not supported by ring attention")
    chunk = _attention_chunk(module)
    if chunk is not None and plan["longest"] > chunk:  # Llama 4's chunked layers: causal within chunks only
        raise NotImplementedError(f"chunked attention (attention_chunk_size {chunk} < the longest document, "
                                  f"{plan['longest']} tokens) is not supported by ring attention")
    if query.shape[2] != plan["local_tokens"]:
        raise ValueError(f"this rank's shard has {query.shape[2]} tokens, but the plan (update_ring_flash_attn_params"
                         f") gives rank {plan['rank']} of {len(plan['ranks'])} the {plan['local_tokens']} tokens "
                         f"{plan['rank'] * plan['local_tokens']}..{(plan['rank'] + 1) * plan['local_tokens']} of "
                         f"the packed {plan['total']}: shard the row contiguously and update the plan for every "
                         "batch")
    head_dim, v_dim = query.shape[-1], value.shape[-1]
    if v_dim > head_dim or key.shape[-1] != head_dim:
        raise NotImplementedError(f"value / key head dims ({v_dim} / {key.shape[-1]}) other than the query's "
                                  f"({head_dim}) are not supported (only smaller value heads, zero-padded)")

    dtype = _target_dtype(query, module)

    def packed(t):  # [1, H, S, D] -> [S, H, D]
        return t[0].transpose(0, 1).to(dtype).contiguous()

    q, k, v = packed(query), packed(key), packed(value)
    if v_dim < head_dim:  # as transformers' flash path: pad the value heads, crop the output
        v = torch.nn.functional.pad(v, (0, head_dim - v_dim))
    return q, k, v


def _attention_chunk(module):
    """The attention chunk size of a chunked-attention layer (Llama 4: config.attention_chunk_size on the layers
    config.layer_types names "chunked_attention"; every layer when the config does not say which), else None."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None:
        return None
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and idx is not None and 0 <= idx < len(types):
        return chunk if types[idx] == "chunked_attention" else None
    return chunk


__all__ = ["ATTN_IMPLEMENTATION", "substitute_hf_flash_attn", "update_ring_flash_attn_params", "use_ring_attn",
           "restore_hf_flash_attn", "ring_attention_forward"]
