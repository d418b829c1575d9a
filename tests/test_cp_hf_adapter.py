"""turbo_dist.cp.hf_adapter: a tiny transformers Llama (fp32, CPU) fed a packed row of documents sharded
contiguously over 2 gloo ranks, with the adapter's ring attention ("turbo_dist_ring" and the substituted
"flash_attention_2"), against the unsharded model run on each document alone with eager attention: the rank's
logits and the all-reduced parameter gradients; the dtype cast of fp32 queries; what it refuses. Skipped without
transformers (CI installs it with the optional frameworks)."""
import sys
from types import SimpleNamespace

import pytest
import torch

from turbo_dist.testing import run_distributed

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 32, 2, 4, 2
PACKS = ((5, 7, 4), (8, 3, 5))  # one document across the shard edge; a boundary on it (2 ranks: 8 tokens each)


def _model(attn_implementation):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    torch.manual_seed(0)  # the same weights on every rank
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)


def _packed(lens, seed):
    """(input_ids [1, T], position_ids [1, T] restarting per document, cu_seqlens [docs + 1] int32)."""
    ids = torch.randint(0, VOCAB, (1, sum(lens)), generator=torch.Generator().manual_seed(seed))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    return ids, pos, cu


def _reference(model, ids, cu, weight):
    """Logits [1, T, vocab] and parameter gradients of sum(logits * weight), each document run alone (eager)."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.zero_grad(set_to_none=True)
    bounds = cu.tolist()
    logits = torch.cat([model(ids[:, a:b]).logits for a, b in zip(bounds, bounds[1:])], dim=1)
    (logits * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.config._attn_implementation = impl  # as it was (no flash_attn package check for "flash_attention_2")
    return logits.detach(), grads


def _matches_unsharded(rank, world, entry, heads_k_stride):
    import torch.distributed as dist

    from turbo_dist.cp import hf_adapter

    hf_adapter.substitute_hf_flash_attn(None, heads_k_stride)  # before the model: the name is checked on build
    try:
        model = _model(hf_adapter.ATTN_IMPLEMENTATION)
        if entry == "flash_attention_2":  # set directly: transformers checks for the flash_attn package otherwise
            model.config._attn_implementation = "flash_attention_2"
        for i, lens in enumerate(PACKS):
            ids, pos, cu = _packed(lens, seed=i)
            weight = torch.randn(1, sum(lens), VOCAB, generator=torch.Generator().manual_seed(10 + i))
            ref_logits, ref_grads = _reference(model, ids, cu, weight)
            per = sum(lens) // world
            mine = slice(rank * per, (rank + 1) * per)
            hf_adapter.update_ring_flash_attn_params(cu, None)
            logits = model(ids[:, mine], position_ids=pos[:, mine], use_cache=False).logits  # as trainers call it
            what = f"{entry} stride={heads_k_stride} docs={lens}"
            torch.testing.assert_close(logits, ref_logits[:, mine], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{what} logits: {m}")
            (logits * weight[:, mine]).sum().backward()
            for name, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{what} d{name}: {m}")
            model.zero_grad(set_to_none=True)
    finally:
        hf_adapter.restore_hf_flash_attn()
    return True


@pytest.mark.dist
@pytest.mark.parametrize("entry,heads_k_stride", [("turbo_dist_ring", 1), ("flash_attention_2", KV_HEADS)])
def test_sharded_model_matches_unsharded(entry, heads_k_stride):
    """Logits (the rank's slice) and all-reduced parameter gradients of the CP model equal the unsharded model's with
    per-document causal attention."""
    assert run_distributed(_matches_unsharded, 2, args=(entry, heads_k_stride), backend="gloo") == [True, True]


class _Attention(torch.nn.Module):
    """A causal attention module with a Linear of `dtype` (bf16 weights with fp32 activations: norms kept in fp32)."""

    is_causal = True

    def __init__(self, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8).to(dtype)


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _attention_function(rank, world):
    """The registered function on hand-made q/k/v [1, H, S/W, D]: the ring result of the whole packed row (scaling
    and layout), and fp32 queries run in the module's bf16 and returned in fp32; a layer checks the plan's
    boundaries from their host copy (no read-back from the device per layer)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from turbo_dist import ops
    from turbo_dist.cp import hf_adapter

    hf_adapter.substitute_hf_flash_attn(None, 1)
    try:
        attn = ALL_ATTENTION_FUNCTIONS[hf_adapter.ATTN_IMPLEMENTATION]
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        hf_adapter.update_ring_flash_attn_params(cu, None)
        q, k, v = _rand((1, HEADS, 16, 8), 1), _rand((1, KV_HEADS, 16, 8), 2), _rand((1, KV_HEADS, 16, 8), 3)
        ref = ops.varlen_attention(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu, None, None, causal=True,
                                   softmax_scale=0.3)
        mine = slice(rank * 8, (rank + 1) * 8)
        q, k, v = q[:, :, mine], k[:, :, mine], v[:, :, mine]
        from unittest import mock

        from turbo_dist.ops import attention_varlen as av
        hosts = []
        real = av._check_cu_seqlens

        def spy(cu_, name, total, device, end_hint="", host=None):
            hosts.append(host)
            return real(cu_, name, total, device, end_hint, host)
        with mock.patch.object(av, "_check_cu_seqlens", spy):  # the layer checks the plan's host copy
            out, weights = attn(_Attention(torch.float32), q, k, v, None, scaling=0.3)
        assert len(hosts) == 2 and all(h is not None for h in hosts), hosts
        assert weights is None and out.dtype == torch.float32 and out.shape == (1, 8, HEADS, 8)
        torch.testing.assert_close(out[0], ref[mine], rtol=1e-5, atol=1e-6)
        out, _ = attn(_Attention(torch.bfloat16), q, k, v, None, scaling=0.3)
        half, _ = attn(_Attention(torch.bfloat16), q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.3)
        assert out.dtype == torch.float32 and torch.equal(out, half.float())  # computed in bf16, returned in fp32
    finally:
        hf_adapter.restore_hf_flash_attn()
    return True


@pytest.mark.dist
def test_attention_function_layout_scaling_and_dtype():
    assert run_distributed(_attention_function, 2, backend="gloo") == [True, True]


class _ChunkedLayer(torch.nn.Module):
    """An attention layer of a chunked-attention config (Llama 4's attention_chunk_size / layer_types)."""
    is_causal = True

    def __init__(self, layer_types, chunk):
        super().__init__()
        self.layer_idx = 0
        self.config = SimpleNamespace(attention_chunk_size=chunk, layer_types=layer_types)


def _refusals(rank, world):
    import torch.distributed as dist
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from turbo_dist.cp import hf_adapter

    module = _model("sdpa").model.layers[0].self_attn
    q, k = _rand((1, HEADS, 8, 8), 1), _rand((1, KV_HEADS, 8, 8), 2)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)  # longest document: 7 tokens
    named = ALL_ATTENTION_FUNCTIONS[hf_adapter.ATTN_IMPLEMENTATION] if hf_adapter.ATTN_IMPLEMENTATION in \
        ALL_ATTENTION_FUNCTIONS else None
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    with pytest.raises(TypeError, match="heads_k_stride"):
        hf_adapter.substitute_hf_flash_attn(None, True)
    with pytest.raises(ValueError, match="heads_k_stride"):
        hf_adapter.substitute_hf_flash_attn(None, 0)
    if named is not None:  # registered by an earlier substitution in this process: raises until the next
        with pytest.raises(ValueError, match="substitute_hf_flash_attn"):
            named(module, q, k, k, None)

    def sentinel(*args, **kwargs):
        return "transformers' flash attention"

    saved, class_wide = ALL_ATTENTION_FUNCTIONS["flash_attention_2"], AttentionInterface()["flash_attention_2"]
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = sentinel  # a local override (another adapter's) to restore
    hf_adapter.substitute_hf_flash_attn(None, 1)
    try:
        attn = ALL_ATTENTION_FUNCTIONS[hf_adapter.ATTN_IMPLEMENTATION]
        fa2 = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
        assert fa2 is not sentinel
        with pytest.raises(ValueError, match="update_ring_flash_attn_params"):
            fa2(module, q, k, k, None)
        with pytest.raises(ValueError, match="divisible"):
            hf_adapter.update_ring_flash_attn_params(torch.tensor([0, 5, 15]), None)
        with pytest.raises(ValueError, match="start at 0"):
            hf_adapter.update_ring_flash_attn_params(torch.tensor([0, 9, 6, 16]), None)
        hf_adapter.update_ring_flash_attn_params(cu, singles[rank])  # a plan for a group of one
        with pytest.raises(ValueError, match="another group|same process group"):
            attn(module, q, k, k, None)
        hf_adapter.update_ring_flash_attn_params(cu, None)
        cases = [
            (ValueError, "batch", (q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), None), {}),
            (NotImplementedError, "softcap", (q, k, None), {"softcap": 30.0}),
            (NotImplementedError, "sliding", (q, k, None), {"sliding_window": 4}),
            (NotImplementedError, "dropout", (q, k, None), {"dropout": 0.1}),
            (NotImplementedError, "causal", (q, k, None), {"is_causal": False}),
            (NotImplementedError, "sinks", (q, k, None), {"s_aux": torch.zeros(HEADS)}),
            (NotImplementedError, "mask", (q, k, torch.tensor([[1] * 7 + [0]], dtype=torch.bool)), {}),
            (NotImplementedError, "KV cache", (q, torch.cat([k, k], dim=2), None), {}),
        ]
        for fn in (attn, fa2):
            for exc, match, (qq, kk, mask), kw in cases:
                with pytest.raises(exc, match=match):
                    fn(module, qq, kk, kk, mask, **kw)
        # a shard of the wrong length: every rank raises (none waits in the all-gather)
        with pytest.raises(ValueError, match="shard has 6 tokens"):
            attn(module, q[:, :, :6], k[:, :, :6], k[:, :, :6], None)
        # refused on one rank only (transformers passes a mask to the rank whose slice holds padding, None to the
        # others; one rank's shard of another length): every rank raises, none waits in the all-gather
        last = rank == world - 1
        with pytest.raises(NotImplementedError if last else ValueError, match="mask" if last else "another rank"):
            attn(module, q, k, k, torch.tensor([[1] * 7 + [0]], dtype=torch.bool) if last else None)
        n = 6 if last else 8
        with pytest.raises(ValueError, match="shard has 6 tokens" if last else "another rank"):
            attn(module, q[:, :, :n], k[:, :, :n], k[:, :, :n], None)
        # chunked attention (Llama 4): refused on its chunked layers when a document is longer than a chunk
        for types, chunk, refused in ((["chunked_attention"], 4, True), (None, 4, True), (["full_attention"], 4, False),
                                      (["chunked_attention"], 7, False)):
            chunked = _ChunkedLayer(types, chunk)
            if refused:
                with pytest.raises(NotImplementedError, match="chunked attention"):
                    attn(chunked, q, k, k, None)
            else:
                assert torch.equal(attn(chunked, q, k, k, None)[0], attn(module, q, k, k, None)[0])
        with pytest.raises(ValueError, match="heads_k_stride"):  # a stride that does not divide the kv heads
            hf_adapter.substitute_hf_flash_attn(None, 3)
            attn(module, q, k, k, None)
        hf_adapter.substitute_hf_flash_attn(None, 1)
        # a window covering the longest document masks nothing: taken, the plain causal result
        out, _ = attn(module, q, k, k, None, sliding_window=7, scaling=0.5)
        plain, _ = fa2(module, q, k, k, None, scaling=0.5)
        assert torch.equal(out, plain)
        hf_adapter.use_ring_attn(False)
        assert fa2(module, q, k, k, None) == "transformers' flash attention"
        with pytest.raises(ValueError, match="use_ring_attn"):
            attn(module, q, k, k, None)
        hf_adapter.use_ring_attn(True)
        assert fa2(module, q, k, k, None)[0].shape == (1, 8, HEADS, 8)
    finally:
        hf_adapter.restore_hf_flash_attn()
        restored = (ALL_ATTENTION_FUNCTIONS["flash_attention_2"], AttentionInterface()["flash_attention_2"])
        ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = saved
    assert restored[0] is sentinel and restored[1] is class_wide
    # no local override before: none left behind (a later AttentionInterface.register reaches the models)
    local = ALL_ATTENTION_FUNCTIONS._local_mapping.pop("flash_attention_2", None)
    hf_adapter.substitute_hf_flash_attn(None, 1)
    hf_adapter.restore_hf_flash_attn()
    assert "flash_attention_2" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    if local is not None:
        ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = local
    with pytest.raises(ValueError, match="substitute_hf_flash_attn"):  # restored: the name raises again
        attn(module, q, k, k, None)
    return True


