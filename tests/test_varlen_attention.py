"""Packed variable-length attention (cu_seqlens): the ops-level backends ("reference", "triton") against
dense attention sequence by sequence, and context-parallel ring / a2a (Ulysses) / allgather against one process.

CPU: the Triton kernels run in the interpreter (fp32/fp16), CP on gloo. GPU (marked `gpu`): Triton in
bf16/fp16 against the reference, and the three CP modes over NCCL on 2 GPUs (`--dist-only`).
"""
import pytest
import torch
import torch.distributed as dist

from turbo_dist import cp
from turbo_dist.ops import dispatcher, flash_attn_varlen_func, varlen_attention_backward, varlen_attention_forward
from turbo_dist.testing import run_distributed

from conftest import world_sizes_for_device
from dist_utils import backend_switch, rank_device, seeded

OPS = ("attention_varlen_fwd", "attention_varlen_bwd")


_reset_backends, use = backend_switch(OPS)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def cu_of(lens, device="cpu", dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype, device=device)


def make_packed(lq, lk, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    tq, tk = sum(lq), sum(lk)
    return mk(tq, hq, d), mk(tk, hkv, d), mk(tk, hkv, d), mk(tq, hq, d), cu_of(lq, device), cu_of(lk, device)


def _math_sequence(q, k, v, do, causal, scale):
    """One sequence ([L, H, D], GQA) in float64 with autograd, written here and not through the library's own
    reference (the "reference" varlen backend wraps that one). Bottom-right causal; rows that see no key are
    left out (o = 0, lse = -inf, dq = 0)."""
    lq, lk = q.shape[0], k.shape[0]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
    live = keep.any(1)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", qd[live], kd.repeat_interleave(rep, 1)) * scale
    s = s.masked_fill(~keep[live][None], float("-inf"))
    o_live = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vd.repeat_interleave(rep, 1))
    (o_live * do.double()[live]).sum().backward()
    o = torch.zeros(lq, q.shape[1], v.shape[2], dtype=torch.float64)
    o[live] = o_live.detach()
    lse = torch.full((q.shape[1], lq), float("-inf"), dtype=torch.float64)
    lse[:, live] = torch.logsumexp(s, -1).detach()
    return o, lse, qd.grad, kd.grad, vd.grad


