"""Backend "wgmma" of grouped_gemm: our Hopper bf16 grouped GEMM (turbo_dist._fp8_wgmma's grouped_bf16,
csrc/fp8_wgmma/grouped_bf16.cu), which grouped_gemm's rule prefers on SM90. CPU: it declines what it cannot run,
with the reason (its source compiles in test_ops_fp8_wgmma's nvcc check, which covers every .cu of the folder); GPU
(marker `gpu`, SM90): against the float64 product on odd shapes, both b layouts (N-major forward, K-major dgrad),
one CTA per tile and two sharing the weights (bit-equal), the stream-K tail and dynamic half tiles on few CTAs,
and through ops.grouped_gemm with autograd.
"""
import types

import pytest
import torch

from turbo_dist.ops import dispatcher, grouped_gemm, grouped_wgmma

from test_ops_gemm import grouped_ref, make_grouped, rel, rnd


@pytest.fixture(autouse=True)
def _reset_backends():
    yield
    for op in ("grouped_gemm", "grouped_gemm_wgrad"):
        dispatcher.set_backend(op, None)


@pytest.fixture
def fake_kernels(monkeypatch):
    """The extension replaced by a recorder (CPU): each call's keyword arguments, in order; stream 7, 132 SMs."""
    from turbo_dist.kernels import gemm as gemm_kernels

    calls = []

    class Fake:
        def grouped_bf16(self, **kw):
            calls.append(kw)

        grouped_wgrad = grouped_bf16

    monkeypatch.setattr(grouped_wgmma, "wgmma_module", lambda: Fake())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(gemm_kernels, "_num_sms", lambda device: 132)
    return calls


def test_wgmma_grouped_declines_with_a_reason(monkeypatch):
    """Measured, so no longer opt-in: registered last, chosen by grouped_gemm's rule (test_dispatcher); where it
    cannot run it says why, and asked for anyway it raises that reason (no fallback)."""
    a, b, gl = make_grouped([3, 5], 16, 8, False, torch.bfloat16)
    can = grouped_wgmma._wgmma_grouped_can
    assert dispatcher.backends("grouped_gemm")[-1] == "wgmma"  # registered, last
    assert "CUDA" in can(a, b, gl)  # CPU tensors
    assert grouped_wgmma.preferred(a, b, gl) is False
    assert dispatcher.choose("grouped_gemm", a, b, gl, False).name != "wgmma"
    monkeypatch.setattr(grouped_wgmma, "_wgmma_grouped_can", lambda *args: True)
    assert grouped_wgmma.preferred(a, b, gl) is True
    monkeypatch.setattr(grouped_wgmma, "PREFERRED", False)
    assert grouped_wgmma.preferred(a, b, gl) is False
    monkeypatch.undo()
    cuda_like = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setitem(grouped_wgmma._MOD, "mod", None)
    monkeypatch.setitem(grouped_wgmma._MOD, "why", "turbo_dist._fp8_wgmma is not built (test)")
    assert "not built" in can(cuda_like, cuda_like, gl)
    dispatcher.set_backend("grouped_gemm", "wgmma")
    with pytest.raises(ValueError, match="CUDA"):  # asked for and unable: a clear error, no fallback
        grouped_gemm(a, b, gl)
    monkeypatch.setitem(grouped_wgmma._MOD, "mod", object())  # built without the bf16 kernel
    assert "rebuild" in can(cuda_like, cuda_like, gl)


