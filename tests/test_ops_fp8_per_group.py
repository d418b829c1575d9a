"""FP8 BLOCKWISE grouped GEMM as one cuBLAS(Lt) GEMM per group: backends "torch_loop" (torch._scaled_mm per group)
and "cublaslt" (the loop in C++, turbo_dist._cublaslt), the M-major scale layout kernel, the rules that pick
them, and CUDA-graph capture safety. CPU: the contracts, with torch._scaled_mm / the native module faked; GPU
(marker `gpu`): against the reference at real sizes. Helpers: tests/test_ops_fp8.py.
"""
import pytest
import torch

from turbo_dist.ops import ScalingGranularity, dispatcher, grouped_scaled_mm, quantize_fp8

from test_ops_fp8 import E4M3, grouped_ref, needs_interp, rnd, snr

B = ScalingGranularity.BLOCKWISE
OPS = ("quantize_fp8", "scaled_mm", "grouped_scaled_mm", "grouped_gemm_wgrad")


@pytest.fixture(autouse=True)
def _reset_backends():
    yield
    for op in OPS:
        dispatcher.set_backend(op, None)


def _one_launch():
    """The backend the default runs below the per-group loops' bars: our Hopper kernel where it was built for
    this GPU, else our Triton kernel."""
    from turbo_dist.ops import fp8_wgmma

    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    return "wgmma" if hopper and fp8_wgmma.wgmma_module() is not None else "triton"