def per_sequence_dense(q, k, v, do, cu_q, cu_k, causal, scale=None):
    """Ground truth: plain float64 attention on each sequence alone (_math_sequence), outputs packed back.
    Rows with no visible key: o = 0, lse = -inf, dq = 0; keys no query sees: dk = dv = 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc, doc = (t.detach().cpu() for t in (q, k, v, do))
    o = torch.zeros(qc.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    dq, dk, dv = torch.zeros(qc.shape, dtype=torch.float64), torch.zeros(kc.shape, dtype=torch.float64), \
        torch.zeros(vc.shape, dtype=torch.float64)
    vq, vk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(vq) - 1):
        a, b, c, e = vq[i], vq[i + 1], vk[i], vk[i + 1]
        if b == a or e == c:
            continue
        o[a:b], lse[:, a:b], dq[a:b], dk[c:e], dv[c:e] = _math_sequence(qc[a:b], kc[c:e], vc[c:e], doc[a:b], causal,
                                                                        scale)
    dev = q.device
    return o.float().to(dev), lse.float().to(dev), dq.float().to(dev), dk.float().to(dev), dv.float().to(dev)


def check_varlen(name, lq, lk, hq, hkv, d, causal, dtype, tol_o, tol_g, device="cpu", seed=0):
    q, k, v, do, cu_q, cu_k = make_packed(lq, lk, hq, hkv, d, dtype, device, seed)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu_q, cu_k, causal)
    use(name)
    o, lse = varlen_attention_forward(q, k, v, cu_q, cu_k, max(lq), max(lk), causal)
    assert dispatcher.last_backend("attention_varlen_fwd") == name
    assert o.shape == q.shape and o.dtype == q.dtype and o.device == q.device
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin), "rows without visible keys must get lse = -inf"
    assert torch.equal(o.transpose(0, 1)[~fin], torch.zeros_like(o.transpose(0, 1)[~fin]))
    assert rel(o, o_ref) < tol_o
    assert (lse[fin].double() - lse_ref[fin].double()).abs().max().item() < 10 * tol_o
    # backward from the reference (o, lse), as the CP a2a and autograd hand them over
    dq, dk, dv = varlen_attention_backward(do, q, k, v, o_ref.to(dtype), lse_ref, cu_q, cu_k, max(lq), max(lk), causal)
    assert dispatcher.last_backend("attention_varlen_bwd") == name
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for what, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel(got, want) < tol_g, (name, what, rel(got, want))
    return o, lse, dq, dk, dv


# (lq, lk, causal): a zero-length sequence, one longer than the interpreter's 16-row tile, odd lengths,
# tiles spanning several sequences; lq != lk (non-causal, and causal bottom-right with both Sq > Sk and
# Sq < Sk per sequence, which leaves rows with no key); an empty key sequence under a non-empty query one.
SAME = [5, 0, 37, 1, 20]
CASES = {
    "same_causal": (SAME, SAME, True),
    "same_full": (SAME, SAME, False),
    "cross_full": (SAME, [9, 3, 20, 0, 33], False),
    "cross_causal": (SAME, [9, 3, 20, 0, 33], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_vs_dense(case):
    lq, lk, causal = CASES[case]
    check_varlen("reference", lq, lk, 4, 2, 16, causal, torch.float32, 1e-6, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter(case, dtype):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    lq, lk, causal = CASES[case]
    tol_o, tol_g = (1e-5, 1e-5) if dtype == torch.float32 else (2e-3, 5e-3)
    got = check_varlen("triton", lq, lk, 4, 2, 16, causal, dtype, tol_o, tol_g)
    if dtype == torch.float32:  # and the two backends agree with each other
        want = check_varlen("reference", lq, lk, 4, 2, 16, causal, dtype, 1e-6, 1e-6)
        for a, b in zip(got, want):
            fin = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), fin)
            torch.testing.assert_close(a[fin], b[fin], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tiles", [((32, 64), (64, 32)), ((64, 32), (32, 16))], ids=["m32n64", "m64n32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_tile_shapes(tiles, causal):
    """The per-tile sequence ranges hold for any tiles (GPU configs differ from the interpreter's 16x16):
    rectangular tiles, sequences shorter and longer than a tile, several sequences per tile."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from turbo_dist.kernels.flash_attn import FlashConfig, flash_attn_varlen_backward, flash_attn_varlen_forward

    (m1, n1), (m2, n2) = tiles
    lq, lk = [70, 3, 0, 45, 9], [70, 3, 0, 45, 9] if causal else [40, 1, 5, 77, 0]
    q, k, v, do, cu_q, cu_k = make_packed(lq, lk, 2, 1, 16, torch.float32, seed=8)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu_q, cu_k, causal)
    o, lse = flash_attn_varlen_forward(q, k, v, cu_q.long(), cu_k.long(), causal, None, config=FlashConfig(m1, n1))
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    assert rel(o, o_ref) < 1e-5 and (lse[fin] - lse_ref[fin]).abs().max() < 1e-5
    grads = flash_attn_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, causal, None,
                                       dkdv_config=FlashConfig(m1, n1), dq_config=FlashConfig(m2, n2))
    for got, want in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_autograd_flash_attn_varlen_func(name):
    if name == "triton" and torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    use(name)
    lq = [3, 18, 0, 11]
    q, k, v, do, cu_q, cu_k = make_packed(lq, lq, 4, 1, 8, torch.float32, seed=4)  # MQA
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = flash_attn_varlen_func(qq, kk, vv, cu_q.long(), cu_k.long(), max(lq) + 5, max(lq), softmax_scale=0.3,
                                    causal=True, return_lse=True)
    assert dispatcher.last_backend("attention_varlen_fwd") == name
    assert lse.shape == (4, sum(lq)) and not lse.requires_grad
    o.backward(do)
    assert dispatcher.last_backend("attention_varlen_bwd") == name
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu_q, cu_k, True, scale=0.3)
    assert rel(o, o_ref) < 1e-5 and torch.allclose(lse, lse_ref, atol=1e-5)
    for got, want in ((qq.grad, dq_ref), (kk.grad, dk_ref), (vv.grad, dv_ref)):
        assert rel(got, want) < 1e-5
    o2 = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lq), causal=True, softmax_scale=0.3)
    assert isinstance(o2, torch.Tensor) and torch.allclose(o2, o.detach(), atol=1e-6)


def test_cpu_default_is_reference():
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    q, k, v, do, cu_q, cu_k = make_packed([4, 4], [4, 4], 2, 2, 16, torch.float32)
    varlen_attention_forward(q, k, v, cu_q, cu_k, 4, 4, True)
    assert dispatcher.last_backend("attention_varlen_fwd") == "reference"  # the interpreter runs only when named


