"""Megatron-core (tested: 0.16.1) with turbo_dist switched on by `turbo_dist.integrations.megatron.enable(...)`.

CPU (gloo): Megatron's own `MoEFlexTokenDispatcher` (its class, its `FusedDispatch`/`FusedCombine` autograd
functions, turbo_dist.moe.Buffer underneath after `enable()`) carries tokens to tiny linear experts and back on
2 and 4 ranks; output and the gradients of hidden states, routing probabilities and expert weights match a dense
single-process reference that every rank computes from all ranks' seeded inputs. The sequence-parallel linears
(TP=2) and the CP core attention (CP=2; cp_comm_type p2p / a2a / all_gather on Megatron's zigzag shards) are
checked against plain PyTorch references.
Megatron's own paths cannot be the CPU reference: `MoEAlltoAllTokenDispatcher` creates a `torch.cuda.Stream` in
its constructor, `MoEAllGatherTokenDispatcher` allocates on `torch.cuda.current_device()`, the router moves its
weight to CUDA, the SP linears all-gather into the global CUDA memory buffer, and `DotProductAttention` uses that
buffer too (and needs CP=1). Those comparisons are GPU-marked: MoELayer flex-on-turbo_dist vs Megatron's alltoall
dispatcher (2 GPUs), SP linears vs Megatron's (2 GPUs), core attention vs DotProductAttention at CP=1 (1 GPU).
"""
import importlib.util
import subprocess
import sys

import pytest
import torch

_HAVE_MEGATRON = (importlib.util.find_spec("megatron") is not None
                  and importlib.util.find_spec("megatron.core") is not None)
needs_megatron = pytest.mark.skipif(not _HAVE_MEGATRON,
                                    reason="megatron-core not installed (pip install -e '.[megatron]')")

from turbo_dist.testing import run_distributed  # noqa: E402

from dist_utils import saved_activation_numel  # noqa: E402

HIDDEN, NUM_EXPERTS, TOPK, TOKENS = 16, 4, 2, 8
# Megatron's flex dispatcher preprocess is torch.compile'd (jit_fuser); compiling it on 2 shared CPU
# cores costs more than the whole test, and it is Megatron's code either way.
_ENV = {"TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}


def _routing(rank, num_tokens, num_experts, topk):
    """Megatron router output for `rank`: probs [T, E] fp32 (top-k softmax scattered), routing_map [T, E] bool."""
    g = torch.Generator().manual_seed(100 + rank)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    top_p, top_i = torch.softmax(logits, -1).topk(topk, dim=-1)
    probs = torch.zeros(num_tokens, num_experts).scatter(1, top_i, top_p)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, top_i, True)
    return probs, routing_map


def _moe_config(dispatcher_type, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN, num_attention_heads=2,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=TOPK, moe_token_dispatcher_type=dispatcher_type,
        moe_flex_dispatcher_backend="deepep", moe_router_load_balancing_type="none", moe_router_dtype="fp32",
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32, bf16=False, **extra)


