"""``model.init_from=<HF directory>``: the model config that goes with it, before anything is built.

* ``model=`` not on the command line: the architecture comes from config.json; ``model.*`` keys
  given on the command line are applied on top (run-time knobs such as ``model.attention.backend``),
  and one that would change the architecture is an error naming it.
* ``model=`` given: the preset must describe config.json's architecture; each mismatching key is
  named. Either error is a ConfigError (exit 2), raised before any process group exists.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

from moe.config import ConfigError


def _model_overrides(overrides: Iterable[str]) -> List[str]:
    """Keys (``model.x.y``) given on the command line."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.append(key)
    return keys


def model_group_given(overrides: Iterable[str]) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides)


def resolve_init_from(cfg, dcfg, overrides: Iterable[str], storage_options: Dict[str, Any] | None = None):
    """``cfg`` (typed TrainConfig) with its model section resolved against ``model.init_from``.
    ``dcfg`` is the composed DictConfig (to read the command line's values), ``overrides`` the
    command line's Hydra overrides."""
    if cfg.model.init_from_dense:
        if cfg.model.init_from:
            raise ConfigError("model.init_from and model.init_from_dense are exclusive: give one")
        check_upcycling(cfg, storage_options)
        return cfg
    path = cfg.model.init_from
    if not path:
        return cfg
    from omegaconf import OmegaConf

    from checkpointing.errors import CheckpointError
    from checkpointing.hf.compare import architecture_mismatches
    from checkpointing.hf.load import model_config_from_hf

    opts = storage_options if storage_options is not None else dict(cfg.checkpoint.storage_options or {})
    try:
        theirs = model_config_from_hf(path, opts)
    except CheckpointError as e:
        raise ConfigError(f"model.init_from={path}: {e}") from e
    overrides = list(overrides)
    if model_group_given(overrides):
        bad = architecture_mismatches(cfg.model, theirs)
        if bad:
            raise ConfigError(f"model.init_from={path}: the model= preset disagrees with its config.json on "
                              f"{len(bad)} key(s): " + "; ".join(bad)
                              + ". Drop model= to take the architecture from config.json")
        return cfg
    node = OmegaConf.structured(theirs)
    for key in _model_overrides(overrides):
        OmegaConf.update(node, key[len("model."):], OmegaConf.select(dcfg, key), merge=False)
    merged = OmegaConf.to_object(node)
    bad = architecture_mismatches(merged, theirs)
    if bad:
        raise ConfigError(f"model.init_from={path}: the command line changes the architecture of config.json: "
                          + "; ".join(bad))
    merged.init_from = path
    cfg.model = merged
    return cfg


def check_upcycling(cfg, storage_options: Dict[str, Any] | None = None) -> None:
    """``model.init_from_dense``: the MoE model of ``model=`` must be the dense model's architecture
    with MoE FFNs whose experts have the dense MLP's width."""
    from checkpointing.errors import CheckpointError
    from checkpointing.hf.compare import architecture_view
    from checkpointing.hf.load import model_config_from_hf

    m, path = cfg.model, cfg.model.init_from_dense
    opts = storage_options if storage_options is not None else dict(cfg.checkpoint.storage_options or {})
    try:
        dense = model_config_from_hf(path, opts)
    except CheckpointError as e:
        raise ConfigError(f"model.init_from_dense={path}: {e}") from e
    if dense.moe.n_experts:
        raise ConfigError(f"model.init_from_dense={path} is already a MoE; upcycling starts from a dense model")
    if m.moe.n_experts < 1:
        raise ConfigError("model.init_from_dense needs a MoE model (model.moe.n_experts >= 1)")
    bad = []
    if m.moe.expert_dim != dense.ffn_dim:
        bad.append(f"model.moe.expert_dim={m.moe.expert_dim} (config.json intermediate_size: {dense.ffn_dim})")
    if m.moe.n_shared_experts * m.moe.expert_dim not in (0, dense.ffn_dim):
        bad.append(f"model.moe.n_shared_experts={m.moe.n_shared_experts} (the shared expert is one copy of the MLP)")
    ours, theirs = architecture_view(m), architecture_view(dense)
    for key in sorted(set(ours) | set(theirs)):
        if key.startswith("model.moe") or key in ("model.ffn_dim", "model.ffn_activation"):
            continue
        if ours.get(key, "-") != theirs.get(key, "-"):
            bad.append(f"{key}={ours.get(key, '-')} (config.json: {theirs.get(key, '-')})")
    if bad:
        raise ConfigError(f"model.init_from_dense={path}: the MoE model does not upcycle it: " + "; ".join(bad))


def init_from_pretrained(model, cfg) -> None:
    """After ``init_weights``: ``model.init_from`` / ``init_from_dense`` overwrite the seeded weights
    (each rank reads its own shards). A resumed run then loads its checkpoint over them."""
    m = cfg.model
    if m.init_from or m.init_from_dense:
        from checkpointing.hf.load import load_hf_weights

        load_hf_weights(model, m.init_from or m.init_from_dense, dict(cfg.checkpoint.storage_options or {}),
                        upcycle=bool(m.init_from_dense))