def test_errors_before_any_kernel(monkeypatch):
    q, k, v, do, cu_q, cu_k = make_packed([3, 5], [3, 5], 4, 2, 16, torch.float32)
    o, lse = varlen_attention_forward(q, k, v, cu_q, cu_k, 5, 5)

    def no_kernel(*a, **kw):
        raise AssertionError("a kernel ran before the inputs were validated")

    monkeypatch.setattr(dispatcher, "dispatch", no_kernel)
    f = flash_attn_varlen_func
    cases = [
        (ValueError, "packed", lambda: f(q[None], k, v, cu_q, cu_k, 5, 5)),
        (TypeError, "must be a tensor", lambda: f(q, k.numpy(), v, cu_q, cu_k, 5, 5)),
        (TypeError, "dtypes differ", lambda: f(q.half(), k, v, cu_q, cu_k, 5, 5)),
        (TypeError, "fp16, bf16 and fp32", lambda: f(q.double(), k.double(), v.double(), cu_q, cu_k, 5, 5)),
        (ValueError, "multiple of kv heads", lambda: f(q[:, :3], k, v, cu_q, cu_k, 5, 5)),
        (ValueError, "do not match q", lambda: f(q, k[..., :8], v[..., :8], cu_q, cu_k, 5, 5)),
        (TypeError, "cu_seqlens_q must be a tensor", lambda: f(q, k, v, [0, 3, 8], cu_k, 5, 5)),
        (TypeError, "int32 or int64", lambda: f(q, k, v, cu_q.float(), cu_k, 5, 5)),
        (ValueError, "num_seqs", lambda: f(q, k, v, cu_q[None], cu_k, 5, 5)),
        (ValueError, "num_seqs", lambda: f(q, k, v, cu_q[:1], cu_k, 5, 5)),
        (ValueError, "cu_seqlens_k is on meta", lambda: f(q, k, v, cu_q, cu_k.to("meta"), 5, 5)),
        (ValueError, "start at 0", lambda: f(q, k, v, cu_q, torch.tensor([1, 3, 8], dtype=torch.int32), 5, 5)),
        (ValueError, "non-decreasing", lambda: f(q, k, v, torch.tensor([0, 6, 5, 8]), cu_of([2, 3, 3]), 6, 6)),
        (ValueError, "end at the packed length 8", lambda: f(q, k, v, cu_q, cu_of([3, 4]), 5, 5)),
        (ValueError, "end at the packed length 8", lambda: f(q, k, v, cu_of([3, 6]), cu_k, 6, 6)),
        (ValueError, "same number of sequences", lambda: f(q, k, v, cu_q, cu_of([3, 5, 0]), 5, 5)),
        (ValueError, "max_seqlen_q = 4 is below", lambda: f(q, k, v, cu_q, cu_k, 4, 5)),
        (ValueError, "max_seqlen_k = 2 is below", lambda: f(q, k, v, cu_q, cu_k, 5, 2)),
        (TypeError, "max_seqlen_q must be an int", lambda: f(q, k, v, cu_q, cu_k, 5.0, 5)),
        (ValueError, "lse must be", lambda: varlen_attention_backward(do, q, k, v, o, lse.t(), cu_q, cu_k, 5, 5)),
        (ValueError, "does not match q", lambda: varlen_attention_backward(do[:4], q, k, v, o, lse, cu_q, cu_k)),
        (ValueError, "o ", lambda: varlen_attention_backward(do, q, k, v, o[:, :2], lse, cu_q, cu_k)),
        (TypeError, "lse must be float32", lambda: varlen_attention_backward(do, q, k, v, o, lse.long(), cu_q, cu_k)),
        (ValueError, "non-decreasing",
         lambda: varlen_attention_forward(q, k, v, torch.tensor([0, 9, 8]), cu_k)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    monkeypatch.undo()
    if not torch.cuda.is_available():
        dispatcher.set_backend("attention_varlen_fwd", "triton")
        with pytest.raises(ValueError, match="bf16"):
            varlen_attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, 5, 5)
    with pytest.raises(ValueError, match="no backend"):
        dispatcher.set_backend("attention_varlen_fwd", "flash")  # no aten varlen backend


# ---------------------------------------------------------------- context parallel (a2a)
# (lens, causal, hq, hkv, num_chunks, backend): the packed total is divisible by 2 and 4; sequences cross
# shard boundaries; GQA with kv heads divisible by cp and replicated (hkv < cp).
CP_LENS = [7, 0, 13, 20, 8]
CP_CONFIGS = [
    (CP_LENS, True, 4, 2, 2, None),
    (CP_LENS, False, 4, 4, 1, None),
    ([1, 30, 0, 17], True, 4, 1, 2, None),
    (CP_LENS, True, 4, 2, 1, "triton"),  # the Triton kernels inside a2a (interpreter on CPU)
]


def _varlen_cp(rank, world_size, dtype_name, configs, scale_len=1, mode="a2a"):
    torch.set_num_threads(1)  # gloo ranks on 2 cores: OpenMP spinning otherwise (see test_cp._rank_setup)
    dtype = getattr(torch, dtype_name)
    dev = rank_device()
    out = []
    for ci, (lens, causal, hq, hkv, nc, backend) in enumerate(configs):
        if backend == "triton" and dev.type == "cpu" and world_size > 2:
            continue  # the interpreter is slow: cp=2 covers it on CPU
        lens = [n * scale_len for n in lens]
        g = seeded(50 + ci)
        t = sum(lens)
        q, do = (torch.randn(t, hq, 16, generator=g).to(dev, dtype) for _ in range(2))
        k, v = (torch.randn(t, hkv, 16, generator=g).to(dev, dtype) for _ in range(2))
        cu = cu_of(lens, dev)
        for op in OPS:
            dispatcher.set_backend(op, backend)
        try:
            ql, kl, vl = (cp.shard(x, None, 0, load_balance=False).detach().requires_grad_() for x in (q, k, v))
            if ci % 2:
                o = cp.context_parallel_attention(ql, kl, vl, causal=causal, cp_comm_type=mode, num_chunks=nc,
                                                  cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                                  max_seqlen_k=max(lens))
                lse = None
            else:
                o, lse = flash_attn_varlen_func(ql, kl, vl, cu, cu, max(lens), max(lens), causal=causal,
                                                return_lse=True,
                                                cp_param_bundle={"cp_group": dist.group.WORLD, "cp_comm_type": mode,
                                                                 "num_chunks": nc})
                assert lse.shape == (hq, ql.shape[0]) and lse.dtype == torch.float32 and not lse.requires_grad
            assert dispatcher.last_backend("attention_varlen_fwd") == (backend or dispatcher.choose(
                "attention_varlen_fwd", q, k, v, cu, cu, max(lens), max(lens), causal, None).name)
            assert o.shape == ql.shape and o.dtype == dtype
            o.backward(cp.shard(do, None, 0, load_balance=False))
        finally:
            for op in OPS:
                dispatcher.set_backend(op, None)
        # single process, whole packed sequence, fp32 reference
        o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu, cu, causal)
        what = f"{mode} cfg {ci} causal={causal} hq={hq} hkv={hkv} nc={nc} {backend} rank={rank}/{world_size}"
        if lse is not None:  # this rank's rows of the whole sequence's log-sum-exp (-inf where no key is seen)
            torch.testing.assert_close(lse, cp.shard(lse_ref, None, 1, load_balance=False), atol=1e-3, rtol=1e-3,
                                       msg=f"{what} lse")
        for name, got, ref in (("o", o.detach(), o_ref), ("dq", ql.grad, dq_ref), ("dk", kl.grad, dk_ref),
                               ("dv", vl.grad, dv_ref)):
            assert got.dtype == dtype, (what, name)
            got = cp.unshard(got, None, 0, load_balance=False).float()
            if dtype == torch.float32:  # (GPU fp32: other summation orders than the CPU reference)
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"{what} {name}")
            else:
                err = rel(got, ref)
                assert err < 2e-2, f"{what} {name}: relative error {err:.3g}"
        out.append(ci)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