def _expert_weights():
    g = torch.Generator().manual_seed(7)
    return torch.randn(NUM_EXPERTS, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5


def _inputs(rank):
    """hidden [S, B=1, H], probs [S, E], routing_map [S, E] and the loss weights of `rank`."""
    hidden = torch.randn(TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(rank))
    probs, routing_map = _routing(rank, TOKENS, NUM_EXPERTS, TOPK)
    weight = torch.randn(TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(50 + rank))
    return hidden, probs, routing_map, weight


def _reference(world_size):
    """Dense MoE over every rank's tokens in one process: per rank, output and grads (hidden, probs, w)."""
    w = _expert_weights().requires_grad_(True)
    per_rank, loss = [], 0
    for r in range(world_size):
        hidden, probs, routing_map, weight = _inputs(r)
        hidden.requires_grad_(True)
        probs.requires_grad_(True)
        x = hidden.view(TOKENS, HIDDEN)
        expert_out = torch.einsum("th,ehk->tek", x, w)                       # [T, E, H]
        gate = (probs * routing_map).unsqueeze(-1)                             # only routed experts count
        out = (expert_out * gate).sum(1).view_as(hidden)
        loss = loss + (out * weight).sum()
        per_rank.append((hidden, probs, routing_map, out))
    loss.backward()
    local = NUM_EXPERTS // world_size
    return [{"out": out.detach(), "hidden_grad": hidden.grad, "probs_grad": probs.grad,
             "w_grad": w.grad[r * local:(r + 1) * local],
             "counts": sum(_inputs(s)[2].sum(0) for s in range(world_size))[r * local:(r + 1) * local].tolist()}
            for r, (hidden, probs, routing_map, out) in enumerate(per_rank)]


def _dispatcher_step(rank, world_size):
    """One dispatch -> experts -> combine through a Megatron dispatcher class; returns output and grads."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    import turbo_dist.integrations.megatron as tdm

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world_size)
    try:
        local = NUM_EXPERTS // world_size
        local_ids = list(range(rank * local, (rank + 1) * local))
        tdm.enable(moe_dispatcher=True)
        dispatcher = MoEFlexTokenDispatcher(local, local_ids, _moe_config("flex"), get_default_pg_collection())
        w = _expert_weights()[rank * local:(rank + 1) * local].clone().requires_grad_(True)
        hidden, probs, routing_map, weight = _inputs(rank)
        hidden.requires_grad_(True)
        probs.requires_grad_(True)

        h, p = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
        h, p = dispatcher.token_dispatch(h, p)
        h, tokens_per_expert, p = dispatcher.dispatch_postprocess(h, p)
        counts = [int(c) for c in tokens_per_expert.tolist()]
        outs = [x @ w[e] for e, x in enumerate(torch.split(h, counts))]  # a tiny linear expert each
        y = torch.cat(outs) * p.to(h.dtype).unsqueeze(-1)  # Megatron's experts apply the routing probs
        y = dispatcher.combine_preprocess(y)
        y = dispatcher.token_combine(y)
        out = dispatcher.combine_postprocess(y)
        (out * weight).sum().backward()
        return {"out": out.detach(), "hidden_grad": hidden.grad, "probs_grad": probs.grad, "w_grad": w.grad,
                "counts": counts, "enabled": tdm.enabled()}
    finally:
        tdm.disable()
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
def test_flex_dispatcher_on_turbo_dist_matches_reference(world_size):
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) comparison; with GPUs test_moe_layer_flex_matches_alltoall_gpu covers the path")
    ours = run_distributed(_dispatcher_step, world_size, env=_ENV)
    ref = _reference(world_size)
    for rank, (a, b) in enumerate(zip(ours, ref)):
        assert a["enabled"]["moe_dispatcher"]
        assert a["counts"] == b["counts"], f"rank {rank}: tokens per local expert differ"
        assert sum(a["counts"]) > 0
        for key in ("out", "hidden_grad", "probs_grad", "w_grad"):
            assert a[key].shape == b[key].shape, f"rank {rank} {key}: {a[key].shape} vs {b[key].shape}"
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")
        assert a["out"].abs().sum() > 0 and a["probs_grad"].abs().sum() > 0


def _enable_disable(rank, world_size):
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    import turbo_dist.integrations.megatron as tdm
    from turbo_dist.moe import Buffer

    names = ("Buffer", "EventOverlap", "EventHandle", "get_buffer", "fused_dispatch", "fused_combine",
             "set_deepep_num_sms", "HAVE_DEEP_EP")
    before = {n: getattr(fused_a2a, n, "absent") for n in names}
    before_td = {n: getattr(token_dispatcher, n) for n in ("fused_dispatch", "fused_combine", "set_deepep_num_sms")}
    import logging

    seen = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("turbo_dist")
    logger.addHandler(handler)
    # (a framework configuring logging earlier in this pooled process may have disabled existing loggers)
    level, disabled, off = logger.level, logger.disabled, logging.root.manager.disable
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logging.disable(logging.NOTSET)
    try:
        assert tdm.enable() == {"moe_dispatcher": True, "async_tp": False, "cp_attention": False}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
        logging.disable(off)
    assert any("fused_a2a.Buffer" in m for m in seen), seen  # each rebinding is logged
    tdm.enable()  # idempotent: rebinding twice would make disable() restore our own functions
    assert fused_a2a.Buffer is Buffer and token_dispatcher.fused_dispatch is tdm.fused_dispatch
    buf = fused_a2a.get_buffer(torch.distributed.group.WORLD, 2 * HIDDEN)
    assert isinstance(buf, Buffer) and buf.transport == "collective"
    assert fused_a2a.get_buffer(torch.distributed.group.WORLD, 2 * HIDDEN) is buf  # cached like Megatron's
    tdm.disable()
    after = {n: getattr(fused_a2a, n, "absent") for n in names}
    after_td = {n: getattr(token_dispatcher, n) for n in ("fused_dispatch", "fused_combine", "set_deepep_num_sms")}
    assert all(after[n] is before[n] for n in names), (before, after)
    assert all(after_td[n] is before_td[n] for n in before_td)
    return tdm.enabled()


@needs_megatron
@pytest.mark.dist
def test_enable_is_logged_and_reversible():
    out = run_distributed(_enable_disable, 2, env=_ENV)
    assert all(o == {"moe_dispatcher": False, "async_tp": False, "cp_attention": False} for o in out)


@needs_megatron
def test_spec_hooks_need_a_layer_spec():
    import turbo_dist.integrations.megatron as tdm

    with pytest.raises(ValueError, match="use_turbo_dist_linears"):
        tdm.enable(moe_dispatcher=False, async_tp=True)
    with pytest.raises(ValueError, match="TurboDistCoreAttention"):
        tdm.enable(moe_dispatcher=False, cp_attention=True)
    with pytest.raises(ValueError, match="changes nothing"):
        tdm.enable(moe_dispatcher=False, layer_spec=object())
    with pytest.raises(ValueError, match="moe_transport"):
        tdm.enable(moe_transport="rdma")
    assert tdm.enabled() == {"moe_dispatcher": False, "async_tp": False, "cp_attention": False}


@needs_megatron
def test_enable_changes_the_layer_spec_and_logs_it(caplog):
    """enable(async_tp=True, cp_attention=True, layer_spec=...) on Megatron's own local GPT layer spec."""
    import logging

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    import turbo_dist.integrations.megatron as tdm

    spec = get_gpt_layer_local_spec()
    attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    assert (attn.linear_qkv, attn.linear_proj) == (ColumnParallelLinear, RowParallelLinear)
    try:
        with caplog.at_level(logging.INFO, logger="turbo_dist"):
            state = tdm.enable(moe_dispatcher=False, async_tp=True, cp_attention=True, layer_spec=[spec])
        assert state == {"moe_dispatcher": False, "async_tp": True, "cp_attention": True}
        assert (attn.linear_qkv, attn.linear_proj) == (tdm.TurboDistColumnParallelLinear,
                                                      tdm.TurboDistRowParallelLinear)
        assert (mlp.linear_fc1, mlp.linear_fc2) == (tdm.TurboDistColumnParallelLinear, tdm.TurboDistRowParallelLinear)
        assert attn.core_attention is tdm.TurboDistCoreAttention
        assert "turbo_dist.tp linears" in caplog.text and "-> TurboDistCoreAttention" in caplog.text
    finally:
        tdm.disable()
    assert tdm.enabled()["async_tp"] is False


@needs_megatron
def test_enable_logs_each_rebinding(caplog):
    import logging

    import turbo_dist.integrations.megatron as tdm

    with caplog.at_level(logging.INFO, logger="turbo_dist"):
        tdm.enable()
        tdm.disable()
    text = caplog.text
    for name in ("fused_a2a.Buffer", "fused_a2a.get_buffer", "token_dispatcher.fused_dispatch"):
        assert f"{name}: " in text and f"restored megatron.core.transformer.moe.{name}" in text, name
    assert "-> turbo_dist.moe.buffer.Buffer" in text


def test_import_turbo_dist_does_not_import_megatron():
    """Runs with or without the frameworks installed (it only means something with them installed)."""
    code = ("import sys, turbo_dist, turbo_dist.moe, turbo_dist.tp, turbo_dist.cp, turbo_dist.ops, "
            "turbo_dist.integrations; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'torchtitan', 'spmd_types')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_integration_modules_fail_clearly_without_framework():
    """With the frameworks hidden from the import system, importing an integration names its extra."""
    code = ("import sys\n"
            "sys.modules['megatron'] = sys.modules['torchtitan'] = None\n"
            "for name in ('megatron', 'torchtitan'):\n"
            "    try:\n"
            "        __import__('turbo_dist.integrations.' + name)\n"
            "    except ImportError as e:\n"
            "        assert \"pip install 'turbo_dist[%s]'\" % name in str(e), str(e)\n"
            "    else:\n"
            "        raise SystemExit(name + ' imported without the framework')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ async TP
TP_SEQ, TP_BATCH, TP_HIDDEN, TP_FFN = 8, 2, 16, 32


def _tp_params():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(TP_SEQ, TP_BATCH, TP_HIDDEN, generator=g)
    w1, b1 = torch.randn(TP_FFN, TP_HIDDEN, generator=g) / 4, torch.randn(TP_FFN, generator=g)
    w2, b2 = torch.randn(TP_HIDDEN, TP_FFN, generator=g) / 4, torch.randn(TP_HIDDEN, generator=g)
    loss_w = torch.randn(TP_SEQ, TP_BATCH, TP_HIDDEN, generator=g)
    return x, w1, b1, w2, b2, loss_w


def _tp_reference():
    x, w1, b1, w2, b2, loss_w = (t.requires_grad_(True) for t in _tp_params())
    y = (torch.relu(x @ w1.t() + b1) @ w2.t() + b2)
    (y * loss_w).sum().backward()
    return {"y": y.detach(), "x": x.grad, "w1": w1.grad, "b1": b1.grad, "w2": w2.grad, "b2": b2.grad}


def _tp_step(rank, world_size, path="turbo_dist", fusion=False):
    """fc1 -> relu -> fc2 of Megatron's local spec, SP on; path "megatron": Megatron's own linears (CUDA only).
    fusion: gradient_accumulation_fusion, two micro-batches accumulated into fp32 main_grad buffers (set on
    the layers after construction: Megatron's constructor asks for apex's kernel, which our linears do not use)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if device == "cuda":
            model_parallel_cuda_manual_seed(123)
        spec = get_gpt_layer_local_spec()
        mlp = spec.submodules.mlp.submodules
        if path == "turbo_dist":
            assert tdm.enable(moe_dispatcher=False, async_tp=True, layer_spec=spec)["async_tp"]
            assert (mlp.linear_fc1, mlp.linear_fc2) == (tdm.TurboDistColumnParallelLinear,
                                                        tdm.TurboDistRowParallelLinear)
        config = TransformerConfig(num_layers=1, hidden_size=TP_HIDDEN, num_attention_heads=2,
                                   tensor_model_parallel_size=world_size, sequence_parallel=True,
                                   use_cpu_initialization=True)
        fc1 = mlp.linear_fc1(TP_HIDDEN, TP_FFN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                             gather_output=False)
        fc2 = mlp.linear_fc2(TP_FFN, TP_HIDDEN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                             input_is_parallel=True, skip_bias_add=False)
        fc1, fc2 = fc1.to(device), fc2.to(device)
        x, w1, b1, w2, b2, loss_w = (t.to(device) for t in _tp_params())
        n, s = TP_FFN // world_size, TP_SEQ // world_size
        with torch.no_grad():  # Megatron's sharding: fc1 rows, fc2 columns; the sequence for SP
            fc1.weight.copy_(w1[rank * n:(rank + 1) * n])
            fc1.bias.copy_(b1[rank * n:(rank + 1) * n])
            fc2.weight.copy_(w2[:, rank * n:(rank + 1) * n])
            fc2.bias.copy_(b2)
        x_local = x[rank * s:(rank + 1) * s].clone().requires_grad_(True)
        if fusion:
            for layer in (fc1, fc2):
                layer.gradient_accumulation_fusion = True
                layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float32)
                layer.weight.grad_added_to_main_grad = False
            for _ in range(2):  # two micro-batches: main_grad holds their sum, .grad only placeholders
                h, _ = fc1(x_local)
                y, _ = fc2(torch.relu(h))
                (y * loss_w[rank * s:(rank + 1) * s]).sum().backward()
            assert fc1.weight.grad_added_to_main_grad and fc2.weight.grad_added_to_main_grad
            return {"w1_main": fc1.weight.main_grad.cpu() / 2, "w2_main": fc2.weight.main_grad.cpu() / 2,
                    "x": x_local.grad.detach().cpu() / 2}
        (h, _), kept = saved_activation_numel(lambda: fc1(x_local), fc1.parameters())
        y, _ = fc2(torch.relu(h))
        (y * loss_w[rank * s:(rank + 1) * s]).sum().backward()
        # SP bias/LayerNorm grads are per-rank partial sums (Megatron all-reduces them at the step).
        torch.distributed.all_reduce(fc2.bias.grad, group=parallel_state.get_tensor_model_parallel_group())
        out = {"y": y, "x": x_local.grad, "w1": fc1.weight.grad, "b1": fc1.bias.grad, "w2": fc2.weight.grad,
               "b2": fc2.bias.grad}
        return {"h_shape": tuple(h.shape), "types": (type(fc1).__name__, type(fc2).__name__),
                "fc1_kept": (kept, x_local.numel()),
                **{k: v.detach().float().cpu() for k, v in out.items()}}
    finally:
        tdm.disable()
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
def test_sequence_parallel_linears_match_reference():
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) comparison")
    world = 2
    per_rank = run_distributed(_tp_step, world, env=_ENV)
    ref = _tp_reference()
    n, s = TP_FFN // world, TP_SEQ // world
    for rank, got in enumerate(per_rank):
        assert got["h_shape"] == (TP_SEQ, TP_BATCH, n)  # all-gathered sequence, sharded features
        kept, shard = got["fc1_kept"]  # Megatron's activation memory: fc1 keeps 1/tp of its gathered input
        assert kept == shard, f"rank {rank}: fc1 saved {kept} activation elements, its input shard has {shard}"
        expected = {"y": ref["y"][rank * s:(rank + 1) * s], "x": ref["x"][rank * s:(rank + 1) * s],
                    "w1": ref["w1"][rank * n:(rank + 1) * n], "b1": ref["b1"][rank * n:(rank + 1) * n],
                    "w2": ref["w2"][:, rank * n:(rank + 1) * n], "b2": ref["b2"]}
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {key}")
    # gradient_accumulation_fusion: weight grads accumulated into main_grad over two micro-batches
    for rank, got in enumerate(run_distributed(_tp_step, world, args=("turbo_dist", True), env=_ENV)):
        torch.testing.assert_close(got["w1_main"], ref["w1"][rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["w2_main"], ref["w2"][:, rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["x"], ref["x"][rank * s:(rank + 1) * s], rtol=1e-5, atol=1e-5)


@needs_megatron
@pytest.mark.dist
@pytest.mark.gpu(min_gpus=2)
def test_sequence_parallel_linears_match_megatron_gpu():
    """TP=2, SP: turbo_dist linears vs Megatron's own ColumnParallelLinear/RowParallelLinear (CUDA-only path)."""
    ours = run_distributed(_tp_step, 2, args=("turbo_dist",), env=_ENV)
    ref = run_distributed(_tp_step, 2, args=("megatron",), env=_ENV)
    for rank, (a, b) in enumerate(zip(ours, ref)):
        assert a["types"] == ("TurboDistColumnParallelLinear", "TurboDistRowParallelLinear")
        assert b["types"] == ("ColumnParallelLinear", "RowParallelLinear")
        for key in ("y", "x", "w1", "b1", "w2", "b2"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=f"rank {rank} {key}")


# ------------------------------------------------------------------------------------------------ CP attention
SEQ, BATCH, HEADS, KV_HEADS, HEAD_DIM = 16, 2, 4, 2, 8


def _zigzag(t, rank, cp):
    """Megatron's CP shard (get_batch_on_this_cp_rank) along dim 0: chunks rank and 2cp-1-rank of 2cp."""
    chunks = t.chunk(2 * cp, dim=0)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=0)


def _attention_inputs():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=g)
    w = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=g)
    return q, k, v, w