# ----------------------------------------------------------- torch_loop: cuBLASLt blockwise, one GEMM per group
def _fake_blockwise_scaled_mm(calls):
    """torch._scaled_mm as it takes 1x128 x 128x128 blockwise scales (the stride checks of torch's
    is_blockwise_1x128_scaling / is_blockwise_128x128_scaling), computing the reference; CPU stand-in."""
    from turbo_dist.ops.fp8 import _reference_scaled_mm

    def fake(a, b, scale_a, scale_b, out_dtype=None, use_fast_accum=False, out=None):
        m, k = a.shape
        n = b.shape[1]
        kb, nb = -(-k // 128), -(-n // 128)
        assert b.stride(0) == 1, "b must be column-major"
        assert scale_a.shape == (m, kb) and (m == 1 or scale_a.stride(0) == 1) and (kb == 1 or
                                                                                    scale_a.stride(1) == m), \
            f"scale_a must be M-major [M, kb] with stride (1, M): {tuple(scale_a.shape)} {scale_a.stride()}"
        sbt = scale_b.t()  # checked on b.t() [N, K]: [nb, kb] with rows kb long, padded to a multiple of 4
        assert sbt.shape == (nb, kb) and sbt.stride(1) == 1 and (nb == 1 or sbt.stride(0) == -(-kb // 4) * 4), \
            f"scale_b: {tuple(scale_b.shape)} {scale_b.stride()}"
        calls.append(m)
        res = _reference_scaled_mm(a, b, scale_a, scale_b, "block", out_dtype)
        if out is None:
            return res
        out.copy_(res)
        return out
    return fake


@pytest.mark.parametrize("m_major", [False, True], ids=["sa_row_major", "sa_m_major"])
@pytest.mark.parametrize("K", [512, 640])  # kb = 4 and 5 (scale_b's rows padded to 8)
def test_grouped_scaled_torch_loop_layouts(monkeypatch, K, m_major):
    """The per-group cuBLASLt loop hands torch._scaled_mm exactly the layouts torch accepts, one call per
    non-empty group, and gives the reference's numbers (CPU: torch._scaled_mm faked with torch's checks)."""
    from turbo_dist.ops.fp8_grouped import _reference_grouped_scaled, _torch_loop_grouped_scaled

    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _fake_blockwise_scaled_mm(calls))
    lens = torch.tensor([48, 0, 16, 128, 32])
    a, w = rnd(int(lens.sum()), K, seed=40), rnd(5, 256, K, seed=41)  # w [G, N, K]
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    b_q, sb = wq.transpose(1, 2), sw.transpose(1, 2)  # the op's [G, K, N] view and [G, kb, nb] scales
    if m_major:  # scales as DeepGEMM / TransformerEngine store them: each group's slice is then (1, M)-strided
        sa = sa.t().contiguous().t()
    out = _torch_loop_grouped_scaled(aq, b_q, sa, sb, lens, "block", torch.bfloat16)
    assert calls == [48, 16, 128, 32]
    ref = _reference_grouped_scaled(aq, b_q, sa, sb, lens, "block", torch.bfloat16)
    assert torch.equal(out, ref)
    assert snr(out, grouped_ref(a, w, lens.tolist(), trans_b=True)) >= 25


def test_grouped_scaled_torch_loop_declines(monkeypatch):
    """Who torch_loop leaves to the other backends, each with its reason (the dispatcher reports them)."""
    from turbo_dist.ops import fp8_grouped as fp8

    lens = torch.tensor([128, 128])
    a = rnd(256, 512, seed=42)
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(rnd(2, 256, 512, seed=43), E4M3, B, weight=True)
    args = (aq, wq.transpose(1, 2), sa, sw.transpose(1, 2))
    can = fp8._torch_loop_grouped_scaled_can
    assert "BLOCKWISE only" in can(*args, lens, "row", torch.bfloat16)
    assert "CUDA" in can(*args, lens, "block", torch.bfloat16)
    if torch.cuda.is_available():
        assert "on the host" in can(*args, lens.cuda(), "block", torch.bfloat16)
    # with CUDA and an alignment of 16 faked, the alignment rule and the choice key that caches it
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setitem(fp8._PROBES, ("block_align", "cpu"), (16, ""))
    assert can(*args, lens, "block", torch.bfloat16) is True
    assert "multiple of 16" in can(*args, torch.tensor([120, 136]), "block", torch.bfloat16)
    assert "bf16 output" in can(*args, lens, "block", torch.float32)
    assert fp8._grouped_scaled_choice_key(*args, torch.tensor([120, 136]), "block", torch.bfloat16) != \
        fp8._grouped_scaled_choice_key(*args, lens, "block", torch.bfloat16)
    # K=512, N=256 here: a launched group must average LOOP_MIN_GROUP_FLOP / (2 * 512 * 256) rows
    monkeypatch.setattr(fp8, "LOOP_MIN_GROUP_FLOP", 2 * 512 * 256 * 128)
    big, small = torch.tensor([128, 0, 128]), torch.tensor([128, 64, 64])
    assert fp8._grouped_scaled_preference(*args, big, "block", torch.bfloat16) == "torch_loop"
    assert fp8._grouped_scaled_preference(*args, small, "block", torch.bfloat16) is None
    assert fp8._grouped_scaled_preference(*args, big, "row", torch.bfloat16) is None
    assert fp8._grouped_scaled_choice_key(*args, big, "block", torch.bfloat16) != \
        fp8._grouped_scaled_choice_key(*args, small, "block", torch.bfloat16)
    monkeypatch.setitem(fp8._PROBES, ("block_align", "cpu"), (None, "CUBLAS_STATUS_NOT_SUPPORTED"))
    assert "not usable here" in can(*args, lens, "block", torch.bfloat16)


@pytest.mark.gpu
def test_grouped_scaled_torch_loop_gpu():
    """cuBLASLt blockwise per group on host lens aligned as the probe says, against our Triton kernel and the
    exact product; unaligned lens go to another backend."""
    from turbo_dist.ops import fp8_grouped as fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs SM89+")
    align = fp8._cublas_block_row_align(torch.device("cuda", torch.cuda.current_device()))
    if align is None:
        pytest.skip(f"torch._scaled_mm blockwise not usable here: {fp8._PROBES}")
    lens = [a * max(align, 16) for a in (0, 40, 3, 0, 100, 9, 1, 0)]
    a = rnd(sum(lens), 7168, dtype=torch.bfloat16, device="cuda", seed=44)
    w = rnd(8, 2048, 7168, dtype=torch.bfloat16, device="cuda", seed=45)  # [G, N, K]
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    out = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))
    assert dispatcher.last_backend("grouped_scaled_mm") == _one_launch()  # ~500-row groups at N=2048
    dispatcher.set_backend("grouped_scaled_mm", "torch_loop")
    out_loop = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))
    dispatcher.set_backend("grouped_scaled_mm", None)
    big = [0, 2048, 4096, 0, 2048, 4096, 2048, 0]  # >= LOOP_MIN_GROUP_FLOP per launched group: the loop first
    a2 = rnd(sum(big), 7168, dtype=torch.bfloat16, device="cuda", seed=46)
    aq2, sa2 = quantize_fp8(a2, E4M3, B)
    out_big = grouped_scaled_mm(aq2, wq, sa2, sw, torch.tensor(big))  # the default's rule: the per-group loop
    loop = "torch_loop" if _one_launch() != "wgmma" else "wgmma"  # torch_loop never ahead of wgmma
    assert dispatcher.last_backend("grouped_scaled_mm") == ("cublaslt" if fp8.native_module() is not None else loop)
    dispatcher.set_backend("grouped_scaled_mm", "torch_loop")
    out_big_loop = grouped_scaled_mm(aq2, wq, sa2, sw, torch.tensor(big))
    dispatcher.set_backend("grouped_scaled_mm", None)
    big_ref = grouped_ref(a2, w, big, trans_b=True)
    assert snr(out_big, big_ref) >= 25 and snr(out_big_loop, big_ref) >= 25
    dispatcher.set_backend("grouped_scaled_mm", "triton")
    out_tri = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))
    ref = grouped_ref(a, w, lens, trans_b=True)
    assert snr(out_loop, ref) >= 25 and snr(out_tri, ref) >= 25 and snr(out, ref) >= 25
    assert snr(out_loop.float(), out_tri.float()) >= 40
    dispatcher.set_backend("grouped_scaled_mm", None)
    if align > 1:  # same total, two groups off the alignment
        odd = torch.tensor(lens)
        odd[1] += 1
        odd[2] -= 1
        grouped_scaled_mm(aq, wq, sa, sw, odd)
        assert dispatcher.last_backend("grouped_scaled_mm") != "torch_loop"


