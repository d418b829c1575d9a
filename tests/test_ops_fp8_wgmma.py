"""Backend "wgmma" of grouped_scaled_mm: our Hopper FP8 BLOCKWISE grouped GEMM (turbo_dist._fp8_wgmma,
csrc/fp8_wgmma/). CPU: the CUDA source compiles for sm_90a where nvcc is found, and the backend declines what it
cannot run with the reason; GPU (marker `gpu`, SM90): against the exact product of the dequantized operands on
odd shapes, token counts on the GPU and on the host, empty groups, e5m2 activations.
"""
import ast
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

from turbo_dist.ops import ScalingGranularity, dispatcher, fp8_wgmma, grouped_scaled_mm, quantize_fp8
from turbo_dist.ops.fp8_grouped import _reference_grouped_scaled

from test_ops_fp8 import E4M3, E5M2, rnd, snr

B = ScalingGranularity.BLOCKWISE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _reset_backends():
    yield
    dispatcher.set_backend("grouped_scaled_mm", None)


def _operands(lens, K, N, a_dtype=E4M3, device="cpu", seed=0):
    G = len(lens)
    a = rnd(sum(lens), K, device=device, seed=seed)
    w = rnd(G, N, K, device=device, seed=seed + 1) * K ** -0.5
    aq, sa = quantize_fp8(a, a_dtype, B)
    wq, sw = quantize_fp8(w, E4M3, B, weight=True)
    return aq, wq, sa, sw


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _setup_nvcc_flags():
    """setup.py's WGMMA_NVCC_FLAGS (read, not imported: importing setup.py would run setup())."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "WGMMA_NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no WGMMA_NVCC_FLAGS")


def test_wgmma_source_compiles_for_sm90a(tmp_path):
    """nvcc (ptxas included) accepts every instantiation of the kernel for sm_90a: the CPU CI's check of the
    CUDA source, which its machines run nowhere else."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    pybind11 = pytest.importorskip("pybind11")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "fp8_wgmma", "*.cu")))
    assert sources
    flags = [f for f in _setup_nvcc_flags() if f != "--shared"]
    procs = []
    for i, src in enumerate(sources):  # one object each (nvcc -c -o takes one source), compiled side by side
        obj = tmp_path / f"k{i}.o"
        cmd = [nvcc, *flags, "-Xptxas=-v", "-c", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", src, "-o", str(obj)]
        procs.append((src, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        done = [(src, obj, subprocess.CompletedProcess(p.args, None, *p.communicate(timeout=600)), p)
                for src, obj, p in procs]
    finally:
        for _, _, p in procs:  # none outlives a timeout
            if p.poll() is None:
                p.kill()
    for src, obj, res, p in done:
        res.returncode = p.returncode
        assert res.returncode == 0, f"{src}: {res.stderr[-4000:]}"
        # ptxas serializes a kernel's WGMMAs, a silent slowdown, when it makes a call (a printf is one: C7510) or
        # when other instructions read the accumulators while they are in flight (C7514, e.g. accumulators kept in
        # local memory); reported with -v
        log = res.stdout + res.stderr
        assert not re.search(r"C751\d", log), f"{src}: {log[-4000:]}"
        assert not re.search(r"[1-9]\d* bytes stack frame", log), f"{src}: a kernel uses local memory: {log[-4000:]}"
        assert os.path.getsize(obj) > 0
        lone = _lone_waited_wgmmas(obj)
        assert not lone, f"{src}: WGMMAs serialized without a warning (each alone and waited for): {lone}"


def _cuobjdump():
    nvcc = _nvcc()
    found = [os.path.join(os.path.dirname(nvcc), "cuobjdump")] if nvcc else []
    try:  # triton ships one
        import triton
        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in found if os.path.exists(c)), shutil.which("cuobjdump"))


def _lone_waited_wgmmas(obj):
    """Per kernel, how often the SASS has a WGMMA alone in its group and waited for at once (WARPGROUP.ARRIVE,
    HGMMA ... gsb0, WARPGROUP.DEPBAR.LE gsb0, 0x0): ptxas's serialization, which it also does without any C751x
    warning (a stage's WGMMAs chosen by branches around them did it). Every stage of our kernels issues two or more
    WGMMAs before it waits, and waits for all only after the next stage is issued or for promotion."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    res = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lone = {}
    for part in res.stdout.split("Function : ")[1:]:
        ops = [line for line in part.splitlines() if "HGMMA" in line or "WARPGROUP." in line]
        n = sum(1 for a, h, w in zip(ops, ops[1:], ops[2:])
                if "WARPGROUP.ARRIVE" in a and "HGMMA" in h and "gsb0" in h and "DEPBAR.LE gsb0, 0x0" in w)
        if n:
            lone[part.splitlines()[0].strip()[:120]] = n
    return lone


def test_wgmma_declines_with_reasons(monkeypatch):
    aq, wq, sa, sw = _operands([3, 5], 256, 128)
    args = (aq, wq.transpose(1, 2), sa, sw.transpose(1, 2), torch.tensor([3, 5]))
    can = fp8_wgmma._wgmma_grouped_scaled_can
    assert "BLOCKWISE only" in can(*args, "row", torch.bfloat16)
    monkeypatch.setitem(fp8_wgmma._MOD, "mod", None)
    monkeypatch.setitem(fp8_wgmma._MOD, "why", "turbo_dist._fp8_wgmma is not built (test)")
    assert "not built" in can(*args, "block", torch.bfloat16)
    monkeypatch.setitem(fp8_wgmma._MOD, "mod", object())  # built, but these are CPU tensors
    assert "CUDA" in can(*args, "block", torch.bfloat16)
    # registered, first in the default order (ops/fp8_wgmma.py)
    assert dispatcher.backends("grouped_scaled_mm")[0] == "wgmma"


def test_half_tile_args():
    """The counter of the dynamic tile order (both Hopper wrappers): added where half tiles run (one CTA per tile,
    no stream-K tail), left out by default where they cannot, a ValueError where asked for anyway."""
    sk, keep = fp8_wgmma.half_tile_args("cpu", True, True, 1, {}, ())
    assert sk["counter"] == keep[0].data_ptr() and keep[0].dtype == torch.int32 and int(keep[0]) == 0
    assert fp8_wgmma.half_tile_args("cpu", False, True, 1, {}, ()) == ({}, ())
    tail = {"tail_pct": 50}
    assert fp8_wgmma.half_tile_args("cpu", True, False, 1, tail, ()) == (tail, ())  # the default yields
    assert fp8_wgmma.half_tile_args("cpu", True, False, 2, {}, ()) == ({}, ())
    for cluster, sk in ((2, {}), (1, tail)):
        with pytest.raises(ValueError, match="half_tiles needs cluster=1"):
            fp8_wgmma.half_tile_args("cpu", True, True, cluster, sk, ())


def test_wgmma_cluster_rule():
    """Two CTAs sharing the weight tile from 768 rows per group on average (the H200 A/B in ops/fp8_wgmma.py)."""
    pick = fp8_wgmma.pick_cluster
    assert pick(8 * 1024, 8) == 2 and pick(32 * 256, 32) == 1
    assert pick(768 * 4, 4) == 2 and pick(768 * 4 - 1, 4) == 1
    assert pick(0, 0) == 1


def _wgmma_or_skip():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    if fp8_wgmma.wgmma_module() is None:
        pytest.skip(fp8_wgmma._MOD["why"])


@pytest.mark.gpu
@pytest.mark.parametrize("lens,K,N,a_dtype", [
    ([300, 0, 77, 1, 129, 0, 512, 5], 7168, 4096, E4M3),  # skewed, empty groups, rows off every tile
    ([64, 65, 192, 193, 63], 512, 768, E4M3),              # 64 / 65 rows left in a group's last tile
    ([1], 256, 128, E4M3),                                   # one row
    ([130, 60], 320, 200, E4M3),                             # K and N off 128 (TMA zero-fills, stores masked)
    ([0, 0, 0], 512, 256, E4M3),                             # nothing to compute
    ([200, 57, 384], 1024, 512, E5M2),                       # e5m2 activations (dgrad's format)
    ([1000], 2048, 7168, E4M3),                              # one group: fc2's shape
])
def test_wgmma_matches_reference_gpu(lens, K, N, a_dtype):
    _wgmma_or_skip()
    aq, wq, sa, sw = _operands(lens, K, N, a_dtype, device="cuda", seed=len(lens) + K)
    b, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    lens_d = torch.tensor(lens, device="cuda")
    assert fp8_wgmma._wgmma_grouped_scaled_can(aq, b, sa, sb, lens_d, "block", torch.bfloat16) is True
    out = fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16)
    torch.cuda.synchronize()
    assert out.shape == (sum(lens), N) and out.dtype == torch.bfloat16
    if sum(lens) == 0:
        return
    ref = _reference_grouped_scaled(aq, b, sa, sb, torch.tensor(lens), "block", torch.float32)
    # the same products summed in another order, rounded to bf16 once: bf16's own precision
    assert snr(out.float(), ref) >= 45, f"SNR {snr(out.float(), ref):.1f} dB"
    assert torch.isfinite(out).all()
    # two CTAs sharing each weight tile (TMA multicast), a group's odd last row tile leaving rank 1 idle and
    # weight halves past N: the same products in the same order, so the same bits
    outs = {c: fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=c,
                                              tail_pct=0) for c in (1, 2)}
    half = fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=1, tail_pct=0,
                                          half_tiles=True)
    torch.cuda.synchronize()
    assert torch.equal(outs[1], outs[2]), "one CTA per tile and two sharing the weights differ"
    # dynamic half tiles: the same products and promotions in the same order (one round instead of two)
    assert snr(half.float(), outs[1].float()) >= 60, "dynamic half tiles differ from whole tiles"
    if fp8_wgmma.pick_cluster(sum(lens), len(lens)) == 2 or not fp8_wgmma.TAIL_PCT:
        assert torch.equal(out, outs[fp8_wgmma.pick_cluster(sum(lens), len(lens))])


@pytest.mark.gpu
@pytest.mark.parametrize("num_sms", [3, 7, 16, 40])
def test_wgmma_stream_k_tail_gpu(num_sms):
    """The stream-K tail (csrc/fp8_wgmma/common.h) on a few CTAs, so that tiles split at many K positions: the same
    product as whole tiles up to the order of fp32 sums (SNR) and against the dequantized reference."""
    _wgmma_or_skip()
    lens = [300, 0, 77, 129, 512, 5, 1000]  # 18 row tiles x 2 column tiles, 21 K steps each
    aq, wq, sa, sw = _operands(lens, 2688, 384, device="cuda", seed=3)
    b, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    lens_d = torch.tensor(lens, device="cuda")

    def run(pct, waves=2):
        return fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=1,
                                              tail_pct=pct, num_sms=num_sms, tail_waves=waves)

    whole = run(0)
    ref = _reference_grouped_scaled(aq, b, sa, sb, torch.tensor(lens), "block", torch.float32)
    for pct, waves in ((25, 2), (100, 2), (100, 1)):
        out = run(pct, waves)
        torch.cuda.synchronize()
        assert snr(out.float(), whole.float()) >= 45 and snr(out.float(), ref) >= 45, (pct, waves, num_sms)
    with pytest.raises(ValueError, match="cluster 1"):
        fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, lens_d, "block", torch.bfloat16, cluster=2, tail_pct=50)


@pytest.mark.parametrize("tiles,stride,k", [(9, 4, 5), (17, 8, 3), (544, 132, 112), (1088, 132, 56), (20, 7, 1),
                                            (12, 4, 6), (3, 8, 4), (131, 132, 16), (133, 132, 16), (150, 132, 7)])
@pytest.mark.parametrize("pct", [0, 25, 100])
@pytest.mark.parametrize("waves", [1, 2])
def test_stream_k_pieces_cover_every_step_once(tiles, stride, k, pct, waves):
    """fp8_wgmma.work_pieces, the host mirror of the kernels' schedule: every (tile, K step) once; a split tile's
    head (from step 0) is the last piece of CTA c, its other pieces belong to CTAs c + 1 .. TailSplit.last_owner
    (whom Fixup::merge waits for), each with only whole tiles before it (published before that CTA waits on
    anyone: no chain of waits); with waves 2 a tile is in at most two pieces; no CTA runs more steps than whole
    tiles would give the busiest one, and with the tail on they are balanced within a step."""
    pieces = {c: fp8_wgmma.work_pieces(tiles, c, stride, k, pct, waves) for c in range(stride)}
    dp, run = fp8_wgmma.tail_split(tiles, stride, k, pct, waves)
    seen, by_tile = {}, {}
    for c, ps in pieces.items():
        for i, (t, kb0, kb1) in enumerate(ps):
            assert 0 <= t < tiles and 0 <= kb0 < kb1 <= k
            for kb in range(kb0, kb1):
                assert (t, kb) not in seen
                seen[(t, kb)] = c
            by_tile.setdefault(t, []).append((kb0, c, i))
    assert len(seen) == tiles * k
    for t, parts in by_tile.items():
        parts.sort()
        if len(parts) == 1:
            continue
        assert waves == 1 or len(parts) == 2
        (_, head, i), others = parts[0], parts[1:]
        assert i == len(pieces[head]) - 1, "a head ends its CTA's run"
        assert [c for _, c, _ in others] == list(range(head + 1, head + 1 + len(others)))
        assert head + len(others) == ((t + 1) * k - 1 - dp * k) // run  # TailSplit.last_owner
        for _, c, j in others:
            assert all(p[1:] == (0, k) for p in pieces[c][:j])
    steps = [sum(kb1 - kb0 for _, kb0, kb1 in ps) for ps in pieces.values()]
    assert max(steps) <= -(-tiles // stride) * k
    if run:
        assert max(steps) - min(s for s in steps if s) <= run
        assert max(steps) == run + dp // stride * k



@pytest.mark.gpu
def test_wgmma_through_the_api_gpu():
    """grouped_scaled_mm with the backend forced: device counts, host counts (copied to the GPU), the same
    result, and a strided scale_a (a transposed copy's view) read through its strides."""
    _wgmma_or_skip()
    lens = [256, 0, 100, 3000, 17]
    aq, wq, sa, sw = _operands(lens, 7168, 2048, device="cuda", seed=5)
    dispatcher.set_backend("grouped_scaled_mm", "wgmma")
    out_d = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens, device="cuda"))
    assert dispatcher.last_backend("grouped_scaled_mm") == "wgmma"
    out_h = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens))
    assert torch.equal(out_d, out_h)
    sa_t = sa.t().contiguous().t()  # same values, M-major strides
    assert torch.equal(grouped_scaled_mm(aq, wq, sa_t, sw, torch.tensor(lens, device="cuda")), out_d)
    dispatcher.set_backend("grouped_scaled_mm", "triton")
    out_t = grouped_scaled_mm(aq, wq, sa, sw, torch.tensor(lens, device="cuda"))
    assert snr(out_d.float(), out_t.float()) >= 40


