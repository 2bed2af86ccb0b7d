"""docs/monitoring.md and the Grafana dashboard do not drift from train/prometheus.py and
moeforge/alerts.py."""

from __future__ import annotations

import json
import re

import yaml

from moeforge.alerts import EVENTS
from tests.train.runner import REPO
from train.prometheus import ATTEMPTS, GAUGES, HEALTH, IMBALANCE

DOC = (REPO / "docs" / "monitoring.md").read_text()
DASHBOARD = json.loads((REPO / "docs" / "grafana" / "moeforge-dashboard.json").read_text())
EXPORTED = set(GAUGES) | {IMBALANCE[0], HEALTH[0], ATTEMPTS[0] + "_total"}


def test_every_metric_is_documented_and_on_the_dashboard():
    exprs = " ".join(t["expr"] for p in DASHBOARD["panels"] for t in p["targets"])
    used = set(re.findall(r"moeforge_\w+", exprs))
    assert used == EXPORTED, (used ^ EXPORTED)
    documented = set(re.findall(r"^\| `(moeforge_\w+)`", DOC, re.M))
    assert documented == EXPORTED, (documented ^ EXPORTED)
    for name, (key, _) in GAUGES.items():
        assert f"| `{name}` | `run` | `{key}` |" in DOC, name


def test_alert_events_are_documented():
    documented = set(re.findall(r"^\| `(\w+)` \|", DOC.split("## Alerts", 1)[1], re.M))
    assert documented == set(EVENTS)


def test_scrape_snippets_parse_and_avoid_the_agent_port():
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC, re.S)]
    slurm, eks = blocks
    assert slurm["scrape_configs"][0]["static_configs"][0]["targets"][0].endswith(":9464")
    assert eks["kind"] == "PodMonitor" and eks["spec"]["podMetricsEndpoints"][0]["targetPort"] == 9464
    assert "8080" not in json.dumps(blocks)