def test_wgmma_grouped_passes_both_layouts(fake_kernels, monkeypatch):
    """What the wrapper hands the kernel (a fake module records it, CPU): sizes, b's row and group strides in
    elements for b [G, K, N] (N-major) and [G, N, K] (K-major, trans_b), one expert's whole matrix as its group
    stride, the cluster rule; K = 0 gives zeros without a launch."""
    calls = fake_kernels
    a = torch.zeros(10, 64, dtype=torch.bfloat16)
    for trans_b, shape in ((False, (3, 64, 48)), (True, (3, 48, 64)), (False, (1, 64, 48))):
        b = torch.zeros(*shape, dtype=torch.bfloat16)
        lens = torch.tensor([4, 0, 6] if shape[0] == 3 else [10])
        out = grouped_wgmma._grouped_bf16(a, b, lens, trans_b)
        kw = calls[-1]
        assert out.shape == (10, 48) and out.dtype == torch.bfloat16
        assert (kw["M"], kw["N"], kw["K"], kw["G"]) == (10, 48, 64, shape[0])
        assert kw["ldb"] == shape[2] and kw["b_group"] == shape[1] * shape[2] and kw["n_major"] == (not trans_b)
        assert kw["lda"] == 64 and kw["ldo"] == 48 and kw["stream"] == 7 and kw["num_sms"] == 132
        assert kw["cluster"] == grouped_wgmma.CLUSTER == 1
        assert ("tail_pct" in kw) == bool(grouped_wgmma.TAIL_PCT)
    assert grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), cluster=2) is not None and calls[-1]["cluster"] == 2
    assert "tail_pct" not in calls[-1]  # clusters: no stream-K tail by default
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), tail_pct=60, num_sms=5)
    kw = calls[-1]
    assert kw["tail_pct"] == 60 and kw["num_sms"] == kw["ws_ctas"] == 5 and kw["cluster"] == 1
    assert kw["ws"] and kw["flags"] and kw["timeout_s"] > 0
    assert "counter" not in kw  # a stream-K tail: the fixed round robin
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), half_tiles=True, num_sms=5)
    kw = calls[-1]
    assert kw["counter"] and kw["cluster"] == 1 and "tail_pct" not in kw
    monkeypatch.setattr(grouped_wgmma, "HALF_TILES", True)
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]))
    assert calls[-1]["counter"]
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), cluster=2)  # the default yields to a cluster
    assert "counter" not in calls[-1]
    assert "tall" not in calls[-1]  # tall tiles: opt-in
    monkeypatch.setattr(grouped_wgmma, "TALL_TILES", True)  # opted in: the N-major b only (the K-major measured slower)
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]))
    assert calls[-1]["counter"] and calls[-1]["tall"] is True
    grouped_wgmma._grouped_bf16(a, torch.zeros(1, 48, 64, dtype=torch.bfloat16), torch.tensor([10]), trans_b=True)
    assert calls[-1]["counter"] and "tall" not in calls[-1] and not calls[-1]["n_major"]
    monkeypatch.setattr(grouped_wgmma, "TALL_TILES", False)
    grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), tall=True, num_sms=5)
    assert calls[-1]["counter"] and calls[-1]["tall"] is True and "tail_pct" not in calls[-1]
    n = len(calls)
    for bad in (dict(cluster=2), dict(tail_pct=50)):
        with pytest.raises(ValueError, match="half_tiles needs cluster=1 and no stream-K tail"):
            grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), half_tiles=True, **bad)
    for bad in (dict(cluster=2), dict(tail_pct=50), dict(half_tiles=False)):
        with pytest.raises(ValueError, match="tall tiles run as dynamic tiles"):
            grouped_wgmma._grouped_bf16(a, b, torch.tensor([10]), tall=True, **bad)
    assert len(calls) == n
    out = grouped_wgmma._grouped_bf16(torch.zeros(10, 0, dtype=torch.bfloat16),
                                      torch.zeros(1, 0, 48, dtype=torch.bfloat16), torch.tensor([10]))
    assert len(calls) == n and out.shape == (10, 48) and not out.any()


