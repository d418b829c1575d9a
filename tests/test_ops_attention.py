"""Attention with LSE: reference, our Triton kernel (interpreter on CPU) and the SDPA backends (GPU).

Every backend is checked against fp32 math, forward and backward, with the contract the
context-parallel ring relies on: partial outputs merge exactly through their LSE, and the backward
computes with the (merged) o and lse it is given.
"""
import importlib
import math

import pytest
import torch

attn = importlib.import_module("turbo_dist.ops.attention")  # the module (turbo_dist.ops.attention is also a function)
from turbo_dist.ops import attention, attention_backward, attention_forward, dispatcher

from dist_utils import backend_switch

OPS = ("attention_fwd", "attention_bwd")
SDPA = ("cudnn", "flash", "efficient")


_reset_backends, use = backend_switch(OPS)


def math_attention(q, k, v, causal, scale=None):
    """Plain differentiable attention in float64, the ground truth (bottom-right causal)."""
    hq, hkv = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        keep = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + sk - sq
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make(b, sq, sk, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, hq, d)


def expected(q, k, v, do, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = math_attention(q64, k64, v64, causal)
    o.backward(do.double())
    return o, lse, q64.grad, k64.grad, v64.grad


def check_backend(name, q, k, v, do, causal, tol_o, tol_g):
    use(name)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected(q, k, v, do, causal)
    o, lse = attention_forward(q, k, v, causal)
    assert dispatcher.last_backend("attention_fwd") == name
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert lse.is_contiguous() and lse.device == q.device
    assert rel(o, o_ref) < tol_o
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu()), "rows without visible keys must get lse = -inf"
    assert (lse[fin].double() - lse_ref[fin]).abs().max().item() < 10 * tol_o
    # backward from the exact (o, lse), as the CP ring hands them over
    dq, dk, dv = attention_backward(do, q, k, v, o_ref.to(q.dtype), lse_ref.float(), causal)
    assert dispatcher.last_backend("attention_bwd") == name
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert torch.isfinite(got).all()
        assert rel(got, want) < tol_g, (name, rel(got, want))


def check_block_merge(name, q, k, v, do, causal, tol):
    """Two key blocks: forward each, merge by LSE in fp32 == full; backward per block with the merged
    (o, lse) sums to the full gradients (the flash-attn / ring-attention contract)."""
    use(name)
    sk = k.shape[1]
    cut = sk // 2 + 3
    o_full, lse_full, dq_ref, dk_ref, dv_ref = expected(q, k, v, do, causal)
    blocks = [(0, cut), (cut, sk)]
    outs, lses = [], []
    for lo, hi in blocks:
        o_b, lse_b = attention_forward(q, k[:, lo:hi], v[:, lo:hi], False)
        outs.append(o_b.float())
        lses.append(lse_b)
    lse = torch.logaddexp(lses[0], lses[1])
    o = sum(ob * torch.exp(lb - lse).transpose(1, 2).unsqueeze(-1) for ob, lb in zip(outs, lses))
    assert (lse.double() - lse_full).abs().max().item() < tol
    assert rel(o, o_full) < tol
    o_m = o.to(q.dtype)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dks, dvs = [], []
    for lo, hi in blocks:
        dq_b, dk_b, dv_b = attention_backward(do, q, k[:, lo:hi], v[:, lo:hi], o_m, lse, False)
        dq += dq_b.float()
        dks.append(dk_b)
        dvs.append(dv_b)
    assert rel(dq, dq_ref) < 2 * tol
    assert rel(torch.cat(dks, 1), dk_ref) < 2 * tol
    assert rel(torch.cat(dvs, 1), dv_ref) < 2 * tol