def _reference_attention():
    """Plain causal GQA attention over the whole sequence: output and grads, [S, B, ...] layout."""
    q, k, v, w = _attention_inputs()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    rep = HEADS // KV_HEADS
    qh, kh, vh = q.permute(1, 2, 0, 3), k.repeat_interleave(rep, 2).permute(1, 2, 0, 3), \
        v.repeat_interleave(rep, 2).permute(1, 2, 0, 3)                           # [B, H, S, D]
    scores = qh @ kh.transpose(-1, -2) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ vh).permute(2, 0, 1, 3).reshape(SEQ, BATCH, HEADS * HEAD_DIM)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _cp_attention_step(rank, world_size, comm_types):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm

    parallel_state.initialize_model_parallel(context_parallel_size=world_size)
    try:
        spec = get_gpt_layer_local_spec()
        assert tdm.enable(moe_dispatcher=False, cp_attention=True, layer_spec=spec)["cp_attention"]
        assert spec.submodules.self_attention.submodules.core_attention is tdm.TurboDistCoreAttention
        results = {}
        for comm in comm_types:
            config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                       num_query_groups=KV_HEADS, attention_dropout=0.0, hidden_dropout=0.0,
                                       context_parallel_size=world_size, cp_comm_type=comm,
                                       use_cpu_initialization=True)
            attn = tdm.TurboDistCoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type=comm)
            q, k, v, w = (_zigzag(t, rank, world_size) for t in _attention_inputs())
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
            out = attn(q, k, v, None)
            (out * w).sum().backward()
            results[comm] = (out.detach(), q.grad, k.grad, v.grad)
        return results
    finally:
        tdm.disable()
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
def test_core_attention_spec_context_parallel_matches_reference():
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) comparison")
    comm_types = ("p2p", "a2a", "all_gather")
    per_rank = run_distributed(_cp_attention_step, 2, args=(comm_types,), env=_ENV)
    expected = _reference_attention()
    for rank, results in enumerate(per_rank):
        for comm in comm_types:
            for name, got, ref in zip(("out", "dq", "dk", "dv"), results[comm], expected):
                torch.testing.assert_close(got, _zigzag(ref, rank, 2), rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank} {comm} {name}")


