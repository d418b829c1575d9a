"""benchmarks/common.py's interleaved timing: every label timed every round, in a shuffled order that changes
from round to round and from call to call (the rotated order kept each label's neighbours, which biased a label
timed after a power-hungry one on the GPU), failures reported, not timed."""
import os

import pytest
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
    the same order) and TURBO_DIST_BENCH_ORDER=rotate honoured there too."""
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
    bench_integrations.time_interleaved(steps, Args, "cpu")
    common = import_benchmark("common")
    assert seen == sum((common.round_order(list(steps), r, "shuffle") for r in range(3)), [])
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
    assert common.write_json(str(tmp_path / "c.json"), [])["timing_order"] == "shuffle"
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
