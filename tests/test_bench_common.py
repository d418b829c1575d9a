"""benchmarks/common.py's interleaved timing: every label timed every round, in a shuffled order that changes
from round to round and from call to call (the rotated order kept each label's neighbours, which biased a label
timed after a power-hungry one on the GPU), failures reported, not timed."""
import os

import pytest
import torch
from bench_utils import import_benchmark


def _recording(common, monkeypatch):
    seen = []

    def fake_bench(fn, warmup_ms, rep_ms):
        seen.append(fn())
        return float(len(seen))
    monkeypatch.setattr(common, "bench", fake_bench)
    return seen


def test_shuffled_rounds_time_every_label_once_per_round(monkeypatch):
    common = import_benchmark("common")
    seen = _recording(common, monkeypatch)
    labels = [f"l{i}" for i in range(6)]
    fns = {name: (lambda name=name: name) for name in labels}
    res = common.bench_interleaved(fns, rounds=4, warm=False, order="shuffle")
    rounds = [seen[i * 6:(i + 1) * 6] for i in range(4)]
    assert all(sorted(r) == labels for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    assert set(res) == set(labels) and all(isinstance(v, float) for v in res.values())
    seen.clear()
    common.bench_interleaved(fns, rounds=4, warm=False, order="shuffle")
    assert [seen[i * 6:(i + 1) * 6] for i in range(4)] != rounds  # the next call gets other orders


def test_balanced_rounds_put_every_label_after_every_other_equally_often(monkeypatch):
    """The default order: rounds of a Williams design, rounded up to whole designs (n rounds for an even number n
    of labels, 2n for an odd one), so within the rounds of a call each label is timed right after each other label
    equally often and in each position equally often (the round boundaries add one adjacency each); the labels'
    roles differ between calls and between runs (bench_seed)."""
    common = import_benchmark("common")
    seen = _recording(common, monkeypatch)
    monkeypatch.delenv("TURBO_DIST_BENCH_ORDER", raising=False)
    for n, rounds, expect_rounds, pair_count in ((4, 4, 4, 1), (5, 5, 10, 2), (6, 3, 6, 1), (7, 15, 28, 4)):
        labels = [f"l{i}" for i in range(n)]
        seen.clear()
        res = common.bench_interleaved({k: (lambda k=k: k) for k in labels}, rounds=rounds, warm=False)
        assert set(res) == set(labels)
        assert len(seen) == n * expect_rounds
        rows = [seen[i * n:(i + 1) * n] for i in range(expect_rounds)]
        assert all(sorted(r) == labels for r in rows)
        pairs = {}
        for r in rows:
            for a, b in zip(r, r[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + 1
        assert len(pairs) == n * (n - 1) and set(pairs.values()) == {pair_count}, (n, pairs)
        positions = {(x, i) for r in rows for i, x in enumerate(r)}
        assert len(positions) == n * n  # every label in every position
    seen.clear()
    common.bench_interleaved({"a": lambda: "a"}, rounds=1, warm=False)  # one round stays one (a smoke run)
    assert seen == ["a"]
    reps = []
    monkeypatch.setattr(common, "bench", lambda fn, warmup_ms, rep_ms: (reps.append((warmup_ms, rep_ms)), 1.0)[1])
    common.bench_interleaved({k: (lambda: 0) for k in "abcde"}, rounds=5, warmup_ms=10, rep_ms=40, warm=False)
    assert len(reps) == 50 and set(reps) == {(5.0, 20.0)}  # 10 rounds instead of 5: each half as long, same time
    reps.clear()
    common.bench_interleaved({k: (lambda: 0) for k in "abcdefg"}, rounds=2, warmup_ms=10, rep_ms=40, warm=False)
    assert len(reps) == 98 and set(reps) == {(5.0, 10.0)}  # 14 rounds: not below 5 / 10 ms each
    # the shuffled order is the same permutation generator as before; a design row is not a shuffle
    assert common.design_rounds(5, "shuffle") == 1 and common.design_rounds(5, "balanced") == 10
    # other seeds give the labels other roles: over a few seeds the first round's order changes
    firsts = {tuple(common.round_order(list("abcdef"), 0, "balanced", seed=s)) for s in range(8)}
    assert len(firsts) > 1


def test_bench_seed_from_the_environment_and_recorded(tmp_path, monkeypatch):
    """TURBO_DIST_BENCH_SEED repeats a run's orders; without it each process draws its own; write_json records
    the seed as order_seed; a seed that is not an integer is refused with the variable's name."""
    common = import_benchmark("common")
    monkeypatch.setattr(common, "_RUN_SEED", [])
    monkeypatch.setenv("TURBO_DIST_BENCH_SEED", "1234")
    assert common.bench_seed() == 1234
    assert common.write_json(str(tmp_path / "a.json"), [])["order_seed"] == 1234
    monkeypatch.setattr(common, "_RUN_SEED", [])
    monkeypatch.delenv("TURBO_DIST_BENCH_SEED")
    drawn = {common.bench_seed()}
    for _ in range(3):
        monkeypatch.setattr(common, "_RUN_SEED", [])
        drawn.add(common.bench_seed())
    assert len(drawn) > 1 and all(isinstance(s, int) and s >= 0 for s in drawn)
    monkeypatch.setattr(common, "_RUN_SEED", [])
    monkeypatch.setenv("TURBO_DIST_BENCH_SEED", "abc")
    with pytest.raises(ValueError, match="TURBO_DIST_BENCH_SEED"):
        common.bench_seed()
    # a bench that never timed through bench_interleaved still writes its JSON, with the reason in place of a seed
    doc = common.write_json(str(tmp_path / "b.json"), [], {"timing_order": "each op alone"})
    assert "TURBO_DIST_BENCH_SEED" in doc["order_seed"]
    assert common.write_json(str(tmp_path / "c.json"), [], {"order_seed": None})["order_seed"] is None


def test_rotated_rounds_keep_neighbours(monkeypatch):
    common = import_benchmark("common")
    seen = _recording(common, monkeypatch)
    fns = {name: (lambda name=name: name) for name in ("a", "b", "c")}
    common.bench_interleaved(fns, rounds=3, warm=False, order="rotate")
    assert seen == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_failing_label_is_reported_and_not_timed(monkeypatch):
    common = import_benchmark("common")
    seen = _recording(common, monkeypatch)
    errors = []

    def boom():
        raise RuntimeError("no such backend here")
    res = common.bench_interleaved({"ok": lambda: "ok", "bad": boom}, rounds=2, order="shuffle",
                                   on_error=lambda label, exc: errors.append((label, str(exc))))
    assert res["bad"] is None and isinstance(res["ok"], float)
    assert errors == [("bad", "no such backend here")] and seen.count("ok") == 2
    with pytest.raises(ValueError, match="shuffle"):
        common.bench_interleaved({"ok": lambda: "ok"}, order="random")


def test_multi_rank_bench_takes_the_same_round_orders(monkeypatch):
    """bench_integrations times its steps in common.round_order's rounds: seeded by the round alone (every rank
    the same order), whole balanced designs, and TURBO_DIST_BENCH_ORDER=rotate honoured there too."""
    bench_integrations = import_benchmark("bench_integrations")
    seen = []
    monkeypatch.setattr(bench_integrations, "time_ms", lambda fn, warmup, iters, device: (seen.append(fn()), 1.0)[1])

    class Args:
        rounds, warmup, iters = 3, 0, 1
    steps = {name: (lambda name=name: name) for name in ("a", "b", "c")}
    monkeypatch.setenv("TURBO_DIST_BENCH_ORDER", "rotate")
    assert bench_integrations.time_interleaved(steps, Args, "cpu") == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert seen == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    seen.clear()
    monkeypatch.delenv("TURBO_DIST_BENCH_ORDER")
    monkeypatch.setenv("TURBO_DIST_BENCH_SEED", "7")
    monkeypatch.setitem(bench_integrations.bench_seed.__globals__, "_RUN_SEED", [])  # this run's seed: drawn anew
    bench_integrations.time_interleaved(steps, Args, "cpu")
    common = import_benchmark("common")
    # balanced by default: 3 labels (odd) take 6 rounds for a whole design, seeded by the run's seed (rank 0's)
    assert seen == sum((common.round_order(list(steps), r, "balanced", seed=7) for r in range(6)), [])
    monkeypatch.setenv("TURBO_DIST_BENCH_ORDER", "random")
    with pytest.raises(ValueError, match="shuffle"):
        bench_integrations.time_interleaved(steps, Args, "cpu")


def test_clock_probe_reads_nvidia_smi_samples(tmp_path):
    """probe_grouped_clocks parses nvidia-smi's CSV (local timestamps, MHz, W, throttle reasons) and skips what is
    not a sample (a header, a cut line), so each label's clock is the mean of its own window's samples."""
    clocks = import_benchmark("probe_grouped_clocks")
    log = tmp_path / "smi.csv"
    log.write_text("timestamp, clocks.sm [MHz], power.draw [W], clocks_throttle_reasons.active\n"
                   "2026/12/04 20:40:10.314, 1323, 658.20, 0x0000000000000004\n"
                   "2026/12/04 20:40:10.364, 1980, 87.29, 0x0000000000000000\n"
                   "2026/12/04 20:40:10.4\n")
    samples = clocks.parse_smi(str(log))
    assert [s[1:] for s in samples] == [(1323.0, 658.2, "0x0000000000000004"), (1980.0, 87.29, "0x0000000000000000")]
    assert samples[1][0] - samples[0][0] == pytest.approx(0.05, abs=1e-4)


def test_json_records_commit_order_and_settings(tmp_path, monkeypatch):
    """write_json names the code (commit, whether tracked files differ from it), the order bench_interleaved timed
    in and the TURBO_DIST_* settings that change what the defaults run; a bench that times otherwise says so."""
    import json
    import re
    import subprocess

    common = import_benchmark("common")
    monkeypatch.setenv("TURBO_DIST_BENCH_ORDER", "rotate")
    monkeypatch.setenv("TURBO_DIST_SOME_RULE", "1")
    doc = json.loads(json.dumps(common.write_json(str(tmp_path / "a.json"), [{"x": 1}], {"k": 2})))
    assert json.loads((tmp_path / "a.json").read_text()) == doc
    assert doc["timing_order"] == "rotate" and doc["meta"] == {"k": 2}
    env = doc["machine"]["env"]
    assert env["TURBO_DIST_SOME_RULE"] == "1" and env["TURBO_DIST_BENCH_ORDER"] == "rotate"
    assert all(k.startswith("TURBO_DIST_") for k in env)
    root = os.path.dirname(common.__file__)
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit and a dirty flag
        assert doc["machine"]["git_commit"] == head.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}", doc["machine"]["git_commit"])
        assert isinstance(doc["machine"]["git_dirty"], bool)
    doc = common.write_json(str(tmp_path / "b.json"), [], {"timing_order": "each op alone, fixed order"})
    assert doc["timing_order"] == "each op alone, fixed order" and "timing_order" not in doc["meta"]
    monkeypatch.delenv("TURBO_DIST_BENCH_ORDER")
    assert common.write_json(str(tmp_path / "c.json"), [])["timing_order"] == "balanced"
    assert re.fullmatch(r"[0-9a-f]{16}", doc["machine"]["source_digest"])
    # outside a repository: empty, not an error; the source digest follows the files' bytes
    assert common.git_info(str(tmp_path)) == {"git_commit": None, "git_dirty": None, "git_changed": None,
                                              "source_digest": None}
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "x.py").write_text("a = 1\n")
    first = common.source_digest(str(tmp_path))
    (tmp_path / "benchmarks" / "x.py").write_text("a = 2\n")
    assert first and common.source_digest(str(tmp_path)) not in (None, first)


def test_datasheet_peaks_by_gpu_name():
    """frac_peak divides by this GPU's own datasheet number (HBM: H100 SXM 3350, H200 4800 GB/s), none for an
    unknown GPU; the most specific name wins (an H100 PCIe is not an SXM H100)."""
    common = import_benchmark("common")
    assert common.peak_hbm_gbps("NVIDIA H200") == 4800.0
    assert common.peak_hbm_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert common.peak_hbm_gbps("NVIDIA H100 PCIe") == 2000.0
    assert common.peak_hbm_gbps("NVIDIA A100-SXM4-80GB") is None
    assert common.peak_tflops("bf16", "NVIDIA H200") == 989.4 and common.peak_tflops("fp8", "NVIDIA GB200") is None


def test_bounds_probe_labels_compute_their_passes(monkeypatch):
    """probe_grouped_bounds' labels do the work they are named for (small shapes, CPU fp32): the skewed loop, the
    default and torch._grouped_mm give the grouped forward and backward; the uniform labels the same on M // G
    rows per expert, torch.bmm included; dense one GEMM of the same FLOPs by expert 0's weight."""
    bounds = import_benchmark("probe_grouped_bounds")
    lens = torch.tensor([5, 0, 9, 2])
    monkeypatch.setattr(bounds, "grouped_case", lambda name: (4, 12, 8, lens, 16))
    torch.manual_seed(0)
    fns, flops, flops_u, shape, _ = bounds.case_fns("G4_x_4", dev="cpu", dtype=torch.float32)
    assert flops == {"fwd": 2.0 * 16 * 12 * 8, "bwd": 4.0 * 16 * 12 * 8} and flops_u["fwd"] == flops["fwd"]
    ref_fwd = fns["fwd"]["loop"]()
    assert isinstance(ref_fwd, torch.Tensor) and ref_fwd.shape == (16, 8)
    for label in ("default", "torch_grouped_mm"):
        torch.testing.assert_close(fns["fwd"][label](), ref_fwd, rtol=1e-4, atol=1e-4)
    uni = fns["fwd"]["loop_uniform"]()
    torch.testing.assert_close(fns["fwd"]["default_uniform"](), uni, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fns["fwd"]["bmm_uniform"]().reshape(16, 8), uni, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(uni, ref_fwd)  # uniform counts route rows to other experts
    dgrad, wgrad = fns["bwd"]["loop"]()
    assert dgrad.shape == (16, 12) and wgrad.shape == (4, 12, 8)
    assert torch.count_nonzero(wgrad[1]) == 0  # expert 1 has no rows
    for label in ("default", "torch_grouped_mm"):
        d, w = fns["bwd"][label]()
        torch.testing.assert_close(d, dgrad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w, wgrad, rtol=1e-4, atol=1e-4)
    du, wu = fns["bwd"]["loop_uniform"]()
    bd, bw = fns["bwd"]["bmm_uniform"]()
    torch.testing.assert_close(bd.reshape(16, 12), du, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bw, wu, rtol=1e-4, atol=1e-4)
    dense = fns["fwd"]["dense"]()
    assert dense.shape == (16, 8)
    dd, dw = fns["bwd"]["dense"]()
    assert dd.shape == (16, 12) and dw.shape == (12, 8)