def _gpu_or_skip():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    mod = grouped_wgmma.wgmma_module()
    if mod is None:
        pytest.skip(grouped_wgmma._MOD["why"])
    if not hasattr(mod, "grouped_bf16"):
        pytest.skip("turbo_dist._fp8_wgmma built without grouped_bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("lens,K,N", [
    ([300, 0, 77, 1, 129, 0, 512, 5], 7168, 2048),  # skewed, empty groups, rows off every tile, odd row tiles
    ([64, 65, 192, 193, 63], 512, 768),              # rows around the tile halves
    ([1], 64, 64),                                     # one row, one chunk of columns
    ([130, 60], 328, 200),                             # K off 64 and N off 64 / 128 / 256 (zero-filled, masked)
    ([0, 0, 0], 256, 256),                             # nothing to compute
    ([1000], 2048, 7168),                              # one group: fc2's shape
])
def test_wgmma_grouped_matches_reference_gpu(lens, K, N, trans_b):
    _gpu_or_skip()
    a, b, gl = make_grouped(lens, K, N, trans_b, torch.bfloat16, device="cuda")
    dispatcher.set_backend("grouped_gemm", "wgmma")
    assert grouped_wgmma._wgmma_grouped_can(a, b, gl.cuda(), trans_b) is True
    outs = {c: grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, cluster=c, tail_pct=0, half_tiles=False)
            for c in (1, 2)}
    half = grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, cluster=1, tail_pct=0, half_tiles=True)
    torch.cuda.synchronize()
    assert outs[1].shape == (sum(lens), N) and outs[1].dtype == torch.bfloat16
    assert torch.equal(outs[1], outs[2]), "one CTA per tile and two sharing the weights differ"
    if sum(lens) == 0:
        return
    # half tiles sum the same K steps in the same order (m64n128 instead of m64n256 WGMMAs)
    assert rel(half, outs[1]) < 1e-3, "dynamic half tiles differ from whole tiles"
    assert rel(outs[1], grouped_ref(a, b, gl, trans_b)) < 1e-2
    ref_torch = torch._grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=torch.cumsum(gl.cuda(), 0).int())
    assert rel(outs[1], ref_torch) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("num_sms", [3, 7, 16, 40])
def test_wgmma_grouped_stream_k_tail_gpu(num_sms, trans_b):
    """The stream-K tail (csrc/fp8_wgmma/common.h) on a few CTAs, so that tiles split at many K positions: the same
    product as whole tiles (fp32 partial sums added in another order: within bf16 rounding) and as float64."""
    _gpu_or_skip()
    lens = [300, 0, 77, 129, 512, 5, 1000]  # 2+1+2+4+1+8 = 18 row tiles x 2 column tiles
    a, b, gl = make_grouped(lens, 1344, 384, trans_b, torch.bfloat16, device="cuda")
    whole = grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, tail_pct=0, num_sms=num_sms)
    for pct, waves in ((25, 2), (100, 2), (100, 1)):
        out = grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, tail_pct=pct, num_sms=num_sms, tail_waves=waves)
        torch.cuda.synchronize()
        assert rel(out, whole) < 5e-3, (pct, waves, num_sms)
        assert rel(out, grouped_ref(a, b, gl, trans_b)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("num_sms", [1, 3, 7, 40, None])
def test_wgmma_grouped_dynamic_half_tiles_gpu(num_sms, trans_b):
    """Dynamic tiles with half tiles (a group's last <= 64 rows: m64n128 per consumer warpgroup) on 1 to all CTAs,
    so that the atomic counter hands tiles out under contention, and twice in a row on one stream (the counter is
    fresh per call): whole-tile results, float64."""
    _gpu_or_skip()
    lens = [64, 1, 0, 65, 128, 129, 192, 300, 63, 2, 0, 257, 700, 33]  # half tiles in 10 of the 14 groups
    _check_dynamic_tiles(lens, 704, 640, trans_b, num_sms, half_tiles=True)


def _check_dynamic_tiles(lens, K, N, trans_b, num_sms, **tiles):
    """The dynamic tile order `tiles` asks for (half_tiles=True, tall=True), twice in a row on one stream (the
    counter is fresh per call): finite, the whole tiles' sums (the same K steps in the same order) and float64's
    within bf16 rounding, equal bits both times."""
    a, b, gl = make_grouped(lens, K, N, trans_b, torch.bfloat16, device="cuda")
    whole = grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, tail_pct=0, half_tiles=False, num_sms=num_sms)
    outs = [grouped_wgmma.wgmma_grouped(a, b, gl.cuda(), trans_b, tail_pct=0, num_sms=num_sms, **tiles)
            for _ in range(2)]
    torch.cuda.synchronize()
    ref = grouped_ref(a, b, gl, trans_b)
    for out in outs:
        assert torch.isfinite(out).all()
        assert rel(out, whole) < 1e-3, num_sms
        assert rel(out, ref) < 1e-2
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("num_sms", [1, 3, 40, None])
@pytest.mark.parametrize("lens,K,N", [
    ([64, 1, 0, 65, 128, 129, 192, 300, 63, 2, 0, 257, 700, 33, 256, 384], 704, 640),  # every residue of 256 / 128
    ([300, 0, 77, 1, 129, 0, 512, 5], 7168, 2048),   # DeepSeek-V3's fc1 reduction, skewed
    ([130, 60], 328, 200),                            # K off 64, N off 64 / 128 (zero-filled, masked)
    ([1000], 2048, 7168),                             # one group: fc2's shape
])
def test_wgmma_grouped_tall_tiles_gpu(lens, K, N, num_sms, trans_b):
    """Tall tiles (256 x 128, each consumer warpgroup two m64n128 WGMMAs; a group's last <= 128 rows a half tile)
    on 1 to all CTAs, twice in a row, against the 128 x 256 whole tiles and float64."""
    _gpu_or_skip()
    _check_dynamic_tiles(lens, K, N, trans_b, num_sms, tall=True)