@pytest.mark.gpu
def test_wgmma_bad_device_counts_are_clamped_gpu():
    """Counts on the GPU are trusted (checking them would sync): the kernel clamps each group's end to [its start,
    M], so counts summing past M, or negative ones, never make it write outside out; what it computes is then
    the clamped grouping's product."""
    _wgmma_or_skip()
    aq, wq, sa, sw = _operands([100, 60], 256, 128, device="cuda", seed=9)
    b, sb = wq.transpose(1, 2), sw.transpose(1, 2)

    def run(lens, cluster):
        out = fp8_wgmma.wgmma_grouped_scaled(aq, b, sa, sb, torch.tensor(lens, device="cuda"), "block",
                                             torch.bfloat16, cluster=cluster)
        torch.cuda.synchronize()
        return out

    for cluster in (1, 2):
        assert torch.equal(run([100, 5000], cluster), run([100, 60], 1))  # group 1 ends at M
        assert torch.equal(run([-50, 300], cluster), run([0, 160], 1))    # group 0 ends at its start: empty


def test_wgmma_blockwise_predicate_and_empty_k(monkeypatch):
    """The FP8 predicate past its device checks (faked): well-formed BLOCKWISE operands pass, a base or stride
    off 16 bytes and K off 16 are refused with the reason; K == 0 returns zeros without reaching the launcher
    (which refuses K <= 0)."""
    import types

    from turbo_dist.kernels import gemm as gemm_kernels

    B = ScalingGranularity.BLOCKWISE
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    calls = []
    monkeypatch.setattr(fp8_wgmma, "wgmma_module",
                        lambda: types.SimpleNamespace(grouped_blockwise=lambda **kw: calls.append(kw)))
    can = fp8_wgmma._wgmma_grouped_scaled_can
    aq, sa = quantize_fp8(rnd(256, 512, seed=60), E4M3, B)
    wq, sw = quantize_fp8(rnd(2, 256, 512, seed=61), E4M3, B, weight=True)
    bq, sb = wq.transpose(1, 2), sw.transpose(1, 2)
    gl = torch.tensor([128, 128])
    assert can(aq, bq, sa, sb, gl, "block", torch.bfloat16) is True
    buf = torch.empty(256 * 512 + 8, dtype=torch.uint8).view(E4M3)
    mis = buf[8:].view(256, 512)
    assert "16-byte" in can(mis, bq, sa, sb, gl, "block", torch.bfloat16)
    assert "row-major" in can(aq.t().contiguous().t(), bq, sa, sb, gl, "block", torch.bfloat16)
    assert "BLOCKWISE" in can(aq, bq, sa, sb, gl, "row", torch.bfloat16)
    assert "bf16 output" in can(aq, bq, sa, sb, gl, "block", torch.float32)
    monkeypatch.setattr(gemm_kernels, "_num_sms", lambda device: 132)
    empty_k = fp8_wgmma.wgmma_grouped_scaled(aq[:, :0], bq[:, :0], sa[:, :0], sb[:, :0], gl, "block", torch.bfloat16)
    assert empty_k.shape == (256, 256) and not empty_k.any() and calls == []