def test_cp_a2a_varlen_matches_single_process(world_size):
    results = run_distributed(_varlen_cp, world_size, args=("float32", CP_CONFIGS))
    want = [0, 1, 2, 3] if world_size == 2 or torch.cuda.is_available() else [0, 1, 2]
    assert all(r == want for r in results), results


def _zigzag_cp(rank, world_size, causal, hq, hkv, mode="a2a"):
    """Megatron's THD layout (per-sequence zigzag, cp.shard_packed) through `mode` vs one process."""
    torch.set_num_threads(1)
    dev = rank_device()
    unit = 2 * world_size
    lens = [2 * unit, 0, 5 * unit, unit, 3 * unit]
    g = seeded(71)
    t = sum(lens)
    q, do = (torch.randn(t, hq, 16, generator=g).to(dev) for _ in range(2))
    k, v = (torch.randn(t, hkv, 16, generator=g).to(dev) for _ in range(2))
    cu = cu_of(lens, dev)
    ql, kl, vl = (cp.shard_packed(x, cu).detach().requires_grad_() for x in (q, k, v))
    o, lse = flash_attn_varlen_func(ql, kl, vl, cu, cu, max(lens), max(lens), causal=causal, return_lse=True,
                                    cp_param_bundle={"cp_group": None, "cp_comm_type": mode, "load_balance": True})
    o.backward(cp.shard_packed(do, cu))
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = per_sequence_dense(q, k, v, do, cu, cu, causal)
    torch.testing.assert_close(lse, cp.shard_packed(lse_ref.t(), cu).t(), atol=1e-4, rtol=1e-4,
                               msg=f"zigzag {mode} lse rank {rank}/{world_size} causal={causal}")
    for name, got, ref in (("o", o.detach(), o_ref), ("dq", ql.grad, dq_ref), ("dk", kl.grad, dk_ref),
                           ("dv", vl.grad, dv_ref)):
        torch.testing.assert_close(got.float(), cp.shard_packed(ref, cu).float(), atol=1e-4, rtol=1e-4,
                                   msg=f"zigzag {mode} {name} rank {rank}/{world_size} causal={causal}")
    return True


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("causal,hq,hkv", [(True, 4, 2), (False, 4, 4)])
@pytest.mark.parametrize("mode", ["a2a", "ring", "allgather"])
def test_cp_varlen_thd_zigzag_matches_single_process(world_size, causal, hq, hkv, mode):
    """Megatron / TransformerEngine THD context parallelism: every sequence in 2*cp chunks, rank r holding
    chunks r and 2cp-1-r of each; a2a permutes to natural order around the varlen kernels, ring attends each
    query chunk to the earlier (and, on the diagonal step, its own) chunks of the rotating blocks, allgather
    attends each local chunk to its sequence's gathered keys up to the chunk's end."""
    assert all(run_distributed(_zigzag_cp, world_size, args=(causal, hq, hkv, mode)))


def test_thd_local_layout():
    """allgather on THD zigzag shards: rank r's query pieces and the natural key ranges they attend."""
    from turbo_dist.cp.allgather import thd_local_layout

    cu = [0, 8, 8, 12]  # cp=2: chunks of 2 (sequence 0) and 1 (sequence 2); sequence 1 empty
    assert thd_local_layout(cu, 2, 0, True) == ([0, 2, 4, 5, 6], [0, 2, 10, 11, 15], [(0, 2), (0, 8), (8, 9), (8, 12)])
    assert thd_local_layout(cu, 2, 1, True) == ([0, 2, 4, 5, 6], [0, 4, 10, 12, 15],
                                                [(0, 4), (0, 6), (8, 10), (8, 11)])
    assert thd_local_layout(cu, 2, 1, False) == ([0, 4, 6], [0, 8, 12], [(0, 8), (8, 12)])


