"""A counter delta that changes every poll (seen on H200 NVLink counters) warns once per window."""

import logging

from health.flags import StopFlags
from health.monitor import HealthMonitor
from health.nvml import FakeProbe
from health.policy import WARN, Finding


def test_changing_counter_warns_once_per_window(caplog):
    mon = HealthMonitor(FakeProbe(), StopFlags(), interval_s=30.0)
    with caplog.at_level(logging.WARNING):
        for delta in (167, 179, 183, 162):
            mon._act([Finding(0, "h", "warning", "nvlink_error_delta", delta, WARN)])
        mon._act([Finding(1, "h", "warning", "nvlink_error_delta", 150, WARN)])
    lines = [r for r in caplog.records if "nvlink_error_delta" in r.getMessage()]
    assert len(lines) == 2  # GPU 0 once, GPU 1 once


def test_poll_overhead_is_reported_for_the_metric_line():
    from health.runtime import HealthRuntime

    mon = HealthMonitor(FakeProbe(), StopFlags(), interval_s=30.0)
    mon.poll_once()
    hr = HealthRuntime(None)
    hr.monitor = mon
    m = hr.metrics()
    assert m["health/nvml_poll_s"] >= 0 and m["health/nvml_overhead"] == m["health/nvml_poll_s"] / 30.0