# ------------------------------------------- cublaslt: the same GEMMs per group, the loop in C++ (turbo_dist._cublaslt)
@needs_interp
@pytest.mark.parametrize("lens", [[4, 0, 8, 12], [0, 0], [24], [3, 5, 0, 7]])
def test_grouped_m_major_layout(lens):
    """1x128 scales [M, kb] (row-major or M-major) -> each group's [kb, rows] block, rows contiguous, at element
    kb * (its first row): what cuBLASLt's VEC128 scales take per group."""
    from turbo_dist.kernels.fp8_quant import grouped_m_major

    M, kb = sum(lens) + 5, 37  # rows past the last group are not copied
    offs = torch.cumsum(torch.tensor(lens), 0)
    for src in (rnd(M, kb, seed=50), rnd(kb, M, seed=51).t()):
        out = grouped_m_major(src, offs)
        first = 0
        for n in lens:
            assert torch.equal(out[kb * first:kb * (first + n)].view(kb, n), src[first:first + n].t())
            first += n


def _fake_native_from_addresses(calls):
    """turbo_dist._cublaslt.grouped_blockwise's contract on CPU memory: the operands are read back from the
    addresses and strides it is given (ctypes) and each group's product comes from the reference, so the
    Python side's layouts (scales, strides, offsets) are checked without a GPU."""
    import ctypes

    from turbo_dist.ops.fp8 import _reference_scaled_mm

    def view(addr, n, dtype):
        buf = (ctypes.c_uint8 * (n * torch.empty((), dtype=dtype).element_size())).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)

    def grouped_blockwise(device, stream, a, b, out, scale_a, scale_b, workspace, ws_bytes, rows, M, G, N, K, lda,
                          ldw, ldo, b_group_stride, sb_group_stride):
        kb, nb = -(-K // 128), -(-N // 128)
        ld4 = -(-kb // 4) * 4
        assert len(rows) <= G and sum(rows) <= M  # what the C++ side checks before touching memory
        calls.append(list(rows))
        first = 0
        for g, m in enumerate(rows):
            if m:
                x = view(a + first * lda, (m - 1) * lda + K, torch.uint8).as_strided((m, K), (lda, 1))
                w = view(b + g * b_group_stride, (N - 1) * ldw + K, torch.uint8).as_strided((N, K), (ldw, 1))
                sa = view(scale_a + 4 * kb * first, kb * m, torch.float32).view(kb, m)
                sb = view(scale_b + 4 * g * sb_group_stride, nb * ld4, torch.float32).view(nb, ld4)[:, :kb]
                res = _reference_scaled_mm(x.view(E4M3), w.view(E4M3).t(), sa.t(), sb.t(), "block", torch.float32)
                d = view(out + 2 * first * ldo, (m - 1) * ldo + N, torch.bfloat16).as_strided((m, N), (ldo, 1))
                d.copy_(res)
            first += m
    return grouped_blockwise


@needs_interp
@pytest.mark.parametrize("scale_copy", [False, True], ids=["scales_as_quantized", "strided_weight_scales"])
def test_grouped_scaled_cublaslt_contract(monkeypatch, scale_copy):
    """The cublaslt backend hands the C++ loop addresses, strides and scale layouts that mean the right
    product: checked on CPU against the reference with the C++ call replaced by its contract."""
    import types

    from turbo_dist.ops import fp8_grouped as fp8

    calls = []
    monkeypatch.setitem(fp8._NATIVE, "mod", types.SimpleNamespace(grouped_blockwise=_fake_native_from_addresses(calls)))
    lens = torch.tensor([48, 0, 16, 128, 32])
    a, w = rnd(int(lens.sum()) + 8, 512, seed=52), rnd(5, 256, 512, seed=53)
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    b_q, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    if scale_copy:  # weight scales that are not [G, nb, kb]-contiguous: copied to that layout
        sb = sb.contiguous()
    out = fp8._cublaslt_grouped_scaled(aq, b_q, sa, sb, lens, "block", torch.bfloat16)
    assert calls == [[48, 0, 16, 128, 32]]
    ref = fp8._reference_grouped_scaled(aq, b_q, sa, sb, lens, "block", torch.bfloat16)
    n = int(lens.sum())
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), rtol=1e-2, atol=1e-2)
    assert snr(out[:n], grouped_ref(a[:n], w, lens.tolist(), trans_b=True)) >= 25


