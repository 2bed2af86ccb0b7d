"""Strict configs (train/strict.py): every key of configs/ refuses a bad value naming the key;
unknown keys are refused even with `+`, with the closest valid key; input paths are checked
before anything is allocated; the command line exits 2 for all of it.

The per-key cases are generated from the composed default config and run in-process: one Hydra
compose, then each override applied as Hydra applies it (its override parser + OmegaConf.update
on the typed tree), then the trainer's own to_typed + validate_train_config."""

from __future__ import annotations

import copy
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config import ConfigError
from tests.train.runner import FAST, run_train
from train.cli import CONFIG_DIR, to_typed
from train.config import TrainConfig
from train.strict import RANGES, schema_paths, suggest
from train.validate import validate_train_config

PARSER = OverridesParser.create()


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("train", overrides=list(overrides))


BASE = _compose()


def _leaves(node: DictConfig, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key in node.keys():
        child = node._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            out += _leaves(child, path + ".")
        else:
            out.append((path, OmegaConf.select(node, key) if not isinstance(child, (DictConfig, ListConfig))
                        else OmegaConf.to_container(child)))
    return out


LEAVES = _leaves(BASE)


def _declared_type(path: str):
    """The schema's type of a leaf (a None default still has one: model.attention.head_dim is
    Optional[int]); list and dict for containers."""
    import typing

    parent, _, key = path.rpartition(".")
    node = (OmegaConf.select(BASE, parent) if parent else BASE)._get_node(key)
    if isinstance(node, ListConfig):
        return list
    if isinstance(node, DictConfig):
        return dict
    t = node._metadata.ref_type
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


TYPES = {path: _declared_type(path) for path, _ in LEAVES}


def _wrong_value(path: str) -> str:
    """An override value of the wrong type for the key."""
    t = TYPES[path]
    if t in (int, float):
        return "notanumber"
    if t is bool:
        return "maybe"
    if t is str:
        return "[1,2]"
    return "notalistormap"  # lists and mappings


def _apply(cfg: DictConfig, override: str) -> None:
    """An override as Hydra's config loader applies it to the composed, typed tree."""
    o = PARSER.parse_override(override)
    OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)


def test_every_key_in_configs_is_covered():
    assert len(LEAVES) > 150, len(LEAVES)
    numeric = {p for p, v in LEAVES if TYPES[p] in (int, float) or (isinstance(v, list) and v and
                                                                    isinstance(v[0], (int, float)))}
    assert "model.attention.head_dim" in numeric and "parallel.dp_shard" in numeric
    numeric |= {p for p, v in LEAVES if p in ("cost.alert_usd", "cost.alert_fractions", "health.fault_inject_nan_steps")}
    missing = sorted(numeric - set(RANGES))
    assert not missing, f"numeric keys without a range in train/strict.py RANGES: {missing}"
    valid = schema_paths(TrainConfig)
    stale = sorted(k for k in RANGES if k not in valid)
    assert not stale, f"RANGES names keys the schema lacks: {stale}"


@pytest.mark.parametrize("path", [p for p, _ in LEAVES])
def test_type_wrong_value_names_the_key(path):
    cfg = copy.deepcopy(BASE)
    bad = f"{path}={_wrong_value(path)}"
    with pytest.raises(OmegaConfBaseException) as e:
        _apply(cfg, bad)
    assert f"full_key: {path}" in str(e.value), str(e.value)


RANGED = [(p, r) for p, r in RANGES.items() if OmegaConf.select(BASE, p, default="<absent>") != "<absent>"]


@pytest.mark.parametrize("path,rng", RANGED, ids=[p for p, _ in RANGED])
def test_out_of_range_value_names_the_key(path, rng):
    cfg = copy.deepcopy(BASE)
    bad = rng.outside()
    bad = int(bad) if float(bad).is_integer() else bad  # "-1" is -1.0 for a float key
    value = f"[{bad}]" if isinstance(OmegaConf.select(BASE, path), (list, ListConfig)) else str(bad)
    _apply(cfg, f"{path}={value}")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}="):
        validate_train_config(to_typed(cfg), world_size=1)


def test_the_in_process_route_matches_hydra():
    """The shortcut above and a real compose refuse the same overrides."""
    for bad in ("model.rope.theta=notanumber", "logging.wandb=maybe", "run_name=[1,2]"):
        with pytest.raises(ConfigCompositionException):
            _compose(bad)
    cfg = to_typed(_compose("model.moe.capacity_factor=-1"))
    with pytest.raises(ConfigError, match=r"model\.moe\.capacity_factor=-1\.0 must be >= 0"):
        validate_train_config(cfg, world_size=1)


@pytest.mark.parametrize("override,message", [
    ("+model.no_such_key=1", "unknown key model.no_such_key"),
    ("+model.moe.topk=4", "unknown key model.moe.topk: did you mean model.moe.top_k?"),
    ("+trainer.lr=1", "unknown key trainer.lr: did you mean optim.lr?"),
    ("+nonsense=1", "unknown key nonsense"),
])
def test_unknown_keys_are_refused_even_with_plus(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_typed(_compose(override))


def test_free_form_mappings_take_any_key():
    cfg = to_typed(_compose("+data.storage_options.endpoint_url=http://x", "+health.xid_actions.79=warn"))
    assert cfg.data.storage_options["endpoint_url"] == "http://x"


def test_suggestions():
    valid = schema_paths(TrainConfig)
    assert suggest("trainer.max_stepz", valid) == "trainer.max_steps"
    assert suggest("model.moe.topk", valid) == "model.moe.top_k"
    assert suggest("checkpoint.keep", valid) == "checkpoint.keep_last"


@pytest.mark.parametrize("overrides,message", [
    (["data=shards", "data.path=ftp://x/y"], "data.path='ftp://x/y': the ftp:// scheme is not supported"),
    (["logging.prometheus.port=8080"], "logging.prometheus.port=8080 is taken"),
    (["logging.alert_webhook=hooks.slack.com/x"], "logging.alert_webhook='hooks.slack.com/x'"),
])
def test_schemes_and_reserved_port(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(to_typed(_compose(*overrides)), world_size=1)


def test_command_line_exits_2_before_anything_exists(tmp_path):
    """Unknown key (with + and without), a type error, a range error and missing input paths:
    exit 2, the key in the message, no traceback, nothing written."""
    cases = [
        (["+model.moe.topk=4"], "did you mean model.moe.top_k?"),
        (["model.moe.topk=4"], "did you mean model.moe.top_k?"),
        (["trainer.max_steps=many"], "trainer.max_steps"),
        (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor=-1.0 must be >= 0"),
        (["data=shards", f"data.path={tmp_path}/missing"], f"data.path='{tmp_path}/missing' does not exist"),
        ([f"checkpoint.resume={tmp_path}/run/step_000000010"], "checkpoint.resume="),
    ]
    out = tmp_path / "out"
    for overrides, message in cases:
        p = run_train(*overrides, *FAST, f"output_dir={out}", check=False, timeout=120)
        assert p.returncode == 2, (overrides, p.stdout[-1000:], p.stderr[-2000:])
        assert message in p.stderr and "Traceback" not in p.stderr, (overrides, p.stderr[-2000:])
        assert not out.exists(), overrides
