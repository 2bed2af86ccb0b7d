"""health/straggler.py with synthetic step times (the gloo test is in test_dist_health.py)."""

from __future__ import annotations

import pytest

from health.straggler import StragglerDetector, straggler_scores


def window(slow_rank=None, factor=1.5, ranks=4, n=8):
    return [[1.0 * (factor if r == slow_rank else 1.0) + 0.01 * i for i in range(n)] for r in range(ranks)]


def test_scores():
    s = straggler_scores(window(slow_rank=2, factor=1.5))
    assert s[2] == pytest.approx(1.5, rel=0.02) and all(x == pytest.approx(1.0, rel=0.01) for i, x in enumerate(s) if i != 2)
    assert straggler_scores([[], [1.0]]) [1] == 1.0


def test_names_only_a_consistent_straggler():
    d = StragglerDetector(threshold=1.2, k=3, m=5, hosts=["a", "b", "c", "d"])
    assert d.update(window(slow_rank=1)) is None  # one slow window: a GC pause, a save
    assert d.update(window()) is None
    assert d.update(window(slow_rank=1)) is None
    s = d.update(window(slow_rank=1))  # 3 of the last 4
    assert s is not None and (s.rank, s.host, s.windows_slow) == (1, "b", 3)
    assert "rank 1 on b" in s.message()


def test_transient_slowness_ages_out():
    d = StragglerDetector(threshold=1.2, k=2, m=3)
    d.update(window(slow_rank=0))
    for _ in range(3):
        assert d.update(window()) is None


def test_slowest_of_two_and_threshold():
    d = StragglerDetector(threshold=1.2, k=1, m=1)
    w = window(slow_rank=0, factor=1.3)
    w[3] = [t * 2 for t in w[3]]
    assert d.update(w).rank == 3
    assert StragglerDetector(threshold=1.2, k=1, m=1).update(window(slow_rank=2, factor=1.1)) is None
    with pytest.raises(ValueError):
        StragglerDetector(k=4, m=3)


def test_own_times_remove_the_wait_for_the_last_rank():
    from health.runtime import own_times

    # Both ranks' wall-clock steps are 0.35 s; rank 1 arrived 0.3 s late, rank 0 waited for it.
    steps = [[0.35, 0.35, 0.36], [0.35, 0.35, 0.36]]
    leads = [[0.001, 0.002, 0.001], [0.301, 0.302, 0.301]]
    own = own_times(steps, leads)
    assert own[1] == steps[1]
    assert all(abs(o - 0.05) < 0.011 for o in own[0])
    det = StragglerDetector(1.2, 1, 1)
    assert det.update(own).rank == 1
