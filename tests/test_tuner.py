"""kernels/_tuner.pick: interleaved timing picks the truly fastest candidate under clock drift, skips candidates
that fail to compile, caches per key, and times nothing during CUDA graph capture. CPU: a fake timer."""
import pytest
from triton.runtime.errors import OutOfResources

from turbo_dist.kernels import _tuner


class DriftTimer:
    """Each timed sample of candidate i costs base[i] * (1 + drift * samples so far): a clock that slows down."""

    def __init__(self, base, drift):
        self.base, self.drift, self.samples = base, drift, 0

    def __call__(self, launch, reps):
        i = launch()
        self.samples += 1
        return self.base[i] * (1 + self.drift * self.samples)


def launches_for(n, fail=()):
    def make(i):
        def launch():
            if i in fail:
                raise OutOfResources(300000, 232448, "shared memory")
            return i
        return launch
    return [make(i) for i in range(n)]


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(_tuner, "_CACHE", {})


def test_pick_under_drift_prefers_the_true_best():
    # 5 candidates, the fastest last in the list; the clock slows 2% per sample: one-after-another timing
    # (all of candidate 0's samples, then 1's, ...) would crown candidate 0
    base = [1.00, 1.02, 1.03, 1.05, 0.95]
    n = 2 * _tuner.PAIRS
    sequential = [[base[i] * (1 + 0.02 * (i * n + r)) for r in range(n)] for i in range(5)]
    assert min(range(5), key=lambda i: sorted(sequential[i])[n // 2]) == 0
    assert _tuner.pick("k", launches_for(5), timer=DriftTimer(base, 0.02)) == 4


def test_pick_skips_failing_candidates_and_caches():
    timer = DriftTimer([1.0, 0.5, 0.8], 0.0)
    assert _tuner.pick("k2", launches_for(3, fail={1}), timer=timer) == 2
    n = timer.samples
    assert _tuner.pick("k2", launches_for(3, fail={1}), timer=timer) == 2 and timer.samples == n  # cached
    with pytest.raises(OutOfResources):
        _tuner.pick("k3", launches_for(2, fail={0, 1}), timer=timer)
    assert "k3" not in _tuner._CACHE


def test_pick_during_capture_is_untimed_and_uncached():
    timer = DriftTimer([1.0, 0.5], 0.0)
    assert _tuner.pick("k4", launches_for(2), timer=timer, capturing=True) == 0
    assert timer.samples == 0 and "k4" not in _tuner._CACHE
    assert _tuner.pick("k5", launches_for(1), timer=timer) == 0 and timer.samples == 0


class OrderTimer:
    """Records the order candidates are timed in; candidate 1 is the fastest."""

    def __init__(self):
        self.order = []

    def __call__(self, launch, reps):
        i = launch()
        self.order.append(i)
        return 1.0 if i != 1 else 0.5


def test_pick_orders_are_mirrored_pairs_of_varying_permutations():
    timer = OrderTimer()
    assert _tuner.pick("k6", launches_for(6), timer=timer) == 1
    n = 6
    timed = timer.order[n:]  # after one untimed-reps probe per candidate
    pairs = [timed[p * 2 * n:(p + 1) * 2 * n] for p in range(_tuner.PAIRS)]
    for pair in pairs:
        first, second = pair[:n], pair[n:]
        assert sorted(first) == list(range(n)) and second == first[::-1]  # drift cancels within a pair
    assert len({tuple(p[:n]) for p in pairs}) > 1  # no candidate always follows the same one
