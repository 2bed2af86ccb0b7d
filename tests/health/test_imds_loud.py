"""IMDS failures are loud (issue 18, point 4), against the loopback IMDSv2 server: a flaky first probe
is retried and still prices the run; an unreachable IMDS on a node that should have one warns once
with the consequence and the keys to set; a failed poll is a WARNING; an unreachable endpoint with
a budget set refuses to start (exit 2)."""

from __future__ import annotations

import json
import logging

from cost.config import ClusterConfig, CostConfig
from cost.pricing import catalog_entry, resolve_cluster
from health.flags import StopFlags
from health.imds import PROBE_ATTEMPTS, TOKEN_PATH, ImdsClient, PreemptionWatcher
from tests.health.imds_server import ImdsServer
from tests.netutil import free_port
from tests.train.runner import FAST, run_train


def test_flaky_first_probe_is_retried_and_prices_the_run():
    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as srv:
        srv.fail_next_tokens(PROBE_ATTEMPTS - 1)
        client = ImdsClient(srv.endpoint, timeout_s=1.0)
        cluster = resolve_cluster(ClusterConfig(), CostConfig(), client)
        assert srv.count(TOKEN_PATH, 503) == PROBE_ATTEMPTS - 1
    assert cluster.instance_type == "p5.48xlarge" and cluster.lifecycle == "spot"
    assert cluster.price_spot_per_hour == catalog_entry("p5.48xlarge").price_spot_per_hour > 0


def test_unreachable_imds_warns_once_with_the_keys(caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.INFO, logger="moeforge.health"):
        assert not ImdsClient(endpoint, timeout_s=0.3).available()
        assert not ImdsClient(endpoint, timeout_s=0.3).available()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "Spot notices and pricing are off" in w and "cost.price_per_hour" in w and "health.imds_endpoint" in w
    assert f"after {PROBE_ATTEMPTS} tries" in w


def test_a_failed_poll_is_a_warning(caplog):
    srv = ImdsServer().start()
    client = ImdsClient(srv.endpoint, timeout_s=0.5)
    assert client.available()
    srv.stop()  # IMDS goes away mid-run
    w = PreemptionWatcher(StopFlags(), client=client)
    with caplog.at_level(logging.WARNING, logger="moeforge.health"):
        w.poll_once()
    assert w.errors == 1
    assert any("spot-notice poll failed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_unreachable_imds_with_a_budget_refuses_to_start(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    p = run_train(*FAST, "trainer.max_steps=3", f"health.imds_endpoint={endpoint}", "cost.budget_usd=5",
                  f"output_dir={tmp_path}", "run_name=nb", check=False, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "cost.budget_usd=5 is set but the run is priced at $0/h" in out and "IMDS unreachable" in out, out[-3000:]
    assert not (tmp_path / "nb" / "metrics.jsonl").exists()


def test_flaky_imds_run_is_billed(tmp_path):
    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as srv:
        srv.fail_next_tokens(1)
        run_train(*FAST, "trainer.max_steps=2", f"health.imds_endpoint={srv.endpoint}", "cost.budget_usd=1000000",
                  f"output_dir={tmp_path}", "run_name=fl", "health.preflight=off")
    hb = json.loads((tmp_path / "fl" / "heartbeat.json").read_text())
    assert hb["cost"]["usd_per_hour"] == catalog_entry("p5.48xlarge").price_spot_per_hour