def test_packed_zigzag_order():
    from turbo_dist.cp.a2a import packed_zigzag_order

    order = packed_zigzag_order([0, 8, 8, 12], 2).tolist()  # chunks of 2 (seq 0) and 1 (seq 2)
    assert order == [0, 1, 6, 7, 8, 11, 2, 3, 4, 5, 9, 10]
    assert sorted(order) == list(range(12))


@pytest.mark.dist
@pytest.mark.parametrize("world_size", world_sizes_for_device(2, 4))
@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_cp_allgather_ring_varlen_matches_single_process(world_size, mode):
    """allgather: K/V gathered, each rank's queries attend the slice of keys their sequences need; ring: K/V
    blocks rotate, each step attends to the slice of the block the local sequences reach."""
    results = run_distributed(_varlen_cp, world_size, args=("float32", CP_CONFIGS), kwargs={"mode": mode})
    want = [0, 1, 2, 3] if world_size == 2 or torch.cuda.is_available() else [0, 1, 2]
    assert all(r == want for r in results), results


@pytest.mark.parametrize("causal", [False, True])
def test_allgather_varlen_local_layout(causal):
    """The key slice and local cu_seqlens of each rank, against the per-row definition: query row p of
    sequence i sees keys [cu_k[i], cu_k[i+1]) (causal: up to its bottom-right diagonal) -- for cross-attention
    lengths (cu_q != cu_k), empty sequences and sequences spanning ranks."""
    from turbo_dist.cp.allgather import varlen_local_layout

    cu_q = [0, 5, 5, 9, 20, 24]
    cu_k = [0, 7, 9, 9, 22, 24] if not causal else [0, 7, 9, 13, 22, 24]
    for lo, hi in ((0, 6), (6, 12), (12, 18), (18, 24), (0, 24)):
        cq, ck, k0, k1 = varlen_local_layout(cu_q, cu_k, lo, hi, causal)
        assert cq[0] == 0 and cq[-1] == hi - lo and ck[0] == 0 and k0 + ck[-1] == k1
        for s in range(len(cq) - 1):
            for r in range(cq[s], cq[s + 1]):
                p = lo + r
                i = next(i for i in range(len(cu_q) - 1) if cu_q[i] <= p < cu_q[i + 1])
                first, last = cu_k[i], cu_k[i + 1]
                if causal:
                    last = min(last, cu_k[i + 1] - (cu_q[i + 1] - p) + 1)  # keys j <= diagonal of p
                # local: row r of local sequence s sees local keys [ck[s], ck[s] + (r - cq[s]) + lk - lq]
                lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
                hi_k = ck[s] + (r - cq[s]) + lk - lq + 1 if causal else ck[s + 1]
                seen = (k0 + ck[s], k0 + max(ck[s], hi_k))
                want = (first, max(first, last))
                assert seen == want or (seen[0] == seen[1] and want[0] == want[1]), (lo, hi, p, seen, want)


def test_ring_varlen_block_layout():
    """Each ring step's slice of the K/V block and local cu_seqlens, against the per-row definition: query row
    p of sequence i sees, in block [k_lo, k_hi), the keys [cu_k[i], cu_k[i+1]) that lie in the block."""
    from turbo_dist.cp.ring import ring_block_layout

    cu_q, cu_k = [0, 5, 5, 9, 20, 24], [0, 7, 9, 9, 22, 24]
    for q_lo in range(0, 24, 6):
        for k_lo in range(0, 24, 6):
            cq, ck, k0, k1 = ring_block_layout(cu_q, cu_k, q_lo, q_lo + 6, k_lo, k_lo + 6)
            assert cq[0] == 0 and cq[-1] == 6 and ck[0] == 0 and k0 + ck[-1] == k1 and k_lo <= k0 <= k1 <= k_lo + 6
            for s in range(len(cq) - 1):
                for r in range(cq[s], cq[s + 1]):
                    i = next(i for i in range(len(cu_q) - 1) if cu_q[i] <= q_lo + r < cu_q[i + 1])
                    want = (max(cu_k[i], k_lo), min(cu_k[i + 1], k_lo + 6))
                    seen = (k0 + ck[s], k0 + ck[s + 1])
                    assert seen == want or (seen[0] == seen[1] and want[0] >= want[1]), (q_lo, k_lo, r, seen, want)