@needs_megatron
def test_core_attention_refuses_what_it_cannot_do():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    with pytest.raises(NotImplementedError, match="dropout"):  # Megatron's default attention_dropout is 0.1
        tdm.TurboDistCoreAttention(config, 1, AttnMaskType.causal, "self")
    config.attention_dropout = 0.0
    with pytest.raises(NotImplementedError, match="a2a\\+p2p"):
        tdm.TurboDistCoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type="a2a+p2p")
    with pytest.raises(NotImplementedError, match="attn_mask_type"):
        tdm.TurboDistCoreAttention(config, 1, AttnMaskType.padding, "self")


@needs_megatron
@pytest.mark.parametrize("padded", [False, True])
def test_core_attention_packed_thd(padded):
    """Megatron's packed (thd) call: query [t, np, hn] with PackedSeqParams -> [t, np * hn]; each sequence
    attends only to itself (causal). Padded: every sequence sits at the start of a larger slot
    (cu_seqlens_q_padded), and its real tokens must not see the padding after them."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm
    from turbo_dist.ops.attention import reference_forward

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=KV_HEADS, attention_dropout=0.0, use_cpu_initialization=True)
    attn = tdm.TurboDistCoreAttention(config, 1, AttnMaskType.causal, "self")
    lens, slots = [5, 0, 9, 3], [8, 0, 12, 4]
    starts = [0]
    for n in (slots if padded else lens):
        starts.append(starts[-1] + n)
    t = starts[-1]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(t, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(t, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    cu_pad = torch.tensor(starts, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu_pad if padded else None,
                             cu_seqlens_kv_padded=cu_pad if padded else None,
                             max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, HEADS * HEAD_DIM)
    for s0, n in zip(starts, lens):  # the real tokens of each sequence: plain causal attention over them
        if n:
            ref, _ = reference_forward(q[None, s0:s0 + n], k[None, s0:s0 + n], v[None, s0:s0 + n], True,
                                       HEAD_DIM ** -0.5)
            torch.testing.assert_close(out[s0:s0 + n], ref[0].reshape(n, -1), rtol=1e-5, atol=1e-5)
    if padded:
        noncausal = tdm.TurboDistCoreAttention(config, 1, AttnMaskType.no_mask, "self")
        with pytest.raises(NotImplementedError, match="padded thd"):
            noncausal(q, k, v, None, packed_seq_params=params)
    with pytest.raises(NotImplementedError, match="thd only"):
        attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


def _thd_cp_step(rank, world_size, comm):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm
    from turbo_dist import cp
    from turbo_dist.ops.attention import reference_forward

    parallel_state.initialize_model_parallel(context_parallel_size=world_size)
    try:
        config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                   num_query_groups=KV_HEADS, attention_dropout=0.0, context_parallel_size=world_size,
                                   cp_comm_type=comm, use_cpu_initialization=True)
        attn = tdm.TurboDistCoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type=comm)
        unit = 2 * world_size
        lens, slots = [3 * unit - 1, unit, 2 * unit], [3 * unit, unit, 2 * unit]  # Megatron pads to 2*cp multiples
        starts = [0] + torch.tensor(slots).cumsum(0).tolist()
        t = starts[-1]
        g = torch.Generator().manual_seed(5)
        q = torch.randn(t, HEADS, HEAD_DIM, generator=g)
        k, v = (torch.randn(t, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        cu_pad = torch.tensor(starts, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                                 cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max(slots), max_seqlen_kv=max(slots))
        ql, kl, vl = (cp.shard_packed(x, cu_pad) for x in (q, k, v))  # what get_batch_on_this_cp_rank gives
        out = attn(ql, kl, vl, None, packed_seq_params=params)
        ref = torch.zeros(t, HEADS * HEAD_DIM)
        for s0, n in zip(starts, lens):  # real tokens: causal attention over their own sequence
            o, _ = reference_forward(q[None, s0:s0 + n], k[None, s0:s0 + n], v[None, s0:s0 + n], True,
                                     HEAD_DIM ** -0.5)
            ref[s0:s0 + n] = o[0].reshape(n, -1)
        real = torch.zeros(t, dtype=torch.bool)
        for s0, n in zip(starts, lens):
            real[s0:s0 + n] = True
        keep = cp.shard_packed(real, cu_pad)
        torch.testing.assert_close(out[keep], cp.shard_packed(ref, cu_pad)[keep], rtol=1e-5, atol=1e-5)
        return True
    finally:
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
@pytest.mark.parametrize("comm", ["p2p", "a2a", "all_gather"])
def test_core_attention_packed_thd_context_parallel(comm):
    """Megatron's THD + CP (padded sequences, chunks r and 2cp-1-r of each on rank r) through p2p (ring) / a2a /
    all_gather."""
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) comparison")
    assert all(run_distributed(_thd_cp_step, 2, args=(comm,), env=_ENV))


# ------------------------------------------------------------------------------------------------ GPU: MoELayer
def _moe_layer_step(rank, world_size, path):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer

    import turbo_dist.integrations.megatron as tdm

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world_size)
    try:
        model_parallel_cuda_manual_seed(123)
        from megatron.core.transformer.moe import moe_utils

        if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None  # megatron-core 0.16.1 without TE: NameError in TopKRouter gating
        if path == "turbo_dist":
            tdm.enable(moe_dispatcher=True)
        config = _moe_config("flex" if path == "turbo_dist" else "alltoall")
        spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
        torch.manual_seed(0)
        layer = MoELayer(config, spec.submodules.mlp.submodules).cuda()
        hidden = torch.randn(TOKENS, 2, HIDDEN, generator=torch.Generator().manual_seed(rank)).cuda()
        hidden.requires_grad_(True)
        out, _ = layer(hidden)
        out.float().square().sum().backward()
        grads = {n: p.grad.float().cpu() for n, p in layer.named_parameters() if p.grad is not None}
        return {"out": out.detach().float().cpu(), "hidden_grad": hidden.grad.float().cpu(), "grads": grads}
    finally:
        tdm.disable()
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
@pytest.mark.gpu(min_gpus=2)
def test_moe_layer_flex_matches_alltoall_gpu():
    ours = run_distributed(_moe_layer_step, 2, args=("turbo_dist",))
    ref = run_distributed(_moe_layer_step, 2, args=("megatron_alltoall",))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a["out"], b["out"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["hidden_grad"], b["hidden_grad"], rtol=1e-4, atol=1e-5)
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-4, atol=1e-5, msg=name)


def _core_attention_vs_megatron_step(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    import turbo_dist.integrations.megatron as tdm

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)  # DotProductAttention forks the model-parallel RNG (it raised without it)
    try:
        config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                   num_query_groups=KV_HEADS, attention_dropout=0.0, use_cpu_initialization=True)
        results = []
        for cls in (DotProductAttention, tdm.TurboDistCoreAttention):
            q, k, v, w = (t.cuda() for t in _attention_inputs())
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
            mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda").triu(1)  # True = masked out
            out = cls(config, 1, AttnMaskType.causal, "self")(q, k, v, mask)
            (out * w).sum().backward()
            results.append([t.detach().float().cpu() for t in (out, q.grad, k.grad, v.grad)])
        return results
    finally:
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_core_attention_matches_megatron_dot_product_attention_gpu():
    """CP=1 on one GPU: TurboDistCoreAttention vs Megatron's own DotProductAttention (which needs CUDA)."""
    (ref, ours), = run_distributed(_core_attention_vs_megatron_step, 1, env=_ENV)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=name)


