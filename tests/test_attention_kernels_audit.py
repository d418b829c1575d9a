"""The Triton attention kernels' tile-range arithmetic at every diagonal residue and their head-dim masking (a
mutation audit, 2026-12-05: each test fails on a plausible bug the kernel's other tests let through)."""
import pytest
import torch

from test_ops_attention import expected, make, rel


@pytest.mark.parametrize("sq", [16, 33])
def test_triton_causal_every_diagonal_residue(sq):
    """Causal Sq != Sk with sk - sq covering every residue mod the 16-wide interpreter tiles (and mod 32/64 configs):
    the tile-range arithmetic (full / masked / skipped key and query tiles) at each possible diagonal offset."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from turbo_dist.kernels.flash_attn import flash_attn_backward, flash_attn_forward

    for sk in range(max(1, sq - 17), sq + 18):
        q, k, v, do = make(1, sq, sk, 2, 1, 16, torch.float32, seed=sk)
        o_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected(q, k, v, do, True)
        o, lse = flash_attn_forward(q, k, v, True, None)
        fin = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), fin), sk
        assert rel(o, o_ref) < 1e-5 and (lse[fin].double() - lse_ref[fin]).abs().max() < 1e-5, sk
        for got, want in zip(flash_attn_backward(do, q, k, v, o, lse, True, None), (dq_ref, dk_ref, dv_ref)):
            torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4, msg=f"sk={sk}")


def test_triton_head_dim_padding_is_masked():
    """D not a power of two: the padded columns of q/k/v must never be read (NaN beyond D in the buffers)."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from turbo_dist.kernels.flash_attn import flash_attn_backward, flash_attn_forward

    q0, k0, v0, do0 = make(1, 24, 24, 3, 1, 24, torch.float32, seed=2)

    def padded(t):
        buf = torch.full(t.shape[:-1] + (32,), float("nan"))
        buf[..., :24] = t
        return buf[..., :24]
    q, k, v, do = (padded(t) for t in (q0, k0, v0, do0))
    for causal in (False, True):
        o_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected(q0, k0, v0, do0, causal)
        o, lse = flash_attn_forward(q, k, v, causal, None)
        assert rel(o, o_ref) < 1e-5
        for got, want in zip(flash_attn_backward(do, q, k, v, o, lse, causal, None), (dq_ref, dk_ref, dv_ref)):
            assert rel(got, want) < 1e-5