def _cp_varlen_errors(rank, world_size):
    torch.set_num_threads(1)
    dev = rank_device()
    lens = [5, 3, 8]
    x = torch.randn(16 // world_size, 4, 8, device=dev)
    cu = cu_of(lens, dev)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    cu_other = cu_of([8, 3, 5], dev)
    with pytest.raises(NotImplementedError, match="cu_seqlens_q == cu_seqlens_k"):
        cp.context_parallel_attention(x, x, x, causal=True, cp_comm_type="ring", **dict(kw, cu_seqlens_k=cu_other))
    o_ring = flash_attn_varlen_func(x, x, x, cu, cu, 8, 8, cp_param_bundle={"cp_group": None})  # default: ring
    o_a2a = flash_attn_varlen_func(x, x, x, cu, cu, 8, 8, cp_param_bundle={"cp_group": None, "cp_comm_type": "a2a"})
    torch.testing.assert_close(o_ring, o_a2a, rtol=1e-5, atol=1e-5)
    lses = [flash_attn_varlen_func(x, x, x, cu, cu, 8, 8, return_lse=True,
                                   cp_param_bundle={"cp_group": None, "cp_comm_type": m})[1]
            for m in ("ring", "a2a", "allgather")]
    for other in lses[1:]:  # every mode gives this rank's rows of the same log-sum-exp
        torch.testing.assert_close(other, lses[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):  # zigzag: every length a multiple of 2*cp
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", load_balance=True, **kw)
    if world_size > 1:
        with pytest.raises(ValueError, match="not divisible"):
            cp.shard_packed(torch.zeros(16, 2), cu)
        for mode in ("a2a", "allgather"):  # zigzag shards: one packing for q and k/v
            with pytest.raises(NotImplementedError, match="zigzag layout needs cu_seqlens_q == cu_seqlens_k"):
                cp.context_parallel_attention(x, x, x, cp_comm_type=mode, load_balance=True,
                                              **dict(kw, cu_seqlens_k=cu_other))
    with pytest.raises(ValueError, match="divisible by cp"):
        bad = cu_of([5, 3, 8 - world_size], dev)  # the global length is not the shards' total
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match=r"\[T/cp, heads, head_dim\]"):
        cp.context_parallel_attention(x[None], x[None], x[None], cp_comm_type="a2a", **kw)
    with pytest.raises(ValueError, match="both cu_seqlens_q and cu_seqlens_k"):
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", cu_seqlens_q=torch.tensor([0, 9, 8, 16], device=dev),
                                      cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="max_seqlen_q = 7 is below"):
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", **dict(kw, max_seqlen_q=7))
    with pytest.raises(ValueError, match="q heads divisible"):
        y = torch.randn(16 // world_size, 3, 8, device=dev)
        cp.context_parallel_attention(y, y, y, cp_comm_type="a2a", **kw)
    with pytest.raises(TypeError, match="cu_seqlens_q/cu_seqlens_k"):
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k is on meta"):
        cp.context_parallel_attention(x, x, x, cp_comm_type="a2a", **dict(kw, cu_seqlens_k=cu.to("meta")))
    with pytest.raises(ValueError, match="for packed sequences"):
        cp.context_parallel_attention(x[None], x[None], x[None], cp_comm_type="a2a", max_seqlen_q=8)
    return True


@pytest.mark.dist
def test_cp_varlen_errors():
    assert run_distributed(_cp_varlen_errors, 2) == [True, True]


# ------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    # (lq, lk, hq, hkv, d, causal)
    ([300, 0, 1, 129, 64, 511], [300, 0, 1, 129, 64, 511], 8, 2, 128, True),
    ([300, 0, 1, 129, 64, 511], [300, 0, 1, 129, 64, 511], 8, 8, 64, False),
    ([200, 17, 0, 333], [333, 40, 9, 100], 4, 2, 64, False),   # lq != lk
    ([200, 17, 0, 333], [333, 40, 9, 100], 4, 4, 128, True),   # causal bottom-right, rows without keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_varlen(case, dtype):
    lq, lk, hq, hkv, d, causal = GPU_CASES[case]
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    q, k, v, do, cu_q, cu_k = make_packed(lq, lk, hq, hkv, d, dtype, device="cuda")
    # Triton is the default varlen backend on CUDA (the only fused one)
    chosen = dispatcher.choose("attention_varlen_fwd", q, k, v, cu_q, cu_k, max(lq), max(lk), causal, None).name
    assert chosen == "triton"
    check_varlen("triton", lq, lk, hq, hkv, d, causal, dtype, tol, 2 * tol, device="cuda")


@pytest.mark.gpu
def test_gpu_triton_varlen_fp32():
    check_varlen("triton", [100, 0, 77], [100, 0, 77], 4, 2, 128, True, torch.float32, 1e-4, 1e-4, device="cuda")


@pytest.mark.gpu
def test_gpu_varlen_repeat_call_syncs_nothing():
    """The second call with the same cu_seqlens tensors (every later layer of a batch) neither reads them back nor
    waits for the stream: torch's sync debug mode raises on any device sync, forward and backward."""
    q, k, v, do, cu_q, cu_k = make_packed([300, 0, 129], [300, 0, 129], 8, 2, 64, torch.bfloat16, device="cuda")
    q.requires_grad_()
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 300, causal=True).backward(do)  # reads cu once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 300, causal=True)
        o.backward(do)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cu_q.add_(0)  # a write: read again (outside the debug mode)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 300, causal=True)


