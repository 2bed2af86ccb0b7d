"""health/imds.py against the loopback IMDSv2 server (tests/health/imds_server.py)."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

import pytest

from health.exit_codes import ExitCode
from health.flags import StopFlags
from health.imds import SPOT_ACTION_PATH, TOKEN_PATH, ImdsClient, PreemptionWatcher, parse_notice_time
from tests.health.imds_server import ImdsServer
from tests.netutil import free_port

NOPROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def srv():
    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as s:
        yield s


def test_server_speaks_imdsv2(srv):
    with pytest.raises(urllib.error.HTTPError) as e:  # no token
        NOPROXY.open(srv.endpoint + SPOT_ACTION_PATH, timeout=2)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:  # bad token
        NOPROXY.open(urllib.request.Request(srv.endpoint + SPOT_ACTION_PATH,
                                            headers={"X-aws-ec2-metadata-token": "nope"}), timeout=2)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:  # token request without a TTL
        NOPROXY.open(urllib.request.Request(srv.endpoint + TOKEN_PATH, method="PUT"), timeout=2)
    assert e.value.code == 400


def test_client_metadata_and_notice(srv):
    c = ImdsClient(srv.endpoint)
    assert c.available()
    assert c.instance_type() == "p5.48xlarge"
    assert c.instance_life_cycle() == "spot"
    assert c.spot_instance_action() is None
    assert c.rebalance_recommendation() is None
    armed = srv.arm_spot_notice(in_s=120)
    got = c.spot_instance_action()
    assert got == armed and got["action"] == "terminate" and got["time"].endswith("Z")
    assert abs(parse_notice_time(got["time"]) - (time.time() + 120)) < 5
    assert srv.count(TOKEN_PATH) == 1  # one token, reused


def test_client_refreshes_a_revoked_token(srv):
    c = ImdsClient(srv.endpoint)
    assert c.instance_type() == "p5.48xlarge"
    srv.revoke_tokens()
    assert c.instance_type() == "p5.48xlarge"
    assert srv.count(TOKEN_PATH) == 2


def test_off_ec2_is_quiet_and_fast():
    c = ImdsClient(f"http://127.0.0.1:{free_port()}", timeout_s=0.5)
    t0 = time.monotonic()
    assert not c.available()
    assert c.spot_instance_action() is None and c.instance_type() is None
    assert time.monotonic() - t0 < 1.0
    assert "no IMDSv2" in c.disabled_reason
    w = PreemptionWatcher(StopFlags(), client=c)
    assert w.start() is False


def test_disabled_by_environment(monkeypatch, srv):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    c = ImdsClient(srv.endpoint)
    assert not c.available() and srv.count(TOKEN_PATH) == 0


def test_watcher_flags_spot_notice(srv):
    flags = StopFlags()
    w = PreemptionWatcher(flags, srv.endpoint, interval_s=0.05, max_polls=200)
    assert w.start()
    try:
        time.sleep(0.2)
        assert flags.pending() is None
        armed = srv.arm_spot_notice(in_s=90)
        deadline = time.monotonic() + 5
        while flags.pending() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.stop()
    req = flags.pending()
    assert req is not None and req.code == ExitCode.PREEMPTED
    assert req.reason == f"spot interruption notice: terminate at {armed['time']}"
    assert w.deadline == parse_notice_time(armed["time"])
    assert len(flags.all()) == 1  # requested once, then the watcher stops


def test_rebalance_warns_only_unless_configured(srv, caplog):
    srv.arm_rebalance()
    flags = StopFlags()
    w = PreemptionWatcher(flags, srv.endpoint)
    with caplog.at_level(logging.WARNING, logger="moeforge.health"):
        w.poll_once()
    assert flags.pending() is None
    assert "rebalance recommendation" in caplog.text
    flags2 = StopFlags()
    PreemptionWatcher(flags2, srv.endpoint, act_on_rebalance=True).poll_once()
    assert flags2.pending().code == ExitCode.PREEMPTED


def test_watcher_survives_a_server_that_goes_away():
    s = ImdsServer().start()
    flags = StopFlags()
    w = PreemptionWatcher(flags, s.endpoint, timeout_s=0.3)
    assert w.client.available()
    s.stop()
    w.poll_once()  # connection refused: counted, not raised, no flag
    assert w.errors == 1 and flags.pending() is None


def test_standalone_server_for_shell_tests():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, str(repo / "tests/health/imds_server.py"), "--arm-after", "0.3",
                          "--notice-in", "60", "--max-s", "20"], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        line = p.stdout.readline().strip()
        assert line.startswith("endpoint=http://127.0.0.1:")
        c = ImdsClient(line.split("=", 1)[1])
        assert c.instance_life_cycle() == "spot"
        assert p.stdout.readline().strip() == "armed"
        assert c.spot_instance_action()["action"] == "terminate"
    finally:
        p.terminate()
        p.wait(5)
