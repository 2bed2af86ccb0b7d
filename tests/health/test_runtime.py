"""health/runtime.py: the facade the trainer wires in, end to end on CPU (single process)."""

from __future__ import annotations

import signal
import os
import time

import torch

from health.config import HealthConfig
from health.exit_record import resolve_exit_code
from health.nvml import FakeProbe
from health.runtime import HealthRuntime
from tests.health.imds_server import ImdsServer


def Cfg(endpoint: str) -> HealthConfig:
    return HealthConfig(imds_endpoint=endpoint, imds_interval_s=0.05, imds_timeout_s=0.5, nvml_interval_s=0.05,
                        hang_timeout_s=30.0, straggler_every=0, preflight="quick")


def _wait_for(hr, step, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stop = hr.at_boundary(step)
        if stop is not None:
            return stop
        time.sleep(0.02)
    return None


def test_spot_notice_then_ecc_then_exit_record(tmp_path):
    with ImdsServer() as srv:
        probe = FakeProbe(2)
        hr = HealthRuntime(Cfg(srv.endpoint), run_dir=str(tmp_path), probe=probe, host="node-a").start()
        try:
            assert hr.imds is not None and hr.monitor is not None and hr.watchdog is not None
            hr.step_done(1, 0.1)
            assert hr.at_boundary(1) is None
            srv.arm_spot_notice(in_s=100)
            stop = _wait_for(hr, 2)
            assert stop.code == 75 and "spot interruption notice" in stop.reason
            assert 90 < hr.seconds_to_deadline() <= 101
            probe.set(1, remapped_rows_pending=True)
            deadline = time.monotonic() + 5
            while hr.at_boundary(3).code != 76 and time.monotonic() < deadline:
                time.sleep(0.02)
            stop = hr.at_boundary(3)
            assert stop.code == 76 and "GPU 1 on node-a" in stop.reason
            assert hr.exit(stop.code, stop.reason) == 76
        finally:
            hr.shutdown()
    assert resolve_exit_code(str(tmp_path), 1)[0] == 76


def test_signal_and_preflight_off_ec2(tmp_path):
    cfg = Cfg("http://127.0.0.1:9")  # nothing listens: the watcher stays off, quickly
    before = signal.getsignal(signal.SIGTERM)
    hr = HealthRuntime(cfg, run_dir=str(tmp_path), probe=FakeProbe(1))
    t0 = time.monotonic()
    hr.start()
    try:
        assert time.monotonic() - t0 < 2 and hr.imds is None
        rep = hr.preflight()
        assert rep.healthy
        os.kill(os.getpid(), signal.SIGTERM)
        stop = _wait_for(hr, 1)
        assert stop.code == 75 and "SIGTERM" in stop.reason
        model = torch.nn.Linear(2, 2)
        assert hr.state_ok(model)
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
        assert not hr.state_ok(model)
    finally:
        hr.shutdown()
    assert signal.getsignal(signal.SIGTERM) == before
