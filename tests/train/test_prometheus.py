"""The Prometheus sink (train/prometheus.py): /metrics scraped over HTTP during a real CPU run holds
the values of the JSONL row of the same step."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest

from tests.netutil import free_port
from tests.train.runner import FAST, REPO, env, last_per_step, read_jsonl, train_cmd
from train.prometheus import GAUGES, PrometheusSink, snapshot


def _scrape(port: int) -> dict:
    """{(name, labels tuple): value} from one scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_snapshot_maps_the_row():
    row = {"loss": 2.5, "tok_s": 100.0, "mfu": None, "spent_usd": 0.5, "goodput/ettr": 0.9, "attempt": 2,
           "moe/L1/imbalance": 1.5, "moe/L2/imbalance": 1.25, "moe/L1/dropped": 3, "health/flag/unhealthy": 0,
           "checkpoint/last_commit_age_s": 4.0, "ckpt/stall_s": 0.1, "grad_norm": 1.0}
    snap = snapshot(7, row)
    assert snap["moeforge_step"] == [({}, 7.0)] and snap["moeforge_loss"] == [({}, 2.5)]
    assert "moeforge_mfu" not in snap  # unknown (CPU): absent, never a fake 0
    assert sorted(snap["moeforge_moe_imbalance"], key=lambda r: r[0]["layer"]) == [({"layer": "1"}, 1.5), ({"layer": "2"}, 1.25)]
    assert snap["moeforge_health_flag"] == [({"kind": "unhealthy"}, 0.0)]
    assert snap["moeforge_attempts"] == [({}, 2.0)]
    assert not any("step" in labels for rows in snap.values() for labels, _ in rows)


def test_sink_serves_one_whole_snapshot_and_refuses_8080():
    sink = PrometheusSink(free_port(), "127.0.0.1", "r1")
    try:
        sink.log(3, {"loss": 1.0, "moe/L1/imbalance": 2.0, "attempt": 1})
        got = _scrape(sink.port)
        assert got[("moeforge_step", (("run", "r1"),))] == 3
        assert got[("moeforge_moe_imbalance", (("layer", "1"), ("run", "r1")))] == 2.0
        assert got[("moeforge_attempts_total", (("run", "r1"),))] == 1
    finally:
        sink.close()
    with pytest.raises(ValueError, match="8080"):
        PrometheusSink(8080, "127.0.0.1", "r1")


def test_stall_gauge_holds_the_last_saves_figure_between_saves():
    sink = PrometheusSink(free_port(), "127.0.0.1", "r1")
    run = (("run", "r1"),)
    try:
        sink.log(1, {"loss": 2.0})
        assert ("moeforge_checkpoint_stall_seconds", run) not in _scrape(sink.port)  # no save yet
        sink.log(2, {"loss": 1.5, "ckpt/stall_s": 0.25, "mfu": 0.4})
        sink.log(3, {"loss": 1.0})  # no save since the last row: the row has no stall, the gauge keeps 0.25
        got = _scrape(sink.port)
        assert got[("moeforge_checkpoint_stall_seconds", run)] == 0.25
        assert got[("moeforge_step", run)] == 3 and ("moeforge_mfu", run) not in got  # only the stall is held
        sink.log(4, {"loss": 0.9, "ckpt/stall_s": 0.5})
        assert _scrape(sink.port)[("moeforge_checkpoint_stall_seconds", run)] == 0.5
    finally:
        sink.close()


@pytest.mark.slow
def test_metrics_endpoint_matches_the_jsonl_during_a_run(tmp_path):
    port = free_port()
    overrides = [*FAST, "trainer.max_steps=10", "checkpoint.every_steps=3", "cost.price_per_hour=36",
                 "health.fault_inject_slow_s=0.4", f"logging.prometheus.port={port}",
                 "logging.prometheus.addr=127.0.0.1", f"output_dir={tmp_path}", "run_name=prom"]
    proc = subprocess.Popen(train_cmd(*overrides), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    scrapes = []
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                scrapes.append(_scrape(port))
            except OSError:
                pass  # not listening yet (start-up) or already closed (exit)
            time.sleep(0.15)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    rows = last_per_step(read_jsonl(tmp_path / "prom" / "metrics.jsonl"))
    run = (("run", "prom"),)
    seen = {}
    for s in scrapes:
        step = s.get(("moeforge_step", run))
        if step is not None:
            seen[int(step)] = s
    assert len(seen) >= 3 and max(seen) >= 7, sorted(seen)  # scraped while it trained
    compared = 0
    stall = "moeforge_checkpoint_stall_seconds"
    for step, s in seen.items():
        row = rows[step]
        # the stall gauge holds the last save's figure: the newest row up to this step that had one
        held = [rows[k]["ckpt/stall_s"] for k in sorted(rows) if k <= step and rows[k].get("ckpt/stall_s") is not None]
        if held:
            assert s[(stall, run)] == pytest.approx(held[-1], rel=1e-9, abs=1e-12), (step, stall)
        else:
            assert (stall, run) not in s, step
        for name, (key, _) in GAUGES.items():
            if name == stall:
                continue
            if row.get(key) is None:
                assert (name, run) not in s, name
                continue
            assert s[(name, run)] == pytest.approx(row[key], rel=1e-9, abs=1e-12), (step, name)
            compared += 1
        layers = {k.split("/")[1][1:]: v for k, v in row.items() if k.startswith("moe/L") and k.endswith("/imbalance")}
        assert layers
        for layer, v in layers.items():
            assert s[("moeforge_moe_imbalance", (("layer", layer), ("run", "prom")))] == pytest.approx(v, rel=1e-9)
        for kind in ("preempted", "unhealthy", "budget", "nonfinite"):
            assert s[("moeforge_health_flag", (("kind", kind), ("run", "prom")))] == row[f"health/flag/{kind}"]
        assert s[("moeforge_attempts_total", run)] == row["attempt"] == 1
    late = seen[max(seen)]
    assert late[("moeforge_spent_usd", run)] > 0 and ("moeforge_checkpoint_last_commit_age_seconds", run) in late
    assert (stall, run) in late and compared > 20