@pytest.mark.parametrize("case", ["same_causal", "cross_full"])
def test_triton_wide_index_math_interpreter(case, monkeypatch):
    """WIDE=True (int64 row/head offsets, chosen for tensors spanning >= 2**31 elements) gives the int32
    path's results exactly; forced here by lowering the threshold (CPU interpreter, fp32)."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from turbo_dist.kernels import flash_attn as fa

    lq, lk, causal = CASES[case]
    runs = []
    for wide_min in (fa.WIDE_INDEX_MIN, 0):
        monkeypatch.setattr(fa, "WIDE_INDEX_MIN", wide_min)
        assert fa._wide(torch.zeros(1, 4, 2, 8)) == (wide_min == 0)
        runs.append(check_varlen("triton", lq, lk, 4, 2, 16, causal, torch.float32, 1e-5, 1e-5))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_triton_varlen_past_int32_offsets():
    """A packed batch whose q/k/v span more than 2**31 elements (1M tokens x 16 heads x 128): the last
    sequences (offsets past 2**31) match the same sequences attended alone, forward and backward."""
    from turbo_dist.kernels import flash_attn as fa

    free = torch.cuda.mem_get_info()[0]
    h, d, seq = 16, 128, 4096
    n = -(-(2 ** 31 + 2 ** 20) // (h * d * seq))  # sequences: just past 2**31 elements per tensor
    t = n * seq
    if free < 12 * t * h * d * 2:  # q, k, v, o, do, dq, dk, dv (bf16) and slack
        pytest.skip(f"needs ~{12 * t * h * d * 2 / 2**30:.0f} GiB free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, do = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    assert fa._wide(q[None])
    cu = torch.arange(0, t + 1, seq, device="cuda", dtype=torch.int32)
    o, lse = fa.flash_attn_varlen_forward(q, k, v, cu, cu, causal=True)
    dq, dk, dv = fa.flash_attn_varlen_backward(do, q, k, v, o, lse, cu, cu, causal=True)
    for i in (0, n - 1):  # the first sequence (small offsets) and the last (past 2**31)
        sl = slice(i * seq, (i + 1) * seq)
        qs, ks, vs, dos = (x[sl][None] for x in (q, k, v, do))
        o_s, lse_s = fa.flash_attn_forward(qs, ks, vs, causal=True)
        dq_s, dk_s, dv_s = fa.flash_attn_backward(dos, qs, ks, vs, o_s, lse_s, causal=True)
        assert rel(o[sl], o_s[0]) < 1e-3 and (lse[:, sl] - lse_s[0]).abs().max().item() < 1e-3, i
        for got, want in ((dq[sl], dq_s[0]), (dk[sl], dk_s[0]), (dv[sl], dv_s[0])):
            assert rel(got, want) < 1e-2, (i, rel(got, want))


@pytest.mark.dist
@pytest.mark.gpu(min_gpus=2)
@pytest.mark.parametrize("world_size", world_sizes_for_device(2))
@pytest.mark.parametrize("mode", ["a2a", "allgather", "ring"])
def test_cp_varlen_gpu_bf16(world_size, mode):
    # lengths x16: sequences of hundreds of tokens, crossing shard boundaries; default backend (triton)
    results = run_distributed(_varlen_cp, world_size, args=("bfloat16", CP_CONFIGS[:3], 16), kwargs={"mode": mode})
    assert all(r == [0, 1, 2] for r in results), results


def test_bench_varlen_dry_run(tmp_path, capsys):
    """benchmarks/bench_varlen_attention.py end to end on CPU (tiny sizes): every row checked and written."""
    import json
    import os

    from bench_utils import import_benchmark

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU dry run (the GPU run is the benchmark itself)")
    bench = import_benchmark("bench_varlen_attention")
    out = tmp_path / "varlen.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["phase"], r["impl"]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd")
                                                        for i in ("ours", "per_doc_loop")}
    assert all(r["ms"] > 0 and r["max_rel_err"] is not None and r["max_rel_err"] < 1e-4 for r in rows)


@pytest.mark.dist
def test_bench_cp_varlen_cpu_check(tmp_path):
    """benchmarks/bench_cp_attention.py --varlen-docs under torchrun on 2 gloo ranks: every mode's packed
    result matches the single-process one (the bench checks and reports it; here we read the JSON)."""
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the CPU check (the GPU run is the benchmark itself)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "cp_varlen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "benchmarks", "bench_cp_attention.py"), "--cpu-check", "--varlen-docs", "4:40",
           "--seqlens", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--warmup", "1", "--iters", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] in ("a2a", "ring", "allgather")]
    assert {r["impl"] for r in ours} == {"a2a", "ring", "allgather"} and all(r["docs"] > 1 for r in rows)
    assert all(r["rel_err_o"] < 1e-5 for r in ours)
    assert all(r["rel_err_dq"] < 1e-5 for r in ours if r["pass"] == "fwd+bwd")


def _single_rank_packed(rank, world_size):
    """One CP rank: both layouts are the natural order, so load_balance=True with odd sequence lengths is the
    plain packed attention in every mode (ring cut each sequence into two halves of L // 2 and dropped rows);
    an empty packed batch gives empty outputs."""
    torch.set_num_threads(1)
    lens = [5, 3, 1, 7]
    g = seeded(81)
    q, do = (torch.randn(sum(lens), 4, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(sum(lens), 2, 8, generator=g) for _ in range(2))
    cu = cu_of(lens)
    o_ref, lse_ref, dq_ref, _, _ = per_sequence_dense(q, k, v, do, cu, cu, True)
    for mode in ("ring", "a2a", "allgather"):
        ql = q.clone().requires_grad_()
        o, lse = flash_attn_varlen_func(ql, k, v, cu, cu, 7, 7, causal=True, return_lse=True,
                                        cp_param_bundle={"cp_group": None, "cp_comm_type": mode, "load_balance": True})
        o.backward(do)
        assert rel(o, o_ref) < 1e-5 and rel(ql.grad, dq_ref) < 1e-5, mode
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref)), mode
        e = torch.zeros(0, 4, 8, requires_grad=True)
        o0, lse0 = flash_attn_varlen_func(e, e[:, :2], e[:, :2], cu_of([0]), cu_of([0]), None, None, causal=True,
                                          return_lse=True, cp_param_bundle={"cp_group": None, "cp_comm_type": mode})
        assert o0.shape == (0, 4, 8) and lse0.shape == (4, 0), mode
    return True


@pytest.mark.dist
def test_cp_single_rank_packed_zigzag_and_empty():
    assert run_distributed(_single_rank_packed, 1, backend="gloo") == [True]  # CPU fp32 tensors, on any machine


def _packed_plan_once(rank, world_size):
    """Packed CP makes its checks, cross-rank refusal flag and plan once per cu_seqlens tensor (every layer passes
    the same one): a repeat call reads nothing back, all-reduces nothing before the attention and builds no plan;
    an in-place write of new boundaries into the same tensor makes a new plan (results checked against one
    process with the new boundaries)."""
    from unittest import mock

    import turbo_dist.cp as cpm

    torch.set_num_threads(1)
    dev = rank_device()
    unit = 2 * world_size
    g = seeded(91)
    t = 8 * unit
    q, do = (torch.randn(t, 4, 8, generator=g).to(dev) for _ in range(2))
    k, v = (torch.randn(t, 2, 8, generator=g).to(dev) for _ in range(2))
    counts = {}
    real = {name: getattr(cpm, name) for name in ("_check_packed", "raise_together", "ring_varlen_plan",
                                                    "allgather_varlen_plan", "a2a_varlen_order")}
    real_tolist = torch.Tensor.tolist

    def counted(name):
        def f(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real[name](*args, **kwargs)
        return f

    def tolist(x):
        if x.dtype in (torch.int32, torch.int64) and x.dim() == 1 and id(x) == id(cu):
            counts["reads"] = counts.get("reads", 0) + 1
        return real_tolist(x)

    seen = []
    for mode, zigzag in (("ring", False), ("ring", True), ("allgather", False), ("allgather", True),
                         ("a2a", True)):
        cu = cu_of([2 * unit, unit, 5 * unit], dev)
        for call, lens in enumerate(([2 * unit, unit, 5 * unit], None, [unit, 6 * unit, unit])):
            if lens is not None and call:
                cu.copy_(cu_of(lens, dev))  # new boundaries, same tensor: a new version
            lens = lens or [2 * unit, unit, 5 * unit]
            shard = (lambda x: cp.shard_packed(x, cu)) if zigzag else (lambda x: cp.shard(x, None, 0, False))
            ql, kl, vl = (shard(x).detach().requires_grad_() for x in (q, k, v))
            counts.clear()
            with mock.patch.multiple(cpm, **{name: counted(name) for name in real}), \
                    mock.patch.object(torch.Tensor, "tolist", tolist):
                o = cp.context_parallel_attention(ql, kl, vl, causal=True, cp_comm_type=mode, load_balance=zigzag,
                                                  cu_seqlens_q=cu, cu_seqlens_k=cu)
            o.backward(shard(do))
            seen.append((mode, zigzag, call, sorted(counts)))
            o_ref, _, dq_ref, dk_ref, _ = per_sequence_dense(q, k, v, do, cu, cu, True)
            for name, got, ref in (("o", o.detach(), o_ref), ("dq", ql.grad, dq_ref), ("dk", kl.grad, dk_ref)):
                torch.testing.assert_close(got, shard(ref), atol=1e-4, rtol=1e-4,
                                           msg=f"{mode} zigzag={zigzag} call {call} {name}")
    return seen


@pytest.mark.dist
def test_cp_packed_plan_once_per_cu_tensor():
    results = run_distributed(_packed_plan_once, 2)
    for seen in results:
        for mode, zigzag, call, names in seen:
            if call == 1:
                assert names == [], (mode, zigzag, names)  # nothing read, checked, all-reduced or planned again
            else:
                plan = {"ring": "ring_varlen_plan", "allgather": "allgather_varlen_plan", "a2a": "a2a_varlen_order"}
                # (cu_seqlens read back here or already by shard_packed: once per state of the tensor either way)
                assert {"_check_packed", "raise_together", plan[mode]} <= set(names), (mode, zigzag, call, names)
