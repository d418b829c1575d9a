"""GEMM and grouped GEMM: every backend that can run here against float64 math, forward and backward.

On CPU: the "torch" and "loop" backends, and our Triton kernels under TRITON_INTERPRET=1 (fp16/fp32, tiny
sizes; conftest sets the variable). On a GPU (marker `gpu`): bf16 at real sizes, our Triton kernels against
cuBLAS / torch._grouped_mm.
"""
import pytest
import torch

from turbo_dist.ops import dispatcher, gemm, grouped_gemm

GEMM_OPS = ("gemm",)
GROUPED_OPS = ("grouped_gemm", "grouped_gemm_wgrad")


@pytest.fixture(autouse=True)
def _reset_backends():
    yield
    for op in GEMM_OPS + GROUPED_OPS:
        dispatcher.set_backend(op, None)


def use(ops, name):
    for op in ops:
        dispatcher.set_backend(op, name)


def cpu_triton_ok():
    from turbo_dist.kernels.gemm import interpreting

    return interpreting()


needs_interp = pytest.mark.skipif(torch.cuda.is_available() or not cpu_triton_ok(),
                                  reason="CPU Triton runs only under TRITON_INTERPRET=1 without CUDA")


def rnd(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def op_(t, trans):
    return t.t() if trans else t


def make_gemm(m, n, k, trans_a, trans_b, dtype, device="cpu", noncontig=False):
    """a, b laid out for the trans flags; noncontig: every other column of a wider tensor."""
    sa = (k, m) if trans_a else (m, k)
    sb = (n, k) if trans_b else (k, n)
    if noncontig:
        a = rnd(sa[0], 2 * sa[1], dtype=dtype, device=device, seed=1)[:, ::2]
        b = rnd(sb[0], 2 * sb[1], dtype=dtype, device=device, seed=2)[:, 1::2]
        assert not a.is_contiguous() and not b.is_contiguous()
    else:
        a = rnd(*sa, dtype=dtype, device=device, seed=1)
        b = rnd(*sb, dtype=dtype, device=device, seed=2)
    return a, b


# ------------------------------------------------------------------------------------------- gemm
TRANS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("m,n,k", [(37, 19, 23), (5, 3, 1), (1, 64, 16)])
def test_gemm_torch_backend(trans_a, trans_b, m, n, k):
    use(GEMM_OPS, "torch")
    a, b = make_gemm(m, n, k, trans_a, trans_b, torch.float32)
    out = gemm(a, b, trans_a, trans_b)
    assert dispatcher.last_backend("gemm") == "torch"
    ref = op_(a.double(), trans_a) @ op_(b.double(), trans_b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemm_out_dtype_torch(out_dtype):
    a, b = make_gemm(17, 9, 33, False, True, torch.float32, noncontig=True)
    out = gemm(a, b, trans_b=True, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.float(), a @ b.t(), rtol=1e-2, atol=1e-2)


def test_gemm_default_on_cpu_is_torch():
    a, b = make_gemm(8, 8, 8, False, False, torch.float32)
    gemm(a, b)
    assert dispatcher.last_backend("gemm") == "torch"


@needs_interp
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_triton_interpreter_fp32(trans_a, trans_b):
    use(GEMM_OPS, "triton")
    a, b = make_gemm(37, 45, 41, trans_a, trans_b, torch.float32)  # none a multiple of the 32 tile
    out = gemm(a, b, trans_a, trans_b)
    assert dispatcher.last_backend("gemm") == "triton"
    ref = op_(a.double(), trans_a) @ op_(b.double(), trans_b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@needs_interp
@pytest.mark.parametrize("m,n,k,noncontig,out_dtype", [
    (33, 17, 1, False, None),              # K = 1
    (40, 24, 70, True, torch.float32),     # strided views, fp32 out
    (1, 3, 5, False, torch.float16),
])
def test_gemm_triton_interpreter_fp16(m, n, k, noncontig, out_dtype):
    use(GEMM_OPS, "triton")
    a, b = make_gemm(m, n, k, False, True, torch.float16, noncontig=noncontig)
    out = gemm(a, b, trans_b=True, out_dtype=out_dtype)
    assert dispatcher.last_backend("gemm") == "triton"
    assert out.dtype == (out_dtype or torch.float16)
    torch.testing.assert_close(out.float(), a.float() @ b.float().t(), rtol=1e-2, atol=1e-2)


@needs_interp
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("tma", [True, False])
def test_gemm_triton_tma_and_pointer_paths(monkeypatch, trans_a, trans_b, tma):
    """16-byte aligned fp16 operands take the TMA-descriptor kernel (any transpose); with
    TURBO_DIST_TRITON_TMA=0 semantics (USE_TMA False) the pointer kernel runs the same problem."""
    from turbo_dist.kernels import gemm as kgemm

    monkeypatch.setattr(kgemm, "USE_TMA", tma)
    use(GEMM_OPS, "triton")
    a, b = make_gemm(40, 56, 72, trans_a, trans_b, torch.float16)  # edges off the 32 tile, strides aligned
    assert (kgemm.tma_operands(op_(a, trans_a), op_(b, trans_b)) is not None) == tma
    out = gemm(a, b, trans_a, trans_b)
    assert dispatcher.last_backend("gemm") == "triton"
    ref = op_(a.double(), trans_a) @ op_(b.double(), trans_b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


@needs_interp
@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])
def test_gemm_triton_persistent_config(trans_a, trans_b):
    """A forced persistent config (7th entry 1): 4 programs walk 3 x 4 tiles of 16 x 16, same result."""
    from turbo_dist.kernels import gemm as kgemm

    a, b = make_gemm(40, 56, 72, trans_a, trans_b, torch.float16)
    A, Bm = op_(a, trans_a), op_(b, trans_b)
    assert kgemm.tma_operands(A, Bm) is not None
    out = kgemm.gemm(A, Bm, config=(16, 16, 32, 2, 4, 1, 1))
    torch.testing.assert_close(out.double(), A.double() @ Bm.double(), rtol=1e-2, atol=1e-2)
    with pytest.raises(NotImplementedError, match="TMA kernel only"):
        kgemm.gemm(A.float(), Bm.float(), config=(16, 16, 32, 2, 4, 1, 1))  # fp32: the pointer kernel
    with pytest.raises(ValueError, match="gemm config"):
        kgemm.gemm(A, Bm, config=(16, 16, 32))


@needs_interp
@pytest.mark.parametrize("m,n,k,pieces", [
    (40, 40, 520, 4),   # 9 tiles of 16 x 16 on 4 programs: 2 full waves + 1 tile cut into 4 uneven K pieces
    (16, 16, 520, 4),   # 1 tile: split-K over every program
    (16, 40, 72, 1),    # 3 tiles < 4 programs, too few K steps to cut: whole tiles, no workspace
])
def test_gemm_triton_split_tail(m, n, k, pieces):
    """SPLIT_TAIL (7th entry 8): the partial last wave's tiles cut along K; the last piece to arrive sums the
    partials and leaves the arrival counters at zero for the next launch."""
    from turbo_dist.kernels import gemm as kgemm

    a, b = make_gemm(m, n, k, False, True, torch.float16)
    A, Bm = a, b.t()
    assert kgemm.tma_operands(A, Bm) is not None
    bufs = []
    from turbo_dist.kernels import gemm_persistent as gp

    real = gp.tail_buffers
    kgemm_tail = lambda *args: bufs.append(real(*args)) or bufs[-1]  # noqa: E731
    import unittest.mock as mock
    with mock.patch.object(gp, "tail_buffers", kgemm_tail):
        out = kgemm.gemm(A, Bm, config=(16, 16, 32, 2, 4, 1, 8))
        out2 = kgemm.gemm(A, Bm, split_tail=True, config=(16, 16, 32, 2, 4, 1))
        out3 = kgemm.gemm(A, Bm, config=(16, 16, 32, 2, 4, 1, 16))  # full waves plain, the tail a second launch
    ref = A.double() @ Bm.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(out, out2) and torch.equal(out, out3)
    assert all(c.eq(0).all() for _, c in bufs)
    ws, cnt = bufs[0]
    assert cnt.eq(0).all(), cnt  # reset by each tile's last piece
    if pieces > 1:  # the tail tiles' partials, summed in piece order, are those tiles of the product
        pm, pn = -(-m // 16), -(-n // 16)
        full = pm * pn - pm * pn % 4
        part = ws[:(pm * pn - full) * pieces * 256].view(-1, pieces, 16, 16)
        assert part.abs().sum((2, 3)).gt(0).all()  # every piece did K work
        for t in range(part.shape[0]):
            tile = full + t  # kernels.gemm._swizzle with GROUP_M = 2
            first = tile // (2 * pn) * 2
            size = min(pm - first, 2)
            i, j = first + tile % (2 * pn) % size, tile % (2 * pn) // size
            blk = ref[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            torch.testing.assert_close(part[t].sum(0)[:blk.shape[0], :blk.shape[1]].double(), blk, rtol=1e-2,
                                       atol=1e-2)


@needs_interp
@pytest.mark.parametrize("m,n,k,trans_b", [
    (72, 80, 72, True),    # N = 2 x 32 + 16: 3 x 2 full tiles + 3 edge tiles, 2 per program (2 programs)
    (40, 72, 40, False),   # N = 2 x 32 + 8: a 16-wide edge tile over 8 columns, B as stored [K, N]
    (16, 16, 32, True),    # N < BLOCK_N: edge tiles only
])
def test_gemm_triton_narrow_edge(m, n, k, trans_b):
    """NARROW_EDGE (7th entry 32): the last tile column (N % 32 <= 16) in 32 x 16 tiles, two per program after the
    full tiles; the same result as the plain kernel, with rowwise and blockwise scales too (blockwise: scale_b
    blocks 16 wide, so the full tiles take the per-column path and the edge tiles the one-scalar path)."""
    from turbo_dist.kernels import gemm as kgemm

    a, b = make_gemm(m, n, k, False, trans_b, torch.float16)
    A, Bm = a, op_(b, trans_b)
    assert kgemm.tma_operands(A, Bm) is not None and kgemm.edge_n(n, 32) == 16
    pm = -(-m // 32)
    assert kgemm._grid_tiles(m, n, 32, 32, 16) == pm * (n // 32) + -(-pm // 2)
    cfg, edge = (32, 32, 32, 2, 4, 1), (32, 32, 32, 2, 4, 1, kgemm.NARROW_EDGE)
    out = kgemm.gemm(A, Bm, config=edge)
    ref = A.double() @ Bm.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, kgemm.gemm(A, Bm, config=cfg), rtol=1e-3, atol=1e-3)
    sa, sb = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    row = kgemm.scaled_gemm(A, Bm, sa, sb, kgemm.SCALE_ROW, out_dtype=torch.float32, config=edge)
    torch.testing.assert_close(row.double(), ref * sa.double()[:, None] * sb.double()[None, :], rtol=1e-2, atol=1e-2)
    sab, sbb = torch.rand(m, -(-k // 128)) + 0.5, torch.rand(-(-k // 128), -(-n // 16)) + 0.5
    blk = [kgemm.scaled_gemm(A, Bm, sab, sbb, kgemm.SCALE_BLOCK, out_dtype=torch.float32, block_n=16,
                             config=(32, 32, 128, 2, 4, 1, flags)) for flags in (kgemm.NARROW_EDGE, 0)]
    torch.testing.assert_close(blk[0], blk[1], rtol=1e-5, atol=1e-5)
    blk_ref = (A.double() * sab.double()[:, :1]) @ (Bm.double() * sbb.double()[0].repeat_interleave(16)[None, :n])
    torch.testing.assert_close(blk[0].double(), blk_ref, rtol=1e-2, atol=1e-2)  # K <= 128: one scale step


@needs_interp
def test_gemm_narrow_edge_refusals_and_candidates():
    """NARROW_EDGE is refused where the edge column is not narrow and with the persistent kernels; the tuner's
    candidates gain the narrow-edge configs exactly where edge_n allows them."""
    from turbo_dist.kernels import gemm as kgemm

    a, b = make_gemm(40, 80, 40, False, True, torch.float16)
    with pytest.raises(ValueError, match="NARROW_EDGE needs"):
        kgemm.gemm(a, b.t(), config=(32, 128, 32, 2, 4, 1, kgemm.NARROW_EDGE))  # 80 % 128 = 80 > 64
    with pytest.raises(NotImplementedError, match="NARROW_EDGE"):
        kgemm.gemm(a, b.t(), config=(32, 32, 32, 2, 4, 1, kgemm.NARROW_EDGE | kgemm.PERSISTENT))
    with pytest.raises(NotImplementedError, match="narrow-edge"):
        kgemm.gemm(a.float(), b.float().t(), config=(32, 32, 32, 2, 4, 1, kgemm.NARROW_EDGE))  # pointer kernel
    assert [kgemm.edge_n(n, 128) for n in (2112, 2048, 2176, 2200, 100)] == [64, 0, 0, 32, 0]
    assert kgemm.edge_n(2112, 256) == 64 and kgemm.edge_n(16, 32) == 16
    def edge_cands(N, split_tail=None, mode=kgemm.SCALE_NONE, es=2):
        return [c[:6] for c in kgemm._candidates(mode, es, 2, 8192, N, 132, split_tail)
                if len(c) == 7 and c[6] == kgemm.NARROW_EDGE]

    assert edge_cands(2112) == edge_cands(2112, False) == [tuple(c) for c in kgemm.tune_rows(kgemm.CONFIGS_EDGE_16)]
    assert edge_cands(2112, mode=kgemm.SCALE_BLOCK, es=1) == [tuple(c) for c in kgemm.tune_rows(
        kgemm.CONFIGS_EDGE_BLOCK)]
    assert edge_cands(2048) == [] and edge_cands(2112, True) == []


@needs_interp
def test_gemm_tuned_path_builds_candidates_and_reuses_the_choice(monkeypatch):
    """The tuned TMA path (what runs on a GPU; _launch forces one config under the interpreter): the candidates
    are this operand type's list plus, for a nearly empty last wave, the split-tail ones; the tuner's choice
    runs, and the next call reuses it without tuning again. pick is faked (no CUDA timing here)."""
    from turbo_dist.kernels import _tuner
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import gemm_persistent as gp

    small = [(32, 32, 32, 4, 4, 1)]
    monkeypatch.setattr(kgemm, "CONFIGS_16", small)
    monkeypatch.setattr(kgemm, "CONFIGS_EDGE_16", [])
    monkeypatch.setattr(gp, "CONFIGS_TAIL_16", [(16, 16, 32, 2, 4, 1)])
    monkeypatch.setattr(gp, "SPLIT_TAIL_AUTO", True)
    monkeypatch.setattr(gp, "split_tail_pays", lambda M, N, sms: True)
    monkeypatch.setattr(_tuner, "_CACHE", {})
    calls = []

    def fake_pick(key, launches, timer=None, capturing=False, device=None):
        calls.append(len(launches))
        _tuner._CACHE[key] = 2  # the second split-tail variant (TAIL_LAUNCH)
        return 2

    monkeypatch.setattr(_tuner, "pick", fake_pick)
    a, b = make_gemm(40, 40, 520, False, True, torch.float16)
    A, Bm = a, b.t()
    tma = kgemm.tma_operands(A, Bm)
    ref = A.double() @ Bm.double()
    for _ in range(2):
        c = torch.empty(40, 40, dtype=torch.float16)
        kgemm._launch_tma(A, Bm, c, c, c, tma, (0, 0, 0, 0), kgemm.SCALE_NONE, 128, None)
        torch.testing.assert_close(c.double(), ref, rtol=1e-2, atol=1e-2)
    assert calls == [3]  # 1 plain + 2 split-tail variants, tuned once
    cands = kgemm._candidates(kgemm.SCALE_NONE, 2, 2, 40, 40, 4, None)
    assert cands == ((32, 32, 32, 4, 4, 1), (16, 16, 32, 2, 4, 1, kgemm.SPLIT_TAIL), (16, 16, 32, 2, 4, 1,
                                                                                      kgemm.TAIL_LAUNCH))


@needs_interp
def test_gemm_triton_rejects_bf16_on_cpu():
    use(GEMM_OPS, "triton")
    a, b = make_gemm(8, 8, 8, False, False, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        gemm(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True), (False, True)])
def test_gemm_autograd(backend, trans_a, trans_b):
    use(GEMM_OPS, backend)
    a, b = make_gemm(19, 13, 11, trans_a, trans_b, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    out = gemm(a, b, trans_a, trans_b)
    dc = rnd(*out.shape, seed=3)
    out.backward(dc)
    assert dispatcher.last_backend("gemm") == backend
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (op_(a64, trans_a) @ op_(b64, trans_b)).backward(dc.double())
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_gemm_errors():
    a, b = rnd(4, 5), rnd(5, 6)
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm(a, rnd(4, 6))
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm(a, b, trans_b=True)
    with pytest.raises(ValueError, match="2-D"):
        gemm(rnd(4), b)
    with pytest.raises(TypeError, match="float64"):
        gemm(a.double(), b.double())
    with pytest.raises(TypeError, match="bfloat16"):
        gemm(a, b.bfloat16())
    with pytest.raises(TypeError, match="must be a tensor"):
        gemm(a, [[1.0]])
    with pytest.raises(ValueError, match="meta"):
        gemm(a, torch.empty(5, 6, device="meta"))
    with pytest.raises(TypeError, match="out_dtype"):
        gemm(a, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="no backend"):
        dispatcher.set_backend("gemm", "nope")


# ----------------------------------------------------------------------------------- grouped gemm
def grouped_ref(a, b, group_lens, trans_b):
    out, start = [], 0
    for g, n in enumerate(group_lens.tolist()):
        out.append(a[start:start + n].double() @ op_(b[g].double(), trans_b))
        start += n
    return torch.cat(out)


def make_grouped(lens, k, n, trans_b, dtype, device="cpu", noncontig=False):
    group_lens = torch.tensor(lens, dtype=torch.int64)
    m, g = sum(lens), len(lens)
    a = rnd(m, 2 * k if noncontig else k, dtype=dtype, device=device, seed=4)
    a = a[:, ::2] if noncontig else a
    b = rnd(g, n, k, dtype=dtype, device=device, seed=5) if trans_b else rnd(g, k, n, dtype=dtype, device=device, seed=5)
    return a, b, group_lens


LENS = [
    [5, 0, 20, 8],       # an empty group in the middle, sizes off the tile
    [0, 0, 33, 0],       # all rows in one group, empty first and last
    [0, 0, 0],           # M = 0
]
CPU_GROUPED = ["loop", pytest.param("triton", marks=needs_interp)]


@pytest.mark.parametrize("backend", CPU_GROUPED)
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_forward(backend, lens, trans_b):
    use(GROUPED_OPS, backend)
    a, b, gl = make_grouped(lens, 24, 19, trans_b, torch.float32)
    out = grouped_gemm(a, b, gl, trans_b=trans_b)
    assert dispatcher.last_backend("grouped_gemm") == backend
    assert out.shape == (sum(lens), 19)
    if sum(lens):
        torch.testing.assert_close(out.double(), grouped_ref(a, b, gl, trans_b), rtol=1e-4, atol=1e-4)


@needs_interp
def test_grouped_triton_fp16_noncontig_int32_lens():
    use(GROUPED_OPS, "triton")
    a, b, gl = make_grouped([7, 0, 30, 3], 40, 24, True, torch.float16, noncontig=True)
    out = grouped_gemm(a, b[:, :, :], gl.int(), trans_b=True)
    assert dispatcher.last_backend("grouped_gemm") == "triton"
    torch.testing.assert_close(out.double(), grouped_ref(a, b, gl, True), rtol=1e-2, atol=1e-2)


@needs_interp
def test_grouped_triton_strided_group_lens():
    """group_lens as a strided view (every other entry of a routing table): the kernels read the sizes, not the
    entries between them (read as dense they ran past the output)."""
    use(GROUPED_OPS, "triton")
    a, b, gl = make_grouped([3, 0, 5], 16, 8, False, torch.float32)
    table = torch.tensor([3, 99, 0, 99, 5, 99])[::2]
    assert not table.is_contiguous() and table.tolist() == gl.tolist()
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = grouped_gemm(a, b, table)
    torch.testing.assert_close(out.double(), grouped_ref(a.detach(), b.detach(), gl, False), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    db = torch.stack([a.detach()[s:e].t() @ torch.ones(e - s, 8) for s, e in zip([0, 3, 3], [3, 3, 8])])
    torch.testing.assert_close(b.grad, db, rtol=1e-4, atol=1e-4)


@needs_interp
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("tma", [True, False])
def test_grouped_triton_tma_and_pointer_paths(monkeypatch, trans_b, tma):
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import grouped_gemm as kgg

    monkeypatch.setattr(kgemm, "USE_TMA", tma)
    use(GROUPED_OPS, "triton")
    a, b, gl = make_grouped([5, 0, 37, 8], 40, 24, trans_b, torch.float16)  # aligned strides, ragged groups
    assert (kgg.tma_operands(a, b.transpose(1, 2) if trans_b else b) is not None) == tma
    out = grouped_gemm(a, b, gl, trans_b=trans_b)
    assert dispatcher.last_backend("grouped_gemm") == "triton"
    torch.testing.assert_close(out.double(), grouped_ref(a, b, gl, trans_b), rtol=1e-2, atol=1e-2)


@needs_interp
@pytest.mark.parametrize("tma", [True, False])
def test_grouped_tuned_path_picks_per_rows_bucket(monkeypatch, tma):
    """The tuned path of the grouped kernels (what runs on a GPU; under the interpreter one config is forced
    unless that is turned off as here): both candidates are built, the tuner's choice runs and is
    reused for the same shape and rows-per-group bucket, a batch in another bucket is tuned again; the
    weight-gradient kernel likewise. pick is faked (no CUDA timing here)."""
    from turbo_dist.kernels import _tuner
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import grouped_gemm as kgg
    from turbo_dist.kernels import grouped_wgrad as kgw
    from turbo_dist.ops.grouped_gemm import group_offsets

    monkeypatch.setattr(kgemm, "USE_TMA", tma)
    monkeypatch.setattr(kgg, "interpreter_config", lambda mode: None)
    monkeypatch.setattr(kgg, "CONFIGS_16", [(32, 32, 32, 4, 1), (16, 32, 32, 4, 1)])
    monkeypatch.setattr(kgw, "CONFIGS_WGRAD", [(32, 32, 32, 4, 1), (16, 16, 32, 4, 1)])
    monkeypatch.setattr(kgw, "CONFIGS_WGRAD_TMA", [(32, 32, 32, 4, 1), (16, 16, 16, 4, 1)])
    monkeypatch.setattr(kgemm, "TUNE_FIRST_ONLY", False)
    monkeypatch.setattr(_tuner, "_CACHE", {})
    calls = []

    def fake_pick(key, launches, timer=None, capturing=False, device=None):
        calls.append((key[0], len(launches), capturing))
        _tuner._CACHE[key] = 1
        return 1

    monkeypatch.setattr(_tuner, "pick", fake_pick)
    for lens in ([5, 0, 37, 8], [9, 3, 30, 8], [100, 0, 37, 64]):  # buckets 16, 16, 64 rows per group
        a, b, gl = make_grouped(lens, 40, 24, False, torch.float16)
        offs = group_offsets(gl, "cpu")
        out = kgg.grouped_gemm(a, b, offs)
        torch.testing.assert_close(out.double(), grouped_ref(a, b, gl, False), rtol=1e-2, atol=1e-2)
        dc = rnd(*out.shape, dtype=torch.float16, seed=9)
        db = kgw.grouped_wgrad(a, dc, offs, len(lens))
        ref = torch.stack([a[s:e].double().t() @ dc[s:e].double() for s, e in
                           zip([0] + offs.tolist()[:-1], offs.tolist())])
        torch.testing.assert_close(db.double(), ref, rtol=1e-2, atol=1e-2)
    fwd, wgrad = ("grouped_tma", "grouped_wgrad_tma") if tma else ("grouped", "grouped_wgrad")
    assert calls == [(fwd, 2, False), (wgrad, 2, False)] * 2
    assert kgg.rows_bucket(50, 4) == 16 and kgg.rows_bucket(0, 4) == 1 and kgg.rows_bucket(201, 4) == 64


def _wgrad_paths(monkeypatch, lens, P, Q, trans_b, dtype, device, config=None):
    """grouped_wgrad through the TMA kernel and the pointer kernel (USE_TMA on / off) into a NaN-filled dB
    (strided [G, Q, P]^T when trans_b, as the autograd's dB for a trans_b weight), and the fp64 reference;
    `config` forces the TMA kernel's config."""
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import grouped_wgrad as kgw

    G, M = len(lens), sum(lens)
    x, y = rnd(M, P, dtype=dtype, device=device, seed=11), rnd(M, Q, dtype=dtype, device=device, seed=12)
    offs = torch.cumsum(torch.tensor(lens, device=device), 0)
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(kgemm, "USE_TMA", tma)
        assert kgw.wgrad_tma_ok(x, y) == tma
        out = torch.full((G, Q, P) if trans_b else (G, P, Q), float("nan"), dtype=dtype, device=device)
        out = out.transpose(1, 2) if trans_b else out
        outs.append(kgw.grouped_wgrad(x, y, offs, G, out=out, config=config if tma else None))
    ends = offs.tolist()
    ref = torch.stack([x[s:e].double().t() @ y[s:e].double() for s, e in zip([0] + ends[:-1], ends)])
    return outs, ref


@needs_interp
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_wgrad_tma_and_pointer_paths(monkeypatch, trans_b):
    """The TMA weight-gradient kernel (whole BLOCK_K-row steps by TMA, each group's last partial step by masked
    loads, BLOCK_K 32): groups of exactly one step,
    empty, shorter than a step, steps plus a tail; P and Q off the tile. Same result as the pointer kernel and the
    reference, zeros for the empty group."""
    outs, ref = _wgrad_paths(monkeypatch, [32, 0, 5, 70, 64], 40, 24, trans_b, torch.float16, "cpu")
    for out in outs:
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
        assert bool((out[1] == 0).all())


@needs_interp
def test_grouped_wgrad_tail_ignores_next_groups_rows():
    """An inf in the rows right after a group's partial last step (the next group's) must not reach that
    group's dB through the masked tail (0 * inf would be NaN)."""
    from turbo_dist.kernels import grouped_wgrad as kgw

    lens = [5, 3]
    # P, Q whole tiles: no padding lanes where a masked 0 meets an inf (harmless there, but numpy warns)
    x, y = rnd(8, 64, dtype=torch.float16, seed=11), rnd(8, 32, dtype=torch.float16, seed=12)
    x[5:], y[5:] = float("inf"), float("inf")  # +inf times +inf: the next group's own dB is inf, not NaN
    offs = torch.cumsum(torch.tensor(lens), 0)
    ref0 = x[:5].double().t() @ y[:5].double()
    out = kgw.grouped_wgrad(x, y, offs, 2, config=(32, 32, 32, 4, 1))
    assert bool(torch.isfinite(out[0]).all())
    torch.testing.assert_close(out[0].double(), ref0, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="weight-gradient config"):
        kgw.grouped_wgrad(x, y, offs, 2, config=(32, 32, 32, 4, 1, 1))


@pytest.mark.parametrize("backend", CPU_GROUPED)
@pytest.mark.parametrize("lens,trans_b", [([5, 0, 20, 8], False), ([0, 12, 0, 9], True)])
def test_grouped_autograd(backend, lens, trans_b):
    use(GROUPED_OPS, backend)
    a, b, gl = make_grouped(lens, 16, 12, trans_b, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    out = grouped_gemm(a, b, gl, trans_b=trans_b)
    dc = rnd(*out.shape, seed=6)
    out.backward(dc)
    assert dispatcher.last_backend("grouped_gemm") == backend
    assert dispatcher.last_backend("grouped_gemm_wgrad") == backend
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    grouped_ref(a64, b64, gl, trans_b).backward(dc.double())
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)
    empty = [g for g, n in enumerate(lens) if n == 0]
    assert bool((b.grad[empty] == 0).all()), "an empty group's dB must be exactly zero"


def _second_derivatives(fn, a, b):
    """d/d(a, b) of a gradient penalty: |dL/da|^2 + <dL/db, v> for L = <tanh(fn(a, b)), w> (create_graph=True)."""
    out = fn(a, b)
    w = rnd(*out.shape, seed=11, dtype=out.dtype)
    ga, gb = torch.autograd.grad((out.tanh() * w).sum(), (a, b), create_graph=True)
    v = rnd(*gb.shape, seed=12, dtype=gb.dtype)
    return torch.autograd.grad(ga.square().sum() + (gb * v).sum(), (a, b))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True), (False, True), (True, False)])
def test_gemm_second_derivatives(backend, trans_a, trans_b):
    """create_graph=True through gemm: the gradients are GEMMs through gemm() again, so a gradient penalty's
    derivative matches float64 torch on every backend (our Triton kernel has no derivative of its own)."""
    use(GEMM_OPS, backend)
    a, b = make_gemm(9, 7, 5, trans_a, trans_b, torch.float32)
    got = _second_derivatives(lambda x, y: gemm(x, y, trans_a, trans_b), a.requires_grad_(), b.requires_grad_())
    assert dispatcher.last_backend("gemm") == backend
    ref = _second_derivatives(lambda x, y: op_(x, trans_a) @ op_(y, trans_b),
                              a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_GROUPED)
@pytest.mark.parametrize("lens,trans_b", [([5, 0, 7, 3], False), ([0, 6, 0, 4], True)])
def test_grouped_second_derivatives(backend, lens, trans_b):
    """create_graph=True through grouped_gemm: dA through grouped_gemm, dB through a differentiable weight
    gradient whose own gradients are grouped GEMMs: a gradient penalty's derivative matches float64 torch."""
    use(GROUPED_OPS, backend)
    a, b, gl = make_grouped(lens, 6, 5, trans_b, torch.float32)
    got = _second_derivatives(lambda x, y: grouped_gemm(x, y, gl, trans_b=trans_b), a.requires_grad_(),
                              b.requires_grad_())
    assert dispatcher.last_backend("grouped_gemm") == backend
    assert dispatcher.last_backend("grouped_gemm_wgrad") == backend
    ref = _second_derivatives(lambda x, y: grouped_ref(x, y, gl, trans_b), a.detach().double().requires_grad_(),
                              b.detach().double().requires_grad_())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def test_grouped_default_on_cpu_is_loop():
    a, b, gl = make_grouped([3, 4], 8, 8, False, torch.float32)
    grouped_gemm(a, b, gl)
    assert dispatcher.last_backend("grouped_gemm") == "loop"


def test_grouped_errors():
    a, b, gl = make_grouped([3, 4], 8, 6, False, torch.float32)
    with pytest.raises(ValueError, match="sums to 6"):
        grouped_gemm(a, b, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        grouped_gemm(a, b, torch.tensor([8, -1]))
    with pytest.raises(ValueError, match="G=2"):
        grouped_gemm(a, b, torch.tensor([3, 4, 0]))
    with pytest.raises(TypeError, match="int32/int64"):
        grouped_gemm(a, b, gl.float())
    with pytest.raises(ValueError, match="K=8"):
        grouped_gemm(a, b, gl, trans_b=True)
    with pytest.raises(ValueError, match="3-D"):
        grouped_gemm(a, b[0], gl)
    with pytest.raises(ValueError, match="2-D"):
        grouped_gemm(a[None], b, gl)
    with pytest.raises(TypeError, match="share one of"):
        grouped_gemm(a, b.half(), gl)
    with pytest.raises(ValueError, match="meta"):
        grouped_gemm(a, b.to("meta"), gl)
    with pytest.raises(ValueError, match="group_lens is on meta"):
        grouped_gemm(a, b, gl.to("meta"))


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (1000, 3000, 520), (8192, 1280, 8192)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_gemm_gpu_triton_vs_cublas(m, n, k, trans_a, trans_b):
    a, b = make_gemm(m, n, k, trans_a, trans_b, torch.bfloat16, device="cuda")
    use(GEMM_OPS, "torch")
    ref = gemm(a, b, trans_a, trans_b)
    use(GEMM_OPS, "triton")
    out = gemm(a, b, trans_a, trans_b)
    assert dispatcher.last_backend("gemm") == "triton"
    exact = op_(a.float(), trans_a) @ op_(b.float(), trans_b)
    assert rel(out, exact) < 1e-2 and rel(ref, exact) < 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(2048, 2112, 1024), (256, 256, 8192), (8192, 2112, 7168)])
def test_gemm_gpu_split_tail(m, n, k):
    """Shapes whose last wave is nearly empty (2048 x 2112: 136 tiles of 256 x 128 on 132 SMs; 256^2: one
    wave of 2 tiles, split-K): the split-tail kernel (a candidate of the default there) equals cuBLAS, is
    deterministic, and the FP8 rowwise path too."""
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import gemm_persistent as gp
    from turbo_dist.ops import fp8

    a, b = make_gemm(m, n, k, False, True, torch.bfloat16, device="cuda")
    sms = kgemm._num_sms(a.device)
    assert gp.split_tail_pays(m, n, sms) or sms != 132
    out = kgemm.gemm(a, b.t(), split_tail=True)
    assert torch.equal(out, kgemm.gemm(a, b.t(), split_tail=True))  # the partials are summed in a fixed order
    ref = a.float() @ b.float().t()
    assert rel(out, ref) < 1e-2
    for choice in (None, False):  # the default (timed among both kinds) and the plain kernel only
        assert rel(kgemm.gemm(a, b.t(), split_tail=choice), out) < 1e-2
    row = fp8.ScalingGranularity.ROWWISE
    (aq, sa), (bq, sb) = fp8.quantize_fp8(a, granularity=row), fp8.quantize_fp8(b, granularity=row)
    q = kgemm.scaled_gemm(aq, bq.t(), sa.reshape(-1), sb.reshape(-1), kgemm.SCALE_ROW, split_tail=True)
    q_whole = kgemm.scaled_gemm(aq, bq.t(), sa.reshape(-1), sb.reshape(-1), kgemm.SCALE_ROW, split_tail=False)
    assert rel(q, q_whole) < 1e-2 and rel(q, ref) < 0.1  # bf16 outputs: the sums' order flips last bits


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,cfg", [
    (8192, 2112, 7168, (256, 128, 64, 16, 8, 4)),  # 512 full tiles + 16 programs of two 256 x 64 edge tiles
    (8192, 2112, 7168, (128, 256, 64, 8, 8, 3)),   # 512 full tiles + 16 programs of four 128 x 64 edge tiles
    (1000, 2088, 1024, (128, 128, 64, 8, 8, 4)),   # edge 40 wide in 64-wide tiles, a partial last row block
])
def test_gemm_gpu_narrow_edge(m, n, k, cfg):
    """NARROW_EDGE on the GPU: bf16 against cuBLAS and the plain kernel, both B layouts; FP8 rowwise and
    blockwise (1x128 / 128x128 scales: the edge tiles read one scale_b per K step) against the plain kernel."""
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.ops import fp8

    a, b = make_gemm(m, n, k, False, True, torch.bfloat16, device="cuda")
    assert kgemm.edge_n(n, cfg[1])
    ref = a.float() @ b.float().t()
    out = kgemm.gemm(a, b.t(), config=(*cfg, kgemm.NARROW_EDGE))
    assert rel(out, ref) < 1e-2
    assert rel(out, kgemm.gemm(a, b.t(), config=cfg)) < 1e-3
    bkn = b.t().contiguous()  # B stored [K, N]
    assert rel(kgemm.gemm(a, bkn, config=(*cfg, kgemm.NARROW_EDGE)), ref) < 1e-2
    row = fp8.ScalingGranularity.ROWWISE
    (aq, sa), (bq, sb) = fp8.quantize_fp8(a, granularity=row), fp8.quantize_fp8(b, granularity=row)
    q = [kgemm.scaled_gemm(aq, bq.t(), sa.reshape(-1), sb.reshape(-1), kgemm.SCALE_ROW,
                           config=(cfg[0], cfg[1], 128, cfg[3], 8, 3, flags)) for flags in (kgemm.NARROW_EDGE, 0)]
    assert rel(q[0], q[1]) < 1e-3 and rel(q[0], ref) < 0.1
    blk = fp8.ScalingGranularity.BLOCKWISE
    (aq, sa), (bq, sb) = fp8.quantize_fp8(a, granularity=blk), fp8.quantize_fp8(b, granularity=blk, weight=True)
    q = [kgemm.scaled_gemm(aq, bq.t(), sa, sb.t(), kgemm.SCALE_BLOCK, config=(128, 128, 128, 8, 8, 4, flags))
         for flags in (kgemm.NARROW_EDGE, 0)]
    assert rel(q[0], q[1]) < 1e-3 and rel(q[0], ref) < 0.1


@pytest.mark.gpu
def test_gemm_gpu_default_runs_and_out_dtype():
    a, b = make_gemm(2048, 1024, 512, False, True, torch.bfloat16, device="cuda")
    out = gemm(a, b, trans_b=True, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and dispatcher.last_backend("gemm") in dispatcher.backends("gemm")
    assert rel(out, a.float() @ b.float().t()) < 1e-2
    use(GEMM_OPS, "triton")
    out2 = gemm(a, b, trans_b=True, out_dtype=torch.float32)
    assert rel(out2, a.float() @ b.float().t()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "loop"])
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gpu_bf16(backend, trans_b):
    """DeepSeek-V3-like expert shapes (hidden 7168 -> 2048), skewed counts with empty experts."""
    lens = [0, 900, 17, 0, 3000, 256, 1, 0]
    a, b, gl = make_grouped(lens, 7168, 2048, trans_b, torch.bfloat16, device="cuda")
    a.requires_grad_()
    b.requires_grad_()
    use(GROUPED_OPS, backend)
    out = grouped_gemm(a, b, gl.cuda(), trans_b=trans_b)
    dc = rnd(*out.shape, dtype=torch.bfloat16, device="cuda", seed=7)
    out.backward(dc)
    assert dispatcher.last_backend("grouped_gemm") == backend
    assert dispatcher.last_backend("grouped_gemm_wgrad") == backend
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    grouped_ref(a32, b32, gl, trans_b).backward(dc.double())
    assert rel(out, grouped_ref(a32, b32, gl, trans_b)) < 1e-2
    assert rel(a.grad, a32.grad) < 1e-2
    assert rel(b.grad, b32.grad) < 1e-2
    assert bool((b.grad[[0, 3, 7]] == 0).all())


@pytest.mark.gpu
def test_grouped_gpu_default_matches_reference():
    lens = [128, 0, 640, 64]
    a, b, gl = make_grouped(lens, 1024, 512, False, torch.bfloat16, device="cuda")
    out = grouped_gemm(a, b, gl.cuda())
    assert dispatcher.last_backend("grouped_gemm") in ("torch", "triton")
    assert rel(out, grouped_ref(a, b, gl, False)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_gpu_tma_matches_pointer_kernel(monkeypatch, trans_a, trans_b):
    from turbo_dist.kernels import gemm as kgemm

    a, b = make_gemm(1536, 2304, 1088, trans_a, trans_b, torch.bfloat16, device="cuda")
    A, Bm = op_(a, trans_a), op_(b, trans_b)
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(kgemm, "USE_TMA", tma)
        if torch.cuda.get_device_capability()[0] >= 9:
            assert (kgemm.tma_operands(A, Bm) is not None) == tma
        outs.append(kgemm.gemm(A, Bm))
    exact = A.float() @ Bm.float()
    assert rel(outs[0], exact) < 1e-2 and rel(outs[1], exact) < 1e-2
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=1e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False])
def test_grouped_gpu_config_chosen_during_graph_capture(monkeypatch, tma):
    """A first call inside CUDA graph capture (a decode step captured before any eager call of that shape):
    the tuner times nothing there, the first config runs, the replay is right, and the choice is not
    cached (the next eager call tunes)."""
    from turbo_dist.kernels import _tuner
    from turbo_dist.kernels import gemm as kgemm
    from turbo_dist.kernels import grouped_gemm as kgg
    from turbo_dist.ops.grouped_gemm import group_offsets

    monkeypatch.setattr(kgemm, "USE_TMA", tma)
    monkeypatch.setattr(kgemm, "TUNE_FIRST_ONLY", False)  # several candidates: one alone is cached untimed
    lens = [64, 0, 200, 31]
    a, b, gl = make_grouped(lens, 1024, 512, False, torch.bfloat16, device="cuda")
    offs = group_offsets(gl.cuda(), "cuda")
    first = kgg._fwd_configs(kgg.SCALE_NONE, 2)[0]
    kgg.grouped_gemm(a, b, offs, config=first)  # compile the first config outside the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(_tuner, "_CACHE", {})
    out = torch.empty(a.shape[0], 512, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kgg.grouped_gemm(a, b, offs, out=out)
    assert not _tuner._CACHE
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, grouped_ref(a, b, gl, False)) < 1e-2
    kgg.grouped_gemm(a, b, offs)
    assert len(_tuner._CACHE) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gpu_wgrad_tma_matches_pointer_kernel(monkeypatch, trans_b):
    """bf16 weight gradient on DeepSeek-V3-like sizes (tokens x 7168 by tokens x 2048), ragged groups (one
    empty, one shorter than any BLOCK_K, the rest with a partial last step): TMA (tuned) and pointer kernels
    agree."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs Hopper")
    outs, ref = _wgrad_paths(monkeypatch, [300, 0, 1000, 77, 5, 256], 7168, 2048, trans_b, torch.bfloat16, "cuda")
    assert rel(outs[0], ref) < 1e-2 and rel(outs[1], ref) < 1e-2
    assert bool((outs[0][1] == 0).all())
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gpu_tma_matches_pointer_kernel(monkeypatch, trans_b):
    from turbo_dist.kernels import gemm as kgemm

    lens = [300, 0, 1000, 77]
    a, b, gl = make_grouped(lens, 2048, 1024, trans_b, torch.bfloat16, device="cuda")
    use(GROUPED_OPS, "triton")
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(kgemm, "USE_TMA", tma)
        outs.append(grouped_gemm(a, b, gl.cuda(), trans_b=trans_b))
    ref = grouped_ref(a, b, gl, trans_b)
    assert rel(outs[0], ref) < 1e-2 and rel(outs[1], ref) < 1e-2


@needs_interp
@pytest.mark.parametrize("lens_mode", [True, False])
def test_grouped_triton_kernel_clamps_counts_past_m(lens_mode):
    """Counts on the GPU are not checked on the host (a sync): sizes summing past M must not write past the
    output (guard rows below it stay untouched); rows inside M still get their group's product."""
    from turbo_dist.kernels import grouped_gemm as kgg

    M, K, N = 8, 16, 8
    a = torch.randn(M, K)
    b = torch.randn(2, K, N)
    whole = torch.full((M + 32, N), 7.0)  # the output, then guard rows
    counts = torch.tensor([4, 12])       # sums to 16 > M = 8
    kgg.grouped_gemm(a, b, counts if lens_mode else counts.cumsum(0), out=whole[:M], lens=lens_mode)
    assert bool((whole[M:] == 7.0).all()), "rows past M were written"
    torch.testing.assert_close(whole[:4], a[:4] @ b[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole[4:M], a[4:M] @ b[1], rtol=1e-4, atol=1e-4)


def test_group_lens_on_another_device_names_where_it_may_be():
    """group_lens on a device that is neither a's nor the CPU: the message names a's device once (it said
    'expected cpu or cpu' for CPU operands)."""
    with pytest.raises(ValueError, match="group_lens is on meta; expected cpu$"):
        grouped_gemm(rnd(4, 8), rnd(2, 8, 4), torch.tensor([2, 2], device="meta"))
