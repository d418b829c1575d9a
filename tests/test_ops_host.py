"""turbo_dist.ops._host: what the host derives from small tensors, kept per tensor state."""
import gc
import io
import pickle

import pytest
import torch

from turbo_dist.ops import _host


def _counter():
    calls = []

    def make():
        calls.append(1)
        return len(calls)

    return calls, make


def test_memo_once_per_state():
    t = torch.tensor([0, 3, 7])
    calls, make = _counter()
    assert _host.memo(t, "k", make) == 1
    assert _host.memo(t, "k", make) == 1 and len(calls) == 1
    assert _host.memo(t, "other", make) == 2  # another key: its own entry
    t.add_(1)  # an in-place write bumps the version counter: made again
    assert _host.memo(t, "k", make) == 3
    assert _host.memo(t.clone(), "k", make) == 4  # another tensor with the same values: its own state
    view = t[:2]
    assert _host.memo(view, "k", make) == 5
    t[0] = 5  # a write through the base is a write of the view (one version counter)
    assert _host.memo(view, "k", make) == 6


def test_memo_deps():
    owner, dep = torch.tensor([0, 1]), torch.tensor([0, 2])
    calls, make = _counter()
    assert _host.memo(owner, "k", make, deps=(dep,)) == 1
    assert _host.memo(owner, "k", make, deps=(dep,)) == 1
    dep.mul_(2)
    assert _host.memo(owner, "k", make, deps=(dep,)) == 2
    other = dep.clone()
    assert _host.memo(owner, "k", make, deps=(other,)) == 3  # another dep object
    assert _host.memo(owner, "k", make, deps=()) == 4


def test_memo_errors_and_untrackable():
    t = torch.tensor([0, 1])

    def fail():
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        _host.memo(t, "bad", fail)
    with pytest.raises(ValueError, match="refused"):  # an error is not cached: raised again
        _host.memo(t, "bad", fail)
    calls, make = _counter()
    assert _host.memo(t, ["unhashable"], make) == 1 and _host.memo(t, ["unhashable"], make) == 2
    with torch.inference_mode():
        u = torch.tensor([0, 1])
    assert _host.memo(u, "k", make) == 3 and _host.memo(u, "k", make) == 4  # no version counter: never kept
    assert _host.memo(None, "k", make) == 5 and _host.memo(t, "k", make, deps=(None,)) == 6


def test_memo_entries_go_with_their_tensor_and_keep_it_picklable():
    t = torch.tensor([0, 4, 9])
    before = _host.cache_info()[0]
    assert _host.host_values(t) == [0, 4, 9]
    assert _host.cache_info()[0] == before + 1
    buf = io.BytesIO()
    torch.save(t, buf)  # nothing stored on the tensor itself
    pickle.dumps(t)
    del t
    gc.collect()
    assert _host.cache_info()[0] == before


def test_memo_bounded():
    keep = [torch.tensor([i]) for i in range(_host._MAX_OWNERS + 5)]
    for t in keep:
        _host.host_values(t)
    assert _host.cache_info()[0] <= _host._MAX_OWNERS
    t = keep[0]
    for i in range(_host._MAX_KEYS + 3):
        _host.memo(t, i, lambda: i)
    assert len(_host._TABLE[id(t)][1]) <= _host._MAX_KEYS


def test_host_values_reads_once(monkeypatch):
    t = torch.tensor([0, 2, 5], dtype=torch.int32)
    reads = []
    real = torch.Tensor.tolist

    def tolist(x):
        reads.append(id(x))
        return real(x)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    assert _host.host_values(t) == [0, 2, 5] and _host.host_values(t) == [0, 2, 5]
    assert reads.count(id(t)) == 1
    made = _host.device_ints([0, 3, 8], torch.int32, "cpu", remember=True)
    assert made.dtype == torch.int32 and made.tolist() == [0, 3, 8]
    reads.clear()
    assert _host.host_values(made) == [0, 3, 8] and not reads  # made from host values: nothing read back
    plain = _host.device_ints(torch.tensor([1, 2]), torch.int64, "cpu")
    assert plain.dtype == torch.int64 and plain.tolist() == [1, 2]
    reads.clear()
    _host.host_values(plain)
    assert reads  # not remembered: read once


@pytest.mark.gpu
def test_device_ints_gpu():
    t = _host.device_ints(list(range(1000)), torch.int32, "cuda", remember=True)
    assert t.device.type == "cuda" and t.cpu().tolist() == list(range(1000))
    assert _host.host_values(t)[-1] == 999
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        with torch.cuda.graph(g):
            _host.device_ints([0, 1], torch.int32, "cuda")
