"""The price comes from what IMDS says the machine is (loopback IMDSv2 server), unless overridden."""

from __future__ import annotations

import json

from health.imds import ImdsClient
from tests.health.imds_server import ImdsServer
from tests.train.runner import FAST, run_train
from cost.config import ClusterConfig, CostConfig
from cost.pricing import catalog_entry, resolve_cluster


def test_catalog_entries_load():
    p5 = catalog_entry("p5.48xlarge")
    assert p5.accelerators_per_node == 8 and p5.price_on_demand_per_hour > p5.price_spot_per_hour > 0
    assert catalog_entry("x9.nonexistent") is None


def test_local_cluster_takes_type_and_lifecycle_from_imds():
    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as srv:
        imds = ImdsClient(srv.endpoint, timeout_s=1.0)
        c = resolve_cluster(ClusterConfig(nodes=2), CostConfig(), imds)
    assert (c.instance_type, c.lifecycle, c.nodes) == ("p5.48xlarge", "spot", 2)
    assert c.price_spot_per_hour == catalog_entry("p5.48xlarge").price_spot_per_hour


def test_chosen_cluster_keeps_its_prices_but_takes_the_lifecycle():
    chosen = catalog_entry("p4d.24xlarge")
    with ImdsServer(instance_type="p4d.24xlarge", life_cycle="on-demand") as srv:
        c = resolve_cluster(chosen, CostConfig(), ImdsClient(srv.endpoint, timeout_s=1.0))
    assert c.name == "p4d.24xlarge" and c.lifecycle == "on_demand"


def test_override_wins_and_nothing_is_asked():
    class Boom:
        def available(self):
            raise AssertionError("IMDS asked despite cost.price_per_hour")

    c = resolve_cluster(ClusterConfig(), CostConfig(price_per_hour=5.0), Boom())
    assert c.name == "local"


def test_a_run_on_a_spot_p5_is_billed_at_the_spot_price(tmp_path):
    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as srv:
        run_train(*FAST, "trainer.max_steps=3", f"health.imds_endpoint={srv.endpoint}", f"output_dir={tmp_path}",
                  "run_name=p")
    hb = json.loads((tmp_path / "p" / "heartbeat.json").read_text())
    assert hb["cost"]["usd_per_hour"] == catalog_entry("p5.48xlarge").price_spot_per_hour
    assert hb["cost"]["spent_usd"] > 0
