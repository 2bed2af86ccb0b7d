"""checkpoint.if_busy and the emergency-save estimate, as pure functions."""

from checkpointing.schedule import COMMIT_SLACK_S, BusySaves, deadline_message, emergency_estimate_s


def test_skip_counts_and_warns_once_with_both_figures():
    b = BusySaves("skip")
    first = b.on_busy(200, 100, 100, 21.3, 0.201)
    assert "checkpoint due at step 200" in first and "writing for 21.3 s" in first
    assert "checkpoint.every_steps=100 = 20.1 s" in first and "checkpoint.if_busy=skip" in first
    assert b.on_busy(300, 100, 200, 25.0, 0.2) is None  # said once
    assert b.skipped == 2 and not b.deferred


def test_defer_owes_a_save():
    b = BusySaves("defer")
    msg = b.on_busy(6, 3, 3, 1.0, None)
    assert "deferred to the first step after it commits" in msg and "every_steps=3)" in msg
    assert b.deferred and b.skipped == 0


def test_emergency_estimate_adds_the_phases():
    gb = 23.6e9
    est = emergency_estimate_s(int(gb), 1.3, poll_s=5.0, step_s=0.2)
    assert abs(est - (5.0 + 0.2 + 23.6 / 1000 + 23.6 / 1.3 + COMMIT_SLACK_S)) < 1e-9
    assert est < 30


def test_deadline_message_says_whether_it_fits():
    ok = deadline_message(int(23.6e9), 1.3, "measured", 25.6, 110)
    assert "fits health.preemption_deadline_s=110" in ok and "NOT" not in ok
    bad = deadline_message(int(23.6e9), 0.1, "checkpoint.write_bandwidth_gbps", 243.0, 110)
    assert "does NOT fit" in bad and "checkpoint.write_threads" in bad and "0.10 GB/s" in bad
