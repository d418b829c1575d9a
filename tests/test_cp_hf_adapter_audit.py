"""The Hugging Face adapter's value head dim, causal default, autocast and pre-quantization dtypes (a mutation
audit, 2026-12-05: each test fails on a plausible bug the adapter's other tests let through)."""
from types import SimpleNamespace

import pytest
import torch

from turbo_dist.testing import run_distributed

pytest.importorskip("transformers")


class _Mod(torch.nn.Module):
    def __init__(self, causal=True, dtype=torch.float32, config=None):
        super().__init__()
        self.is_causal = causal
        self.proj = torch.nn.Linear(8, 8).to(dtype)
        if config is not None:
            self.config = config


def _hf(rank, world):
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
        out, _ = attn(_Mod(), q[:, :, mine], k[:, :, mine], v6[:, :, mine], None)
        assert out.shape == (1, 8, 4, 6)
        torch.testing.assert_close(out[0], ref[mine], atol=1e-5, rtol=1e-5)
        ql, kl, vl = q[:, :, mine], k[:, :, mine], k[:, :, mine]
        with pytest.raises(NotImplementedError, match="head dims"):
            attn(_Mod(), ql, kl, torch.randn(1, 2, 8, 12), None)
        with pytest.raises(NotImplementedError, match="head dims"):
            attn(_Mod(), ql, kl[..., :4], vl[..., :4], None)
        with pytest.raises(NotImplementedError, match="causal"):
            attn(_Mod(causal=False), ql, kl, vl, None)  # module.is_causal False, no is_causal kwarg
        # autocast's dtype / a quantized model's dtype for fp32 queries
        from unittest import mock
        from turbo_dist.cp import _varlen
        seen, real = [], _varlen.varlen_fwd
        def spy(q_, *a, **kw):
            seen.append(q_.dtype)
            return real(q_, *a, **kw)
        with mock.patch.object(_varlen, "varlen_fwd", spy), torch.autocast("cpu", dtype=torch.bfloat16):
            attn(_Mod(), ql, kl, vl, None)
        assert seen == [torch.bfloat16] * 2, seen  # fp32 queries run in autocast's dtype (2 kv-head groups)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (both under autocast: the CPU reference obeys it)
            auto, _ = attn(_Mod(), ql, kl, vl, None)
            half_a, _ = attn(_Mod(), ql.bfloat16(), kl.bfloat16(), vl.bfloat16(), None)
        assert auto.dtype == torch.float32 and torch.equal(auto, half_a.float())
        half, _ = attn(_Mod(), ql.bfloat16(), kl.bfloat16(), vl.bfloat16(), None)
        quant = _Mod(config=SimpleNamespace(_pre_quantization_dtype=torch.bfloat16))
        outq, _ = attn(quant, ql, kl, vl, None)
        assert torch.equal(outq, half.float())
    finally:
        hf_adapter.restore_hf_flash_attn()
    return True


@pytest.mark.dist
def test_hf_adapter_value_dim_causal_and_dtype():
    assert run_distributed(_hf, 2, backend="gloo") == [True, True]