# (b, sq, sk, hq, hkv, d, causal): odd lengths, GQA, Sq != Sk both ways, causal bottom-right
CPU_CASES = [
    (1, 33, 33, 4, 2, 32, True),
    (2, 20, 37, 2, 1, 16, False),
    (1, 17, 45, 2, 2, 16, True),
    (1, 40, 23, 4, 4, 16, True),   # Sq > Sk: the first 17 rows see no key
    (1, 24, 24, 3, 1, 24, False),  # head_dim not a power of two
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "b{}_q{}_k{}_h{}-{}_d{}_{}".format(*c[:6], "c" if c[6] else "n"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter(case, dtype):
    b, sq, sk, hq, hkv, d, causal = case
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    q, k, v, do = make(b, sq, sk, hq, hkv, d, dtype)
    tol_o, tol_g = (1e-5, 1e-5) if dtype == torch.float32 else (2e-3, 5e-3)
    check_backend("triton", q, k, v, do, causal, tol_o, tol_g)


@pytest.mark.parametrize("case", CPU_CASES[:2] + CPU_CASES[3:4], ids=["gqa_causal", "gqa_cross", "empty_rows"])
def test_reference(case):
    b, sq, sk, hq, hkv, d, causal = case
    q, k, v, do = make(b, sq, sk, hq, hkv, d, torch.float32)
    check_backend("reference", q, k, v, do, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_block_merge_cpu(name):
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    q, k, v, do = make(1, 19, 41, 4, 2, 16, torch.float32, seed=3)
    check_block_merge(name, q, k, v, do, False, 1e-5)


@pytest.mark.parametrize("tiles", [((32, 64), (64, 32)), ((64, 32), (32, 64))], ids=["m32n64", "m64n32"])
@pytest.mark.parametrize("shape", [(45, 70), (70, 45)], ids=["q<k", "q>k"])
def test_triton_tile_shapes(tiles, shape):
    """The causal block ranges of every kernel hold for any tiles (GPU configs differ from the
    interpreter's 16x16): rectangular tiles, lengths not multiples of them, Sq != Sk both ways."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from turbo_dist.kernels.flash_attn import FlashConfig, flash_attn_backward, flash_attn_forward

    (m1, n1), (m2, n2) = tiles
    q, k, v, do = make(1, shape[0], shape[1], 2, 1, 16, torch.float32, seed=8)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected(q, k, v, do, True)
    o, lse = flash_attn_forward(q, k, v, True, None, config=FlashConfig(m1, n1))
    fin = torch.isfinite(lse_ref)
    assert rel(o, o_ref) < 1e-5 and (lse[fin].double() - lse_ref[fin]).abs().max() < 1e-5
    grads = flash_attn_backward(do, q, k, v, o, lse, True, None, dkdv_config=FlashConfig(m1, n1),
                                dq_config=FlashConfig(m2, n2))
    for got, want in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert rel(got, want) < 1e-5


def test_triton_empty_rows_are_zero():
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    use("triton")
    q, k, v, do = make(1, 30, 10, 2, 2, 16, torch.float32, seed=5)
    o, lse = attention_forward(q, k, v, True)
    assert torch.equal(o[:, :20], torch.zeros_like(o[:, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, True)
    assert torch.equal(dq[:, :20], torch.zeros_like(dq[:, :20]))


def test_autograd_entry_triton():
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    use("triton")
    q, k, v, do = make(2, 21, 21, 4, 2, 16, torch.float32, seed=7)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention(qq, kk, vv, causal=True, softmax_scale=0.3, return_lse=True)
    o.backward(do)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, lse_ref = math_attention(q64, k64, v64, True, scale=0.3)
    o_ref.backward(do.double())
    assert rel(o, o_ref) < 1e-5 and (lse.double() - lse_ref).abs().max() < 1e-5
    for got, want in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        assert rel(got, want) < 1e-5


def packed_views(b, s, hq, hkv, d, dtype, device="cpu", seed=0):
    """q/k/v as strided views of one packed projection output [B, S, (Hq + 2 Hkv) * D], as a fused
    QKV GEMM produces them (non-contiguous; last dim still unit stride)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, s, hq, d), k.view(b, s, hkv, d), v.view(b, s, hkv, d)
    do = torch.randn(b, hq, s, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)  # BHSD memory
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    return q, k, v, do


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_non_contiguous_cpu(name):
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    q, k, v, do = packed_views(2, 19, 4, 2, 16, torch.float32, seed=9)
    check_backend(name, q, k, v, do, True, 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_autograd_entry_reference(causal):
    q, k, v, do = make(1, 13, 29, 4, 1, 8, torch.float32, seed=4)  # MQA, Sq < Sk
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o = attention(qq, kk, vv, causal=causal)
    assert isinstance(o, torch.Tensor) and o.shape == q.shape
    o.backward(do)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, _ = math_attention(q64, k64, v64, causal)
    o_ref.backward(do.double())
    assert rel(o, o_ref) < 1e-5
    for got, want in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        assert got.shape == want.shape and rel(got, want) < 1e-5


def test_skip_empty_rows_wrapper():
    """Causal Sq > Sk on a kernel that only knows top-left masks (cuDNN): the wrapper hands it the
    square part only and fills the rows without keys itself."""
    calls = []

    def square_fwd(q, k, v, causal, scale):
        calls.append((q.shape[1], k.shape[1]))
        assert not causal or q.shape[1] == k.shape[1]
        return attn.reference_forward(q, k, v, causal, scale)

    def square_bwd(do, q, k, v, o, lse, causal, scale):
        assert not causal or q.shape[1] == k.shape[1]
        return attn.reference_backward(do, q, k, v, o, lse, causal, scale)

    fwd, bwd = attn._skip_empty_rows(square_fwd, square_bwd)
    q, k, v, do = make(2, 27, 11, 4, 2, 8, torch.float32, seed=6)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected(q, k, v, do, True)
    o, lse = fwd(q, k, v, True, None)
    assert calls == [(11, 11)]
    assert torch.equal(o[:, :16], torch.zeros_like(o[:, :16])) and torch.isneginf(lse[:, :, :16]).all()
    assert rel(o, o_ref) < 1e-5 and (lse[:, :, 16:].double() - lse_ref[:, :, 16:]).abs().max() < 1e-5
    dq, dk, dv = bwd(do, q, k, v, o, lse, True, None)
    assert torch.equal(dq[:, :16], torch.zeros_like(dq[:, :16]))
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel(got, want) < 1e-5
    fwd(q, k, v, False, None)  # non-causal: untouched
    assert calls[-1] == (27, 11)


def test_cpu_default_is_reference():
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    q, k, v, do = make(1, 8, 8, 2, 2, 16, torch.float32)
    attention_forward(q, k, v, True)
    assert dispatcher.last_backend("attention_fwd") == "reference"  # the interpreter runs only when named


def test_errors():
    q, k, v, do = make(1, 8, 8, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        attention_forward(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_forward(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="do not match q"):
        attention_forward(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="dtypes differ"):
        attention_forward(q.half(), k, v)
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        attention_forward(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="must be a tensor"):
        attention_forward(q, k.numpy(), v)
    with pytest.raises(ValueError, match="devices differ"):
        attention_forward(q, k.to("meta"), v)
    o, lse = attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must be"):
        attention_backward(do, q, k, v, o, lse.transpose(1, 2))
    with pytest.raises(ValueError, match="does not match q"):
        attention_backward(do[:, :4], q, k, v, o, lse)
    with pytest.raises(ValueError, match="o "):
        attention_backward(do, q, k, v, o[:, :4], lse)
    with pytest.raises(TypeError, match="lse must be float32"):
        attention_backward(do, q, k, v, o, lse.long())
    if not torch.cuda.is_available():
        dispatcher.set_backend("attention_fwd", "triton")
        with pytest.raises(ValueError, match="bf16"):
            attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16())
        dispatcher.set_backend("attention_fwd", "flash")
        with pytest.raises(ValueError, match="needs CUDA"):
            attention_forward(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="no backend"):
        dispatcher.set_backend("attention_fwd", "nonexistent")


# ------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    (2, 256, 256, 8, 8, 128, True),
    (2, 256, 256, 8, 2, 128, True),    # GQA
    (1, 300, 300, 4, 4, 64, True),     # odd length, not a multiple of any tile
    (2, 200, 333, 4, 2, 64, False),    # Sq != Sk, GQA
    (1, 130, 390, 4, 4, 128, True),    # causal, Sq < Sk (bottom-right)
    (1, 390, 130, 4, 2, 64, True),     # causal, Sq > Sk: empty rows
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "b{}_q{}_k{}_h{}-{}_d{}_{}".format(*c[:6], "c" if c[6] else "n"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["triton", *SDPA])
def test_gpu_backend(name, dtype, case):
    b, sq, sk, hq, hkv, d, causal = case
    q, k, v, do = make(b, sq, sk, hq, hkv, d, dtype, device="cuda")
    ok = attn._sdpa_reason(name, q, k, v, causal) if name in SDPA else True
    if ok is not True:
        # the main shape must run everywhere on sm80+; only the documented limit may refuse
        assert causal and sq < sk and not attn._CAUSAL_SQ_LT_SK[name], ok
        pytest.skip(ok)
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    check_backend(name, q, k, v, do, causal, tol, 2 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", *SDPA])
def test_gpu_block_merge(name):
    q, k, v, do = make(2, 192, 320, 8, 2, 128, torch.bfloat16, device="cuda", seed=11)
    check_block_merge(name, q, k, v, do, False, 1.5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", *SDPA])
def test_gpu_non_contiguous(name):
    q, k, v, do = packed_views(2, 160, 8, 2, 64, torch.bfloat16, device="cuda", seed=13)
    check_backend(name, q, k, v, do, True, 1e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_triton_fp32(d):
    # fp32 tiles take twice the shared memory of the tuned 16-bit ones: D=128/256 must still launch
    q, k, v, do = make(1, 100, 77, 4, 2, d, torch.float32, device="cuda")
    check_backend("triton", q, k, v, do, True, 1e-4, 1e-4)


def test_fp32_configs_shrink(monkeypatch):
    from turbo_dist.kernels import flash_attn as fa

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the compiled-kernel tables, not the interpreter's tile
    for table in (fa.FWD_CONFIGS, fa.BWD_DKDV_CONFIGS, fa.BWD_DQ_CONFIGS):
        for d, cfg in table.items():
            assert fa._pick(table, d, 2) == cfg
            c32 = fa._pick(table, d, 4)
            assert c32.block_m == max(16, cfg.block_m // 2) and c32.block_n == max(16, cfg.block_n // 2)
            assert c32.num_stages <= 2


@pytest.mark.gpu
def test_gpu_default_order():
    q, k, v, do = make(1, 128, 128, 4, 4, 128, torch.bfloat16, device="cuda")
    fwd = dispatcher.choose("attention_fwd", q, k, v, True, None).name
    bwd = dispatcher.choose("attention_bwd", do, q, k, v, q, torch.zeros(1, 4, 128, device="cuda"), True, None).name
    assert fwd == min(SDPA + ("triton",), key=attn.PRIORITY["attention_fwd"].get)
    assert bwd == min(SDPA + ("triton",), key=attn.PRIORITY["attention_bwd"].get)
    # causal with Sq != Sk: whatever the default is, it must be a backend that aligns bottom-right
    kk = torch.randn(1, 200, 4, 128, device="cuda", dtype=torch.bfloat16)
    name = dispatcher.choose("attention_fwd", q, kk, kk, True, None).name
    assert name in ("triton",) + tuple(n for n in SDPA if attn._CAUSAL_SQ_LT_SK[n])
    # fp32 goes to our kernel (SDPA's fused kernels are fp16/bf16 only)
    q32 = q.float()
    assert dispatcher.choose("attention_fwd", q32, q32, q32, True, None).name == "triton"


def test_double_backward_is_refused_not_wrong():
    """Second derivatives through attention are not implemented: differentiating a gradient taken with
    create_graph=True through attention raises NotImplementedError, also where the incoming gradient did not
    require grad (o.sum(): torch's once_differentiable let that through, and a gradient penalty then trained on a
    gradient without its own derivative); dense and packed (varlen) alike. A create_graph backward whose later
    derivative does not pass through attention (a penalty on another layer's gradient) works and is exact; a plain
    backward is unchanged."""
    from turbo_dist import ops
    from turbo_dist.ops.attention import reference_forward

    q, k, v = (torch.randn(1, 6, 2, 8, requires_grad=True) for _ in range(3))
    for loss in (lambda o: o.sum(), lambda o: o.square().sum()):
        o = ops.flash_attn_func(q, k, v, causal=True)
        (dq,) = torch.autograd.grad(loss(o), q, create_graph=True)
        with pytest.raises(NotImplementedError, match="second derivatives"):
            torch.autograd.grad(dq.square().sum(), q)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    qv, kv, vv = (t.detach()[0].clone().requires_grad_(True) for t in (q, k, v))
    o = ops.varlen_attention(qv, kv, vv, cu, cu, causal=True)
    (dq,) = torch.autograd.grad(o.sum(), qv, create_graph=True)
    with pytest.raises(NotImplementedError, match="varlen_attention: second derivatives"):
        torch.autograd.grad(dq.sum(), qv)

    # x -> @W1 -> attention -> @W2: a penalty on W2's gradient never differentiates through attention's backward
    def penalty_grad(attn):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 6, 2, 8, generator=g)
        w1, w2 = (torch.randn(8, 8, generator=g).requires_grad_(True) for _ in range(2))
        h = x @ w1
        loss = (attn(h, h, h) @ w2).tanh().sum()
        _, g2 = torch.autograd.grad(loss, (w1, w2), create_graph=True)
        return torch.autograd.grad(g2.square().sum(), (w1, w2))
    ours = penalty_grad(lambda a, b, c: ops.flash_attn_func(a, b, c, causal=True))
    ref = penalty_grad(lambda a, b, c: reference_forward(a, b, c, True, None)[0])
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    o = ops.flash_attn_func(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(o.square().sum(), q)  # first order: as before
    assert dq.shape == q.shape and not dq.requires_grad


def test_backward_input_checks():
    from turbo_dist.ops import attention_backward, attention_forward

    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    o, lse = attention_forward(q, k, v, True)
    with pytest.raises(TypeError, match="lse must be float32"):
        attention_backward(torch.ones_like(o), q, k, v, o, lse.half(), True)
    with pytest.raises(TypeError, match="o must be the forward's floating-point output"):
        attention_backward(torch.ones_like(o), q, k, v, o.int(), lse, True)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        attention_forward(q[..., :0], k[..., :0], v[..., :0], True)
    with pytest.raises(ValueError, match="must have one shape"):
        attention_forward(q, k, v[:, :5], True)


def test_sdpa_predicates_follow_torchs_switches(monkeypatch):
    """PyTorch's own SDPA switches and deterministic mode rule out backends here too (faked CUDA tensors past the
    device check), and they are part of the choice key, so a cached choice is not reused after a switch."""
    from turbo_dist.ops import attention as attn_fn  # noqa: F401  (registers the ops)
    import importlib

    attn = importlib.import_module("turbo_dist.ops.attention")
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)
    assert "enable_flash_sdp(False)" in attn._sdpa_reason("flash", q, q, q, True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "not deterministic" in attn._sdpa_reason("cudnn", q, q, q, True)
    key = attn._torch_sdpa_gates()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert attn._torch_sdpa_gates() != key


def test_scale_and_window_types_are_checked():
    """softmax_scale takes a number (numpy and 0-d tensors too) or None; window_size a pair: anything else is a
    TypeError naming the argument (a string scale was float()'s ValueError, an int window 'not iterable')."""
    import numpy as np

    from turbo_dist import ops

    q = torch.randn(1, 4, 2, 8)
    for ok in (0.3, 1, np.float32(0.3), torch.tensor(0.3)):
        ops.attention(q, q, q, softmax_scale=ok)
    for bad in ("a", True, [0.3]):
        with pytest.raises(TypeError, match="softmax_scale must be a number"):
            ops.attention(q, q, q, softmax_scale=bad)
    with pytest.raises(TypeError, match=r"window_size must be a pair \(left, right\), got 4"):
        ops.flash_attn_func(q, q, q, window_size=4)