@needs_megatron
def test_linears_log_when_megatron_runs_its_own_path(caplog, monkeypatch):
    """Without sequence parallelism Megatron's own linear runs: that is logged (once per class), not silent."""
    import logging

    import turbo_dist.integrations.megatron as tdm

    calls = []
    monkeypatch.setattr(tdm.ColumnParallelLinear, "_forward_impl", lambda self, **kw: calls.append(kw) or "own")
    monkeypatch.setattr(tdm, "_NOTED", set())
    layer = object.__new__(tdm.TurboDistColumnParallelLinear)  # the branch needs no initialised module
    with caplog.at_level(logging.INFO, logger="turbo_dist"):
        assert layer._forward_impl(torch.zeros(2, 1, 4), torch.zeros(3, 4), sequence_parallel=False) == "own"
        assert layer._forward_impl(torch.zeros(2, 1, 4), torch.zeros(3, 4), sequence_parallel=False) == "own"
    assert len(calls) == 2
    logged = [r.getMessage() for r in caplog.records if "Megatron's own implementation runs" in r.getMessage()]
    assert len(logged) == 1 and "TurboDistColumnParallelLinear: sequence_parallel is off" in logged[0], logged


def _core_attention_vs_dot_product_attention_cpu(rank, world, layer_number, scaling):
    """Megatron's own DotProductAttention on the CPU (its global memory buffer and CUDA RNG tracker replaced by
    CPU stand-ins, in this spawned rank only) against TurboDistCoreAttention, same config and inputs."""
    import contextlib

    import megatron.core.transformer.dot_product_attention as dpa
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import turbo_dist.integrations.megatron as tdm

    class _CpuBuffer:
        def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
            return torch.empty(shape, dtype=dtype)

    class _NoRng:
        def fork(self, *a, **k):
            return contextlib.nullcontext()

    parallel_state.initialize_model_parallel()
    parallel_state.get_global_memory_buffer = lambda: _CpuBuffer()
    dpa.tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoRng()
    try:
        cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                                apply_query_key_layer_scaling=scaling, use_cpu_initialization=True,
                                masked_softmax_fusion=False)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(8, 1, 4, 8, generator=g) for _ in range(3))
        mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
        ref = dpa.DotProductAttention(cfg, layer_number, AttnMaskType.causal, "self")(q, k, v, mask)
        ours = tdm.TurboDistCoreAttention(cfg, layer_number, AttnMaskType.causal, "self")(q, k, v, mask)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        return True
    finally:
        parallel_state.destroy_model_parallel()


@needs_megatron
@pytest.mark.parametrize("layer_number,scaling", [(1, False), (3, False), (3, True)])
def test_core_attention_matches_megatron_dot_product_attention_cpu(layer_number, scaling):
    """apply_query_key_layer_scaling divides the scores' scale by the layer number and Megatron's softmax multiplies
    it back: the net scale is unchanged (the hook divided and never multiplied: layer 3 attended with a third of
    the scale)."""
    assert run_distributed(_core_attention_vs_dot_product_attention_cpu, 1, args=(layer_number, scaling),
                           backend="gloo", env=_ENV) == [True]