@pytest.mark.dist
def test_refuses_what_ring_attention_cannot_do():
    assert run_distributed(_refusals, 2, backend="gloo") == [True, True]


def test_missing_transformers_api_names_the_version(monkeypatch):
    import transformers.modeling_utils

    from turbo_dist.cp import hf_adapter

    monkeypatch.delattr(transformers.modeling_utils, "AttentionInterface")
    with pytest.raises(ImportError, match=f"transformers {transformers.__version__} does not have"):
        hf_adapter.substitute_hf_flash_attn(None, 1)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="needs transformers"):
        hf_adapter.substitute_hf_flash_attn(None, 1)


def _module(causal=True, config=None):
    """_Attention (fp32 Linear) with its own is_causal and, optionally, a config."""
    m = _Attention(torch.float32)
    m.is_causal = causal
    if config is not None:
        m.config = config
    return m


def _value_dim_causal_and_dtype(rank, world):
    """A value head dim below the queries' (cropped back), other head dims refused, module.is_causal False refused
    without the keyword, fp32 queries in autocast's / a quantized model's dtype (a mutation audit, 2026-12-05:
    each check fails on a plausible bug the tests above let through)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from turbo_dist import ops
    from turbo_dist.cp import hf_adapter

    g = torch.Generator().manual_seed(0)
    hf_adapter.substitute_hf_flash_attn(None, 1)
    try:
        attn = ALL_ATTENTION_FUNCTIONS[hf_adapter.ATTN_IMPLEMENTATION]
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        hf_adapter.update_ring_flash_attn_params(cu, None)
        q, k = torch.randn(1, 4, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
        v6 = torch.randn(1, 2, 16, 6, generator=g)  # value head dim 6 < 8 (MLA-like): padded, output cropped
        mine = slice(rank * 8, (rank + 1) * 8)
        vp = torch.nn.functional.pad(v6, (0, 2))
        ref = ops.varlen_attention(*(t[0].transpose(0, 1) for t in (q, k, vp)), cu, cu, causal=True)[..., :6]
        out, _ = attn(_module(), q[:, :, mine], k[:, :, mine], v6[:, :, mine], None)
        assert out.shape == (1, 8, 4, 6)
        torch.testing.assert_close(out[0], ref[mine], atol=1e-5, rtol=1e-5)
        ql, kl, vl = q[:, :, mine], k[:, :, mine], k[:, :, mine]
        with pytest.raises(NotImplementedError, match="head dims"):
            attn(_module(), ql, kl, torch.randn(1, 2, 8, 12), None)
        with pytest.raises(NotImplementedError, match="head dims"):
            attn(_module(), ql, kl[..., :4], vl[..., :4], None)
        with pytest.raises(NotImplementedError, match="causal"):
            attn(_module(causal=False), ql, kl, vl, None)  # module.is_causal False, no is_causal kwarg
        # autocast's dtype / a quantized model's dtype for fp32 queries
        from unittest import mock

        from turbo_dist.cp import _varlen

        seen, real = [], _varlen.varlen_fwd

        def spy(q_, *a, **kw):
            seen.append(q_.dtype)
            return real(q_, *a, **kw)
        with mock.patch.object(_varlen, "varlen_fwd", spy), torch.autocast("cpu", dtype=torch.bfloat16):
            attn(_module(), ql, kl, vl, None)
        assert seen == [torch.bfloat16] * 2, seen  # fp32 queries run in autocast's dtype (2 kv-head groups)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (both under autocast)
            auto, _ = attn(_module(), ql, kl, vl, None)
            half_a, _ = attn(_module(), ql.bfloat16(), kl.bfloat16(), vl.bfloat16(), None)
        assert auto.dtype == torch.float32 and torch.equal(auto, half_a.float())
        half, _ = attn(_module(), ql.bfloat16(), kl.bfloat16(), vl.bfloat16(), None)
        quant = _module(config=SimpleNamespace(_pre_quantization_dtype=torch.bfloat16))
        outq, _ = attn(quant, ql, kl, vl, None)
        assert torch.equal(outq, half.float())
    finally:
        hf_adapter.restore_hf_flash_attn()
    return True


@pytest.mark.dist
def test_hf_adapter_value_dim_causal_and_dtype():
    assert run_distributed(_value_dim_causal_and_dtype, 2, backend="gloo") == [True, True]