def test_wgmma_wgrad_passes_the_operands(fake_kernels):
    """What the weight-gradient wrapper hands the kernel (a fake module, CPU): x = a and y = dc for dB [G, K, N],
    swapped for trans_b ([G, N, K]); out's strides; a fresh counter; no launch without rows or columns."""
    calls = fake_kernels
    a, dc = torch.zeros(10, 64, dtype=torch.bfloat16), torch.zeros(10, 48, dtype=torch.bfloat16)
    lens = torch.tensor([4, 0, 6])
    out = grouped_wgmma._wgrad(a, dc, lens)
    kw = calls[-1]
    assert out.shape == (3, 64, 48) and kw["x"] == a.data_ptr() and kw["y"] == dc.data_ptr()
    assert (kw["M"], kw["P"], kw["Q"], kw["G"]) == (10, 64, 48, 3) and kw["ldo"] == 48 and kw["out_group"] == 64 * 48
    assert kw["ldx"] == 64 and kw["ldy"] == 48 and kw["num_sms"] == 132 and kw["stream"] == 7
    assert kw["cluster"] == grouped_wgmma.WGRAD_CLUSTER and bool(kw["counter"]) == (kw["cluster"] == 1)
    assert calls[-1]["stsm"] is grouped_wgmma.WGRAD_STSM
    grouped_wgmma._wgrad(a, dc, lens, cluster=1, stsm=True)
    assert calls[-1]["cluster"] == 1 and calls[-1]["counter"]  # one CTA per tile: the dynamic order's counter
    assert calls[-1]["stsm"] is True
    n = len(calls)
    for bad in (dict(cluster=0), dict(cluster=4)):
        with pytest.raises(ValueError, match="cluster must be 1 or 2"):  # before any allocation or launch
            grouped_wgmma._wgrad(a, dc, lens, **bad)
    assert len(calls) == n
    out = grouped_wgmma._wgrad(a, dc, lens, trans_b=True, num_sms=5)
    kw = calls[-1]
    assert out.shape == (3, 48, 64) and kw["x"] == dc.data_ptr() and kw["y"] == a.data_ptr()
    assert (kw["P"], kw["Q"], kw["ldo"], kw["num_sms"]) == (48, 64, 64, 5)
    n = len(calls)
    out = grouped_wgmma._wgrad(a[:0], dc[:0], torch.tensor([0, 0, 0]))
    assert len(calls) == n and out.shape == (3, 64, 48) and not out.any()  # no rows: zeros, no launch
    assert "CUDA" in grouped_wgmma._wgmma_wgrad_can(a, dc, lens)
    assert dispatcher.backends("grouped_gemm_wgrad")[-1] == "wgmma"


