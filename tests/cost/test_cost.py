"""cost/meter.py against hand-computed cases, and the cluster catalog loaded through Hydra."""

import json
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cost.config import ClusterConfig, CostConfig
from cost.meter import CostMeter, price_per_instance_hour, tokens_per_usd, usd_per_hour, usd_per_mtok

CLUSTER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cluster")
CATALOG = sorted(f[:-5] for f in os.listdir(CLUSTER_DIR) if f.endswith(".yaml"))


def test_rate_precedence():
    c = ClusterConfig(nodes=4, price_on_demand_per_hour=55.04, price_spot_per_hour=20.0)
    assert usd_per_hour(c, CostConfig()) == pytest.approx(4 * 55.04)
    c.lifecycle = "spot"
    assert usd_per_hour(c, CostConfig()) == pytest.approx(80.0)
    assert usd_per_hour(c, CostConfig(price_per_hour=30.0)) == pytest.approx(120.0)
    c.lifecycle = "reserved"
    with pytest.raises(ValueError, match="cluster.lifecycle"):
        price_per_instance_hour(c, CostConfig())


def test_meter_hand_computed():
    # 2 nodes x $36/h = $72/h = $0.02/s. 90 s -> $1.80. 3e6 tokens -> $0.60/Mtok.
    m = CostMeter(72.0, start_time=1000.0)
    assert m.elapsed_paid_s(now=1090.0) == pytest.approx(90.0)
    assert m.spent_usd(now=1090.0) == pytest.approx(1.80)
    assert m.usd_per_mtok(3_000_000, now=1090.0) == pytest.approx(0.60)
    assert m.tokens_per_usd(3_000_000, now=1090.0) == pytest.approx(3e6 / 1.8)
    assert m.projected_usd(3600 - 90, now=1090.0) == pytest.approx(72.0)
    assert m.metrics(3_000_000, now=1090.0) == {
        "spent_usd": pytest.approx(1.80), "usd_per_mtok": pytest.approx(0.60),
        "tok_per_usd": pytest.approx(3e6 / 1.8), "paid_s": pytest.approx(90.0), "attempt": 1,
    }


def test_undefined_ratios_are_none():
    assert usd_per_mtok(1.0, 0) is None
    assert tokens_per_usd(0.0, 1000) is None
    assert CostMeter(0.0, start_time=0.0).usd_per_mtok(1e6, now=10.0) == 0.0


def test_resume_continues_totals_at_old_rates():
    first = CostMeter(36.0, start_time=0.0)  # $0.01/s
    state = json.loads(json.dumps(first.state_dict(now=100.0)))  # JSON round trip, as meta.json
    assert state["paid_s"] == pytest.approx(100.0) and state["spent_usd"] == pytest.approx(1.0)
    # resumed on a pricier rate; no gap billed here (elastic capacity), see test_cost_attempts.py
    second = CostMeter(72.0, start_time=5000.0, max_gap_billed_s=0)
    second.load_state_dict(state)
    assert second.attempt == 2
    assert second.elapsed_paid_s(now=5050.0) == pytest.approx(150.0)
    assert second.spent_usd(now=5050.0) == pytest.approx(1.0 + 1.0)  # 50 s at $0.02/s
    third = CostMeter(72.0, start_time=0.0, max_gap_billed_s=0)
    third.load_state_dict(second.state_dict(now=5050.0))
    assert third.attempt == 3 and third.spent_usd(now=0.0) == pytest.approx(2.0)


def test_newer_state_version_is_refused():
    with pytest.raises(ValueError, match="newer"):
        CostMeter(1.0).load_state_dict({"version": 99, "paid_s": 0, "spent_usd": 0})


def test_catalog_is_complete():
    expected = {
        "local", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge", "p4d.24xlarge", "p4de.24xlarge",
        "trn1.32xlarge", "trn1n.32xlarge", "trn2.48xlarge", "g6.xlarge", "g6.12xlarge",
        "g6.48xlarge",
    }
    assert expected <= set(CATALOG)


def test_catalog_loads_through_hydra_into_cluster_config():
    schema = OmegaConf.structured(ClusterConfig)
    with initialize_config_dir(config_dir=os.path.abspath(os.path.join(CLUSTER_DIR, "..")),
                               version_base="1.3"):
        for name in CATALOG:
            cfg = compose(overrides=[f"+cluster={name}"])
            # structured merge: an unknown or mistyped key raises here
            cluster = OmegaConf.to_object(OmegaConf.merge(schema, cfg.cluster))
            assert isinstance(cluster, ClusterConfig)
            assert cluster.price_source and cluster.price_date, name
            assert cluster.spot_price_source and cluster.spot_price_date, name
            if name != "local":
                assert cluster.instance_type == name
                assert cluster.price_on_demand_per_hour > 0, name
                assert 0 < cluster.price_spot_per_hour < cluster.price_on_demand_per_hour, name
                assert cluster.accelerators_per_node > 0, name
            assert usd_per_hour(cluster, CostConfig()) >= 0


def test_unknown_key_in_a_cluster_file_fails():
    schema = OmegaConf.structured(ClusterConfig)
    with pytest.raises(Exception, match="pric_spot"):
        OmegaConf.merge(schema, OmegaConf.create({"pric_spot": 1.0}))


def test_meter_from_config():
    c = ClusterConfig(nodes=2, price_on_demand_per_hour=18.0)
    m = CostMeter.from_config(c, CostConfig(), start_time=0.0)
    assert m.spent_usd(now=3600.0) == pytest.approx(36.0)
