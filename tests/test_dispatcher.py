"""The backend dispatcher's order of choice: setter > env var > preference rule > default order."""
import pytest
import torch

from turbo_dist.ops import dispatcher
from turbo_dist.ops.grouped_gemm import _grouped_preference


@pytest.fixture
def op(monkeypatch):
    name = "test_op_pref"
    dispatcher.register_backend(name, "a", lambda x: "a", priority=10)
    dispatcher.register_backend(name, "b", lambda x: "b", lambda x: True if x >= 0 else "negative", priority=20)
    dispatcher.register_backend(name, "c", lambda x: "c", priority=30)
    monkeypatch.delenv("TURBO_DIST_TEST_OP_PREF_BACKEND", raising=False)
    yield name
    dispatcher.set_backend(name, None)
    dispatcher.set_preference(name, None)


def test_default_order_then_preference(op):
    assert dispatcher.dispatch(op, 1) == "a"
    dispatcher.set_preference(op, lambda x: "b" if x > 5 else None)
    assert dispatcher.dispatch(op, 1) == "a"
    assert dispatcher.dispatch(op, 7) == "b" and dispatcher.last_backend(op) == "b"


def test_preference_only_among_accepting_backends(op):
    dispatcher.set_preference(op, lambda x: "b")
    assert dispatcher.dispatch(op, -1) == "a"  # b rejects negative inputs: the rule cannot force it
    dispatcher.set_preference(op, lambda x: 1 / 0)  # a broken rule leaves the default order
    assert dispatcher.dispatch(op, 3) == "a"


def test_explicit_choice_beats_preference(op, monkeypatch):
    dispatcher.set_preference(op, lambda x: "b")
    monkeypatch.setenv("TURBO_DIST_TEST_OP_PREF_BACKEND", "c")
    assert dispatcher.dispatch(op, 3) == "c"
    dispatcher.set_backend(op, "a")
    assert dispatcher.dispatch(op, 3) == "a"
    dispatcher.set_backend(op, "b")
    with pytest.raises(ValueError, match="negative"):
        dispatcher.dispatch(op, -1)


class _Fake:  # shape/device stand-in: the rule looks at nothing else
    def __init__(self, *shape, cuda=True):
        self.shape, self.is_cuda = shape, cuda


def test_grouped_gemm_rule_is_cuda_forward_small_groups_only():
    lens = None
    assert _grouped_preference(_Fake(32 * 128, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"
    assert _grouped_preference(_Fake(32 * 256, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"
    assert _grouped_preference(_Fake(32 * 1024, 7168), _Fake(32, 7168, 4096), lens, False) is None
    assert _grouped_preference(_Fake(32 * 128, 4096), _Fake(32, 7168, 4096), lens, True) is None  # dgrad
    assert _grouped_preference(_Fake(32 * 128, 7168, cuda=False), _Fake(32, 7168, 4096, cuda=False), lens,
                               False) is None
    assert _grouped_preference(torch.zeros(4, 8), torch.zeros(2, 8, 4), torch.tensor([2, 2])) is None  # CPU