def _wgrad_ref(a, dc, lens, trans_b):
    out, start = [], 0
    for n in lens:
        x, y = a[start:start + n].double(), dc[start:start + n].double()
        out.append(y.t() @ x if trans_b else x.t() @ y)
        start += n
    return torch.stack(out)


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("lens,K,N,num_sms", [
    # skewed, empty groups, rows off every 64-row stage: last stages of 1-4 16-row steps, zeroed or not
    ([300, 0, 77, 1, 129, 0, 512, 5, 30, 48], 7168, 2048, None),
    ([64, 65, 63, 128, 0, 1], 328, 200, 3),                # K, N off the 128 x 256 tiles; few CTAs
    ([1000], 2048, 7168, 1),                                # one group, one CTA
    ([0, 0, 0], 256, 256, None),                            # no rows: zeros
])
def test_wgmma_wgrad_matches_reference_gpu(lens, K, N, num_sms, trans_b):
    _gpu_or_skip()
    if not hasattr(grouped_wgmma.wgmma_module(), "grouped_wgrad"):
        pytest.skip("turbo_dist._fp8_wgmma built without grouped_wgrad")
    M = sum(lens)
    a = rnd(M, K, dtype=torch.bfloat16, device="cuda", seed=1)
    dc = rnd(M, N, dtype=torch.bfloat16, device="cuda", seed=2)
    gl = torch.tensor(lens).cuda()
    assert grouped_wgmma._wgmma_wgrad_can(a, dc, gl, trans_b) is True
    out = grouped_wgmma.wgmma_wgrad(a, dc, gl, trans_b, num_sms=num_sms, cluster=1)
    again = grouped_wgmma.wgmma_wgrad(a, dc, gl, trans_b, num_sms=num_sms, cluster=1)
    pair = grouped_wgmma.wgmma_wgrad(a, dc, gl, trans_b, num_sms=None if num_sms is None else 2 * num_sms,
                                     cluster=2)
    stsm = [grouped_wgmma.wgmma_wgrad(a, dc, gl, trans_b, num_sms=num_sms if cl == 1 or num_sms is None else
                                      2 * num_sms, cluster=cl, stsm=True) for cl in (1, 2)]
    torch.cuda.synchronize()
    ref = _wgrad_ref(a, dc, lens, trans_b)
    assert out.shape == ref.shape and torch.equal(out, again)
    assert torch.equal(out, pair), "one CTA per tile and two sharing dc's boxes differ"
    assert torch.equal(out, stsm[0]) and torch.equal(out, stsm[1]), "the stmatrix epilogue stores other values"
    for g, n in enumerate(lens):
        if n == 0:
            assert not out[g].any(), "a group without rows must get a zero gradient"
        else:
            assert rel(out[g], ref[g]) < 1e-2, g


@pytest.mark.gpu
def test_wgmma_wgrad_keeps_groups_apart_gpu():
    """A group's last 64-row stage holds the next group's rows: zeroed before the WGMMA, so even inf / NaN there
    (group 1's gradient) leaves group 0's weight gradient finite and right."""
    _gpu_or_skip()
    if not hasattr(grouped_wgmma.wgmma_module(), "grouped_wgrad"):
        pytest.skip("turbo_dist._fp8_wgmma built without grouped_wgrad")
    lens = [70, 30, 100]
    a = rnd(200, 256, dtype=torch.bfloat16, device="cuda", seed=1)
    dc = rnd(200, 512, dtype=torch.bfloat16, device="cuda", seed=2)
    a[70:100] = float("nan")
    dc[70:100] = float("inf")
    ref = _wgrad_ref(a, dc, lens, False)
    for cluster in (1, 2):
        out = grouped_wgmma.wgmma_wgrad(a, dc, torch.tensor(lens).cuda(), cluster=cluster)
        torch.cuda.synchronize()
        for g in (0, 2):
            assert torch.isfinite(out[g]).all() and rel(out[g], ref[g]) < 1e-2, (cluster, g)


