"""The backend dispatcher's order of choice: setter > env var > preference rule > default order."""
import time

import pytest
import torch

from turbo_dist.ops import dispatcher
from turbo_dist.ops.grouped_gemm import _grouped_preference, _wgrad_preference


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


def test_grouped_gemm_rule_is_cuda_small_groups_only(monkeypatch):
    from turbo_dist.ops import grouped_wgmma

    monkeypatch.setattr(grouped_wgmma, "PREFERRED", False)  # "ours" = the Triton kernel here; the Hopper one below
    lens = None
    assert _grouped_preference(_Fake(32 * 128, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"
    assert _grouped_preference(_Fake(32 * 256, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"
    # ~1024 rows per group: torch's kernel, except an fc1-shaped forward (K >= N) over >= 16 experts
    assert _grouped_preference(_Fake(32 * 1024, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"
    assert _grouped_preference(_Fake(16 * 1024, 7168), _Fake(16, 7168, 4096), lens, False) == "triton"
    assert _grouped_preference(_Fake(32 * 2048, 7168), _Fake(32, 7168, 4096), lens, False) is None
    assert _grouped_preference(_Fake(8 * 1024, 7168), _Fake(8, 7168, 4096), lens, False) is None
    assert _grouped_preference(_Fake(32 * 1024, 2048), _Fake(32, 2048, 7168), lens, False) is None  # fc2
    # b transposed (dgrad of a [G, K, N] weight): ours up to 512 rows per group, N read from b's middle dim
    assert _grouped_preference(_Fake(32 * 128, 4096), _Fake(32, 7168, 4096), lens, True) == "triton"
    assert _grouped_preference(_Fake(32 * 512, 4096), _Fake(32, 7168, 4096), lens, True) == "triton"
    assert _grouped_preference(_Fake(32 * 1024, 4096), _Fake(32, 7168, 4096), lens, True) is None
    assert _grouped_preference(_Fake(8 * 128, 7168), _Fake(8, 2048, 7168), lens, True) is None  # 30 GFLOP
    assert _grouped_preference(_Fake(32 * 128, 7168, cuda=False), _Fake(32, 7168, 4096, cuda=False), lens,
                               False) is None
    assert _grouped_preference(torch.zeros(4, 8), torch.zeros(2, 8, 4), torch.tensor([2, 2])) is None  # CPU
    # too little work: host-bound, where torch._grouped_mm's cheaper launch wins (G=8 x 128 tokens, fc2 7168)
    assert _grouped_preference(_Fake(8 * 128, 2048), _Fake(8, 2048, 7168), lens, False) is None
    assert _grouped_preference(_Fake(32 * 128, 2048), _Fake(32, 2048, 7168), lens, False) == "triton"  # 120 GFLOP
    # on SM90 with turbo_dist._fp8_wgmma built, our Hopper kernel takes what the rule gives to ours, where it
    # accepts the inputs; the Triton kernel where it declines; torch's stays torch's
    monkeypatch.setattr(grouped_wgmma, "PREFERRED", True)
    monkeypatch.setattr(grouped_wgmma, "_wgmma_grouped_can", lambda *args: True)
    assert _grouped_preference(_Fake(32 * 256, 7168), _Fake(32, 7168, 4096), lens, False) == "wgmma"
    assert _grouped_preference(_Fake(32 * 512, 4096), _Fake(32, 7168, 4096), lens, True) == "wgmma"
    assert _grouped_preference(_Fake(8 * 1024, 7168), _Fake(8, 7168, 4096), lens, False) is None
    # ... except a transposed b with K > N (fc2's dgrad: K 7168, N 2048), measured behind the Triton kernel
    assert _grouped_preference(_Fake(32 * 256, 7168), _Fake(32, 2048, 7168), lens, True) == "triton"
    assert _grouped_preference(_Fake(32 * 256, 2048), _Fake(32, 2048, 7168), lens, False) == "wgmma"  # fc2 fwd
    # and a forward wider than deep (fc2) up to 1024 rows per group, where torch's kernel ran before
    assert _grouped_preference(_Fake(8 * 1024, 2048), _Fake(8, 2048, 7168), lens, False) == "wgmma"
    assert _grouped_preference(_Fake(8 * 2048, 2048), _Fake(8, 2048, 7168), lens, False) is None
    assert _grouped_preference(_Fake(8 * 1024, 7168), _Fake(8, 2048, 7168), lens, True) is None  # its dgrad
    assert _grouped_preference(_Fake(8 * 1024, 4096), _Fake(8, 7168, 4096), lens, True) == "wgmma"  # fc1's dgrad
    assert _grouped_preference(_Fake(8 * 1024, 7168), _Fake(8, 7168, 4096), lens, False) is None  # G=8 fc1 fwd
    monkeypatch.setattr(grouped_wgmma, "_wgmma_grouped_can", lambda *args: "wgmma runs on SM90 (Hopper) only")
    assert _grouped_preference(_Fake(32 * 256, 7168), _Fake(32, 7168, 4096), lens, False) == "triton"


def test_grouped_wgrad_rule_follows_the_tma_kernel(monkeypatch):
    from turbo_dist.kernels import grouped_wgrad as kgw
    from turbo_dist.ops import grouped_wgmma

    monkeypatch.setattr(grouped_wgmma, "WGRAD_PREFERRED", False)  # the Triton kernel here; the Hopper one below
    monkeypatch.setattr(kgw, "wgrad_tma_ok", lambda x, y: True)
    g32, g8 = _Fake(32, cuda=False), _Fake(8, cuda=False)  # group_lens: only its length is read
    assert _wgrad_preference(_Fake(32 * 128, 7168), _Fake(32 * 128, 4096), g32) == "triton"
    assert _wgrad_preference(_Fake(8 * 512, 7168), _Fake(8 * 512, 4096), g8, True) == "triton"
    # ~1024 rows per group: every backend within a few percent, torch's (maintained upstream) stays
    assert _wgrad_preference(_Fake(8 * 1024, 7168), _Fake(8 * 1024, 4096), g8, True) is None
    assert _wgrad_preference(_Fake(8 * 128, 2048), _Fake(8 * 128, 7168), g8) is None  # 30 GFLOP: host-bound
    assert _wgrad_preference(_Fake(32 * 128, 7168, cuda=False), _Fake(32 * 128, 4096, cuda=False), g32) is None
    assert _wgrad_preference(_Fake(0, 7168), _Fake(0, 4096), _Fake(0, cuda=False)) is None  # no groups
    monkeypatch.setattr(kgw, "wgrad_tma_ok", lambda x, y: False)  # fp32, strided or pre-Hopper: torch's
    assert _wgrad_preference(_Fake(32 * 128, 7168), _Fake(32 * 128, 4096), g32) is None
    # on SM90 with turbo_dist._fp8_wgmma built: our Hopper kernel (stmatrix epilogue) up to 1024 rows per group,
    # also where the Triton kernel does not run, above the launch-bound floor
    monkeypatch.setattr(grouped_wgmma, "WGRAD_PREFERRED", True)
    monkeypatch.setattr(grouped_wgmma, "_wgmma_wgrad_can", lambda *args: True)
    assert _wgrad_preference(_Fake(32 * 128, 7168), _Fake(32 * 128, 4096), g32) == "wgmma"
    assert _wgrad_preference(_Fake(8 * 1024, 7168), _Fake(8 * 1024, 4096), g8, True) == "wgmma"
    assert _wgrad_preference(_Fake(8 * 2048, 7168), _Fake(8 * 2048, 4096), g8) is None  # past 1024: torch's
    assert _wgrad_preference(_Fake(8 * 128, 2048), _Fake(8 * 128, 7168), g8) is None  # 30 GFLOP: host-bound
    monkeypatch.setattr(grouped_wgmma, "_wgmma_wgrad_can", lambda *args: "wgmma runs on SM90 (Hopper) only")
    assert _wgrad_preference(_Fake(32 * 128, 7168), _Fake(32 * 128, 4096), g32) is None  # tma_ok False above


def test_choice_cache_follows_signature_and_settings(monkeypatch):
    """The remembered automatic choice: one can_handle pass per input signature; a different stride, scalar
    or setting is judged again; setters and preference changes clear it."""
    name = "test_op_cache"
    calls = []

    def row_major_only(x, flag=False):
        calls.append(tuple(x.stride()))
        return True if x.stride(-1) == 1 else "needs a unit last stride"

    dispatcher.register_backend(name, "fast", lambda x, flag=False: "fast", row_major_only, priority=10)
    dispatcher.register_backend(name, "any", lambda x, flag=False: "any", priority=20)
    monkeypatch.delenv("TURBO_DIST_TEST_OP_CACHE_BACKEND", raising=False)
    monkeypatch.delenv("TURBO_DIST_AUTOTUNE", raising=False)
    try:
        x = torch.zeros(4, 6)
        assert dispatcher.dispatch(name, x) == "fast" and len(calls) == 1
        assert dispatcher.dispatch(name, torch.ones(4, 6)) == "fast" and len(calls) == 1  # same signature: cached
        assert dispatcher.dispatch(name, x.t()) == "any" and len(calls) == 2             # other strides: judged
        assert dispatcher.dispatch(name, x.t()) == "any" and len(calls) == 2
        assert dispatcher.dispatch(name, x, flag=True) == "fast" and len(calls) == 3     # other scalar: judged
        dispatcher.set_preference(name, lambda x, flag=False: "any")                     # clears the cache
        assert dispatcher.dispatch(name, x) == "any" and len(calls) == 4
        dispatcher.set_backend(name, "fast")
        with pytest.raises(ValueError, match="unit last stride"):                        # explicit: never cached
            dispatcher.dispatch(name, x.t())
        dispatcher.set_backend(name, None)
        dispatcher.set_preference(name, None)
        n = len(calls)
        assert dispatcher.dispatch(name, x) == "fast" and len(calls) == n + 1
        dispatcher.clear_cache()
        assert dispatcher.dispatch(name, x) == "fast" and len(calls) == n + 2
    finally:
        dispatcher.set_backend(name, None)
        dispatcher.set_preference(name, None)


def test_choice_key_adds_values_the_predicates_read(monkeypatch):
    """A predicate that reads tensor values (here: host group sizes) would be fooled by the shape-keyed cache;
    set_choice_key adds those values to the key, and a key that cannot be computed disables caching."""
    name = "test_op_choice_key"
    calls = []

    def even_only(x, lens):
        calls.append(1)
        return True if bool((lens % 2 == 0).all()) else "odd group"

    dispatcher.register_backend(name, "even", lambda x, lens: "even", even_only, priority=10)
    dispatcher.register_backend(name, "any", lambda x, lens: "any", priority=20)
    monkeypatch.delenv("TURBO_DIST_TEST_OP_CHOICE_KEY_BACKEND", raising=False)
    monkeypatch.delenv("TURBO_DIST_AUTOTUNE", raising=False)
    x = torch.zeros(4)
    try:
        dispatcher.set_choice_key(name, None)
        assert dispatcher.dispatch(name, x, torch.tensor([2, 2])) == "even"
        assert dispatcher.dispatch(name, x, torch.tensor([1, 3])) == "even"  # the trap: same shapes, cached
        dispatcher.set_choice_key(name, lambda x, lens: bool((lens % 2 == 0).all()))
        assert dispatcher.dispatch(name, x, torch.tensor([1, 3])) == "any"
        n = len(calls)
        assert dispatcher.dispatch(name, x, torch.tensor([5, 7])) == "any" and len(calls) == n  # same key: cached
        assert dispatcher.dispatch(name, x, torch.tensor([4, 0])) == "even" and len(calls) == n + 1

        def broken(x, lens):
            raise RuntimeError("cannot describe")
        dispatcher.set_choice_key(name, broken)
        n = len(calls)
        assert dispatcher.dispatch(name, x, torch.tensor([2, 2])) == "even"
        assert dispatcher.dispatch(name, x, torch.tensor([2, 2])) == "even" and len(calls) == n + 2  # not cached
    finally:
        dispatcher.set_choice_key(name, None)


def test_env_backend_override_read_on_every_call(monkeypatch):
    """The dispatcher reads TURBO_DIST_<OP>_BACKEND through runtime.config.getenv (os.environ's own dict, the
    key encoded once): a variable set, changed or removed between calls takes effect on the next call,
    exactly as os.environ.get would see it; another mapping in place of os.environ falls back to .get."""
    from turbo_dist.runtime import config

    name = "test_op_env"
    dispatcher.register_backend(name, "a", lambda x: "a", priority=10)
    dispatcher.register_backend(name, "b", lambda x: "b", priority=20)
    var = "TURBO_DIST_TEST_OP_ENV_BACKEND"
    monkeypatch.delenv(var, raising=False)
    x = torch.zeros(2)
    assert dispatcher.dispatch(name, x) == "a" and config.getenv(var) is None and config.getenv(var, "d") == "d"
    monkeypatch.setenv(var, "b")
    assert dispatcher.dispatch(name, x) == "b" and dispatcher.asked_for(name, "b") and not dispatcher.asked_for(name, "a")
    monkeypatch.setenv(var, "nope")
    with pytest.raises(ValueError, match="TURBO_DIST_TEST_OP_ENV_BACKEND asks for backend 'nope'"):
        dispatcher.dispatch(name, x)
    monkeypatch.delenv(var)
    assert dispatcher.dispatch(name, x) == "a"
    monkeypatch.setenv("TURBO_DIST_TEST_ENV_UNICODE", "é-1")
    for key in ("TURBO_DIST_TEST_ENV_UNICODE", "PATH", "TURBO_DIST_NOT_SET_ANYWHERE"):
        assert config.getenv(key) == __import__("os").environ.get(key)
    monkeypatch.setattr(config.os, "environ", {var: "b"})  # a plain dict: no _data, read with .get
    assert config.getenv(var) == "b" and dispatcher.dispatch(name, x) == "b"


def test_autotune_order_and_cache(monkeypatch):
    """TURBO_DIST_AUTOTUNE=1: setter > env var > autotune (timed once per signature) > default order."""
    name = "test_op_autotune"
    runs = {"slow": 0, "fast": 0}

    def make(which, delay):
        def fn(x):
            runs[which] += 1
            time.sleep(delay)
            return which
        return fn

    dispatcher.register_backend(name, "slow", make("slow", 0.004), priority=10)  # first in the default order
    dispatcher.register_backend(name, "fast", make("fast", 0.0), priority=20)
    dispatcher.set_signature(name, lambda x: x.shape[1])  # rows do not matter, like tokens per step
    monkeypatch.delenv("TURBO_DIST_TEST_OP_AUTOTUNE_BACKEND", raising=False)
    try:
        monkeypatch.delenv("TURBO_DIST_AUTOTUNE", raising=False)
        assert dispatcher.dispatch(name, torch.zeros(2, 3)) == "slow"  # default order
        monkeypatch.setenv("TURBO_DIST_AUTOTUNE", "1")
        assert dispatcher.dispatch(name, torch.zeros(2, 3)) == "fast"  # timed: the faster one
        tuned = dict(runs)
        assert dispatcher.dispatch(name, torch.zeros(5, 3)) == "fast"  # other rows, same signature: no new timing
        assert runs == {"slow": tuned["slow"], "fast": tuned["fast"] + 1}
        monkeypatch.setenv("TURBO_DIST_TEST_OP_AUTOTUNE_BACKEND", "slow")
        assert dispatcher.dispatch(name, torch.zeros(2, 3)) == "slow"  # env var beats autotune
        dispatcher.set_backend(name, "fast")
        assert dispatcher.dispatch(name, torch.zeros(2, 3)) == "fast"  # setter beats env var
    finally:
        dispatcher.set_backend(name, None)
        dispatcher.set_signature(name, None)


def test_grouped_autotune_signatures_ignore_token_count():
    """Token counts change every step: the grouped ops autotune per expert shapes, or they would re-time every
    backend on every step (and grow the cache without bound)."""
    from turbo_dist.ops import fp8_grouped, grouped_gemm as gg  # noqa: F401  (registers the ops)

    lens_a, lens_b = torch.tensor([3, 5]), torch.tensor([10, 20])
    sig = dispatcher._op("grouped_gemm_wgrad").signature
    assert sig(torch.zeros(8, 4), torch.zeros(8, 6), lens_a, False) == \
        sig(torch.zeros(30, 4), torch.zeros(30, 6), lens_b, False)
    assert sig(torch.zeros(8, 4), torch.zeros(8, 6), lens_a) != sig(torch.zeros(8, 4), torch.zeros(8, 7), lens_a)
    sig = dispatcher._op("grouped_scaled_mm").signature
    b = torch.zeros(2, 6, 4)
    assert sig(torch.zeros(8, 4), b, None, None, lens_a, "row", torch.bfloat16) == \
        sig(torch.zeros(30, 4), b, None, None, lens_b, "row", torch.bfloat16)
    assert sig(torch.zeros(8, 4), b, None, None, lens_a, "row", torch.bfloat16) != \
        sig(torch.zeros(8, 4), b, None, None, lens_a, "row", torch.float32)
    assert dispatcher._default_signature((torch.bfloat16,), {}) != dispatcher._default_signature((torch.float32,), {})


def test_backend_variable_naming_no_op_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(dispatcher, "_ENV_CHECKED", [])
    monkeypatch.setenv("TURBO_DIST_ATTENTION_BACKEND", "triton")  # the ops are ATTENTION_FWD / ATTENTION_BWD
    with caplog.at_level("WARNING", logger="turbo_dist"):
        dispatcher.choose("gemm", torch.zeros(2, 2), torch.zeros(2, 2))
    assert "TURBO_DIST_ATTENTION_BACKEND names no op" in caplog.text and "TURBO_DIST_ATTENTION_FWD_BACKEND" in caplog.text


def test_choice_made_during_graph_capture_is_not_cached(monkeypatch):
    """Predicates decline some backends only while a CUDA graph is captured (a probe that cannot run then): that
    choice must not stick to the signature after the capture."""
    name = "test_op_capture"
    capturing = [True]
    dispatcher.register_backend(name, "eager_only", lambda x: "eager_only",
                                lambda x: True if not capturing[0] else "not during capture", priority=10)
    dispatcher.register_backend(name, "any", lambda x: "any", priority=20)
    monkeypatch.setattr(dispatcher, "_capturing", lambda: capturing[0])
    monkeypatch.delenv("TURBO_DIST_AUTOTUNE", raising=False)
    monkeypatch.delenv("TURBO_DIST_TEST_OP_CAPTURE_BACKEND", raising=False)
    x = torch.zeros(3)
    assert dispatcher.dispatch(name, x) == "any"
    capturing[0] = False
    assert dispatcher.dispatch(name, x) == "eager_only"  # judged again, then cached
    assert dispatcher.dispatch(name, x) == "eager_only"