def test_grouped_scaled_cublaslt_declines_and_rule(monkeypatch):
    """Without the native module the backend declines with the reason; with it, the per-group work rule picks
    it before torch_loop, and the choice key tells the thresholds apart."""
    import types

    from turbo_dist.ops import fp8_grouped as fp8

    def aligned(t, align=256):  # a copy at a 256-byte aligned address (what CUDA's allocator gives; CPU's less)
        nbytes = t.numel() * t.element_size()
        buf = torch.empty(nbytes + align, dtype=torch.uint8)
        off = -buf.data_ptr() % align
        return buf[off:off + nbytes].view(t.dtype).view(t.shape).copy_(t)

    lens = torch.tensor([128, 128])
    aq, sa = quantize_fp8(rnd(256, 512, seed=54), E4M3, B)
    wq, sw = quantize_fp8(rnd(2, 256, 512, seed=55), E4M3, B, weight=True)
    aq, wq = aligned(aq), aligned(wq)
    args = (aq, wq.transpose(1, 2), sa, sw.transpose(1, 2))
    monkeypatch.setitem(fp8._NATIVE, "mod", None)
    monkeypatch.setitem(fp8._NATIVE, "why", "turbo_dist._cublaslt is not built (test)")
    assert "not built" in fp8._cublaslt_grouped_scaled_can(*args, lens, "block", torch.bfloat16)
    monkeypatch.setitem(fp8._NATIVE, "mod", types.SimpleNamespace())
    assert "CUDA" in fp8._cublaslt_grouped_scaled_can(*args, lens, "block", torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setitem(fp8._PROBES, ("block_align", "cpu"), (16, ""))
    assert fp8._cublaslt_grouped_scaled_can(*args, lens, "block", torch.bfloat16) is True
    assert "multiple of 16" in fp8._cublaslt_grouped_scaled_can(*args, torch.tensor([120, 136]), "block",
                                                                   torch.bfloat16)
    monkeypatch.setattr(fp8, "NATIVE_MIN_GROUP_FLOP", 2 * 512 * 256 * 128)
    monkeypatch.setattr(fp8, "LOOP_MIN_GROUP_FLOP", 2 * 512 * 256 * 1024)
    big, small = torch.tensor([128, 0, 128]), torch.tensor([64, 64, 64, 64])
    assert fp8._grouped_scaled_preference(*args, big, "block", torch.bfloat16) == "cublaslt"
    assert fp8._grouped_scaled_preference(*args, small, "block", torch.bfloat16) is None
    assert fp8._grouped_scaled_choice_key(*args, big, "block", torch.bfloat16) != \
        fp8._grouped_scaled_choice_key(*args, small, "block", torch.bfloat16)
    # a base off 256 bytes: cublaslt declines, and torch_loop's rule (here met) still moves the loop first
    buf = torch.empty(256 * 512 + 8, dtype=torch.uint8).view(E4M3)
    mis = buf[8:].view(256, 512)
    mis.copy_(aq)
    assert "256-byte" in fp8._cublaslt_grouped_scaled_can(mis, *args[1:], big, "block", torch.bfloat16)
    monkeypatch.setattr(fp8, "LOOP_MIN_GROUP_FLOP", 2 * 512 * 256 * 128)
    assert fp8._grouped_scaled_preference(mis, *args[1:], big, "block", torch.bfloat16) == "torch_loop"
    # where backend wgmma takes the call: cublaslt only from WGMMA_NATIVE_MIN_GROUP_FLOP, torch_loop never
    monkeypatch.setattr(fp8, "_wgmma_takes", lambda *a: True)
    monkeypatch.setattr(fp8, "WGMMA_NATIVE_MIN_GROUP_FLOP", 2 * 1024 * 256 * 128)
    assert fp8._grouped_scaled_preference(*args, big, "block", torch.bfloat16) is None  # 128 rows/group < 1024
    assert fp8._grouped_scaled_preference(mis, *args[1:], big, "block", torch.bfloat16) is None  # not torch_loop
    monkeypatch.setattr(fp8, "WGMMA_NATIVE_MIN_GROUP_FLOP", 2 * 64 * 256 * 128)
    assert fp8._grouped_scaled_preference(*args, big, "block", torch.bfloat16) == "cublaslt"
    monkeypatch.setattr(fp8, "_wgmma_takes", lambda *a: False)
    monkeypatch.setattr(fp8, "LOOP_MIN_GROUP_FLOP", 2 * 512 * 256 * 1024)
    monkeypatch.setitem(fp8._NATIVE, "mod", None)
    assert fp8._grouped_scaled_preference(*args, big, "block", torch.bfloat16) is None  # below torch_loop's bar


@pytest.mark.gpu
def test_grouped_scaled_cublaslt_gpu():
    """The C++ loop over cuBLASLt blockwise GEMMs: equal to torch_loop's GEMMs (same library), close to our
    Triton kernel and the exact product, empty groups skipped, plans reused across calls."""
    from turbo_dist.ops import fp8_grouped as fp8

    mod = fp8.native_module()
    if mod is None:
        pytest.skip(fp8._NATIVE["why"])
    dev = torch.device("cuda", torch.cuda.current_device())
    align = fp8._cublas_block_row_align(dev)
    if align is None:
        pytest.skip(f"cuBLASLt blockwise not usable here: {fp8._PROBES}")
    lens = [a * max(align, 16) for a in (0, 40, 3, 0, 100, 9, 1, 0)]
    a = rnd(sum(lens), 7168, dtype=torch.bfloat16, device="cuda", seed=56)
    w = rnd(8, 2048, 7168, dtype=torch.bfloat16, device="cuda", seed=57)
    aq, sa = quantize_fp8(a, E4M3, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    res = {}
    for name in ("cublaslt", "torch_loop", "triton"):
        dispatcher.set_backend("grouped_scaled_mm", name)
        res[name] = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))
        assert dispatcher.last_backend("grouped_scaled_mm") == name
    n = sum(lens)
    ref = grouped_ref(a[:n], w, lens, trans_b=True)
    assert snr(res["cublaslt"][:n], ref) >= 25
    assert snr(res["cublaslt"][:n].float(), res["torch_loop"][:n].float()) >= 60
    assert snr(res["cublaslt"][:n].float(), res["triton"][:n].float()) >= 40
    plans = mod.num_plans()
    dispatcher.set_backend("grouped_scaled_mm", None)
    grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))  # ~490 rows per group at N=2048: below the rule's bar
    assert dispatcher.last_backend("grouped_scaled_mm") == _one_launch()
    dispatcher.set_backend("grouped_scaled_mm", "cublaslt")
    assert torch.equal(grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))[:n], res["cublaslt"][:n])
    assert mod.num_plans() == plans  # same problems: no new descriptors or heuristic queries
    with pytest.raises(RuntimeError, match="rows for b with"):  # row counts past a: refused before any launch
        mod.grouped_blockwise(device=dev.index, stream=0, a=aq.data_ptr(), b=wq.data_ptr(), out=0, scale_a=0,
                              scale_b=0, workspace=0, ws_bytes=0, rows=[n + 16], M=n, G=8, N=2048, K=7168, lda=7168,
                              ldw=7168, ldo=2048, b_group_stride=2048 * 7168, sb_group_stride=0)
    dispatcher.set_backend("grouped_scaled_mm", None)
    big = [0, 2048, 4096, 0, 2048, 4096, 2048, 0]
    a2 = rnd(sum(big), 7168, dtype=torch.bfloat16, device="cuda", seed=58)
    aq2, sa2 = quantize_fp8(a2, E4M3, B)
    out_big = grouped_scaled_mm(aq2, wq, sa2, sw, torch.tensor(big))
    assert dispatcher.last_backend("grouped_scaled_mm") == "cublaslt"  # the measured rule's default here
    assert snr(out_big, grouped_ref(a2, w, big, trans_b=True)) >= 25


def test_no_probe_or_host_lens_inside_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured: the cuBLASLt probes do not run (and cache nothing), and host group_lens
    are refused clearly (a captured copy would replay a reused staging buffer). CPU: capture state faked."""
    from turbo_dist.ops import fp8, fp8_grouped
    from turbo_dist.ops.grouped_gemm import group_offsets

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(fp8, "_PROBES", {})
    monkeypatch.setattr(fp8_grouped, "_PROBES", fp8._PROBES)
    assert fp8._torch_blockwise_supported("cuda:0") == (False, "not probed during CUDA graph capture")
    assert fp8_grouped._cublas_block_row_align(torch.device("cuda", 0)) is None
    assert fp8._PROBES == {}
    with pytest.raises(ValueError, match="cannot be captured in a CUDA graph"):
        group_offsets(torch.tensor([1, 2]), "cuda")