@pytest.mark.gpu
def test_wgmma_grouped_autograd_gpu():
    """ops.grouped_gemm with the backend forced: the forward (N-major b) and the dgrad (K-major) run our kernel,
    the weight gradient (forced too) ours as well; all against float64."""
    _gpu_or_skip()
    lens = [0, 900, 17, 0, 3000, 256, 1, 0]
    a, b, gl = make_grouped(lens, 7168, 2048, False, torch.bfloat16, device="cuda")
    a.requires_grad_()
    b.requires_grad_()
    dispatcher.set_backend("grouped_gemm", "wgmma")
    dispatcher.set_backend("grouped_gemm_wgrad", "wgmma")
    out = grouped_gemm(a, b, gl.cuda())
    assert dispatcher.last_backend("grouped_gemm") == "wgmma"
    dc = rnd(*out.shape, dtype=torch.bfloat16, device="cuda", seed=7)
    out.backward(dc)
    assert dispatcher.last_backend("grouped_gemm") == "wgmma"  # the dgrad
    assert dispatcher.last_backend("grouped_gemm_wgrad") == "wgmma"
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = grouped_ref(a64, b64, gl, False)
    ref.backward(dc.double())
    assert rel(out, ref) < 1e-2 and rel(a.grad, a64.grad) < 1e-2 and rel(b.grad, b64.grad) < 1e-2


def test_wgmma_predicates_refuse_what_tma_cannot_take(monkeypatch):
    """Past the device checks (faked here: CUDA tensors on an SM90, the extension built), the bf16 forward and
    weight-gradient predicates accept well-formed inputs and refuse, with the reason, what the kernels' TMA
    descriptors cannot take: a base off 16 bytes, strides or K / N off 8 elements, a transposed operand."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(grouped_wgmma, "wgmma_module",
                        lambda: types.SimpleNamespace(grouped_bf16=None, grouped_wgrad=None))
    can, wgrad_can = grouped_wgmma._wgmma_grouped_can, grouped_wgmma._wgmma_wgrad_can
    gl = torch.tensor([16, 16])
    a = torch.zeros(32, 64, dtype=torch.bfloat16)
    b = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    dc = torch.zeros(32, 32, dtype=torch.bfloat16)
    assert can(a, b, gl) is True and can(a, b.transpose(1, 2).contiguous(), gl, True) is True
    assert wgrad_can(a, dc, gl) is True
    off = torch.zeros(32 * 64 + 4, dtype=torch.bfloat16)[4:].view(32, 64)  # base 8 bytes off
    assert "16-byte" in can(off, b, gl) and "16-byte" in wgrad_can(off, dc, gl)
    assert "multiples of 8" in can(a[:, :60], b[:, :60], gl)  # K = 60
    assert "multiples of 8" in can(a, b[:, :, :30], gl)  # N = 30
    assert "multiples of 8" in wgrad_can(torch.zeros(32, 66, dtype=torch.bfloat16)[:, :64], dc[:, :30], gl)
    assert "row-major" in can(a.t().contiguous().t(), b, gl)
    assert "row-major" in wgrad_can(a, dc.t().contiguous().t(), gl)
    assert "bf16" in can(a.half(), b.half(), gl)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "SM90" in can(a, b, gl)


def test_public_entries_check_before_the_launch():
    """wgmma_grouped / wgmma_wgrad / wgmma_grouped_scaled called directly (README's "Use") run their predicate
    first: on this CPU a ValueError naming the reason, not an AttributeError from a missing extension."""
    from turbo_dist.ops import fp8_wgmma

    a, w = torch.randn(64, 32).bfloat16(), torch.randn(4, 32, 48).bfloat16()
    lens = torch.tensor([10, 0, 30, 24])
    with pytest.raises(ValueError, match="wgmma_grouped: wgmma needs a and b on one CUDA device"):
        grouped_wgmma.wgmma_grouped(a, w, lens, tail_pct=100, tail_waves=1)
    with pytest.raises(ValueError, match="wgmma_wgrad: wgmma needs a and dc on one CUDA device"):
        grouped_wgmma.wgmma_wgrad(a, torch.randn(64, 48).bfloat16(), lens)
    aq = torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    bq = torch.zeros(4, 128, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="wgmma_grouped_scaled: "):
        fp8_wgmma.wgmma_grouped_scaled(aq, bq, torch.ones(64, 1), torch.ones(4, 1, 1), lens, "block", torch.bfloat16)
