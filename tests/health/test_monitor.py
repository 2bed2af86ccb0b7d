"""health/monitor.py with the FakeProbe test double (the GPU test checks FakeProbe against NVML)."""

from __future__ import annotations

import dataclasses
import logging
import time

from health.exit_codes import ExitCode
from health.flags import StopFlags
from health.monitor import HealthMonitor
from health.nvml import CLOCK_EVENT_BITS, FakeProbe, GpuProbe, GpuReading


def test_fake_probe_satisfies_the_interface():
    p = FakeProbe(4)
    assert isinstance(p, GpuProbe) and p.device_count() == 4
    r = p.read(2)
    assert isinstance(r, GpuReading) and r.index == 2
    assert {f.name for f in dataclasses.fields(r)} >= {
        "index", "ecc_volatile_uncorrected", "remapped_rows_pending", "remapped_rows_failed",
        "retired_pages_pending", "clock_event_reasons", "temperature_c", "power_w", "pcie_replay_counter",
        "nvlink_errors"}
    p.inject_xid(1, 79)
    assert p.xid_events(100) == [(1, 79)] and p.xid_events(0) == []


def test_healthy_node_no_flags_and_poll_cost_measured():
    probe, flags = FakeProbe(8), StopFlags()
    m = HealthMonitor(probe, flags, host="node-a")
    assert m.poll_once() == [] and flags.pending() is None
    assert m.last_poll_s is not None and 0 < m.last_poll_s < 0.5
    assert probe.reads == 8


def test_ecc_error_requests_76_naming_gpu_and_host(caplog):
    probe, flags = FakeProbe(8), StopFlags()
    m = HealthMonitor(probe, flags, host="node-a")
    m.poll_once()
    probe.set(5, ecc_volatile_uncorrected=3)
    with caplog.at_level(logging.WARNING, logger="moeforge.health"):
        found = m.poll_once()
        m.poll_once()  # the same finding again is not logged again
    assert [f.what for f in found] == ["ecc_volatile_uncorrected"]
    req = flags.pending()
    assert req.code == ExitCode.UNHEALTHY
    assert "GPU 5 on node-a" in req.reason and "ecc_volatile_uncorrected=3" in req.reason
    assert caplog.text.count("ecc_volatile_uncorrected=3") == 1
    assert len(flags.all()) == 1


def test_fatal_xid_requests_76_app_xid_only_warns():
    probe, flags = FakeProbe(2), StopFlags()
    m = HealthMonitor(probe, flags, host="h")
    probe.inject_xid(0, 13)
    m.poll_once()
    assert flags.pending() is None and m.findings[-1].what == "xid_13"
    probe.inject_xid(1, 79)
    m.poll_once()
    assert flags.pending().code == ExitCode.UNHEALTHY and "xid_79" in flags.pending().reason


def test_thermal_slowdown_is_a_warning_only(caplog):
    probe, flags = FakeProbe(2), StopFlags()
    probe.set(1, clock_event_mask=CLOCK_EVENT_BITS["hw_thermal_slowdown"], temperature_c=92.0)
    with caplog.at_level(logging.WARNING, logger="moeforge.health"):
        HealthMonitor(probe, flags, host="h").poll_once()
    assert flags.pending() is None
    assert "GPU 1 on h: hw_thermal_slowdown=0x40" in caplog.text and "temperature_c=92.0" in caplog.text


def test_thread_sees_a_late_fault_and_stops_cleanly():
    probe, flags = FakeProbe(4), StopFlags()
    m = HealthMonitor(probe, flags, interval_s=0.05, host="h").start()
    try:
        time.sleep(0.15)
        assert flags.pending() is None and m.polls >= 1
        probe.inject_xid(2, 48)
        deadline = time.monotonic() + 3
        while flags.pending() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flags.pending().code == ExitCode.UNHEALTHY
    finally:
        m.stop()
    assert not m._thread.is_alive()


def test_probe_errors_never_kill_the_thread(caplog):
    class Broken(FakeProbe):
        def read(self, i):
            raise RuntimeError("NVML went away")

    flags = StopFlags()
    with caplog.at_level(logging.WARNING, logger="moeforge.health"):
        m = HealthMonitor(Broken(1), flags, interval_s=0.01, host="h", max_polls=None).start()
        time.sleep(0.1)
        m.stop()
    assert "GPU poll failed: RuntimeError: NVML went away" in caplog.text and flags.pending() is None
