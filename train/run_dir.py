"""Where a run lives: ``output_dir/run_name``, or RUN_DIR when a launcher sets it.

``run_name`` defaults to a stable name derived from the config (never the clock), so re-running
the same command resumes the same run. Keys that only say how long, how often or where to report
(max_steps, logging, checkpoint cadence, prices) do not change the name: raising max_steps
continues the run rather than starting a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

# Sections/keys that do not define *what* is trained.
_NAME_EXCLUDES = {
    "run_name", "output_dir", "logging", "cost", "health", "cluster", "checkpoint", "neuron",
}
_TRAINER_EXCLUDES = {"max_steps", "log_every", "eval_every", "eval_batches", "compile",
                     "activation_checkpointing", "ac_policy", "ac_every", "micro_batch_size", "device", "detect_anomaly",
                     "early_stop_patience", "early_stop_min_delta", "profile_start", "profile_steps"}
_PARALLEL_EXCLUDES = {"dp_replicate", "dp_shard", "ep", "backend", "timeout_s", "deepspeed"}


# Keys added after runs existed, dropped while at their "off" value so those runs keep their names.
_OFF_WHEN = {("model",): {"init_from": "", "init_from_dense": "", "embed_scale": False, "ffn_activation": "silu"},
             ("model", "attention"): {"qk_norm_scope": "head"}, ("model", "rope"): {"local_theta": 0.0}}


def identity(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    if not d.get("distill", {}).get("teacher"):
        d.pop("distill", None)
    # optim.master_weights (was a bool, off by default): in the name only when set to true, as True,
    # so runs named before it became auto | true | false keep their names. auto is the default.
    optim = d.get("optim", {})
    if "master_weights" in optim:
        from train.config import switch

        if switch(optim["master_weights"]) == "true":
            optim["master_weights"] = True
        else:
            optim.pop("master_weights")
    for path, off in _OFF_WHEN.items():
        section = d
        for part in path:
            section = section.get(part, {})
        for k, v in off.items():
            if k in section and section[k] == v:
                section.pop(k)
    for k in _NAME_EXCLUDES:
        d.pop(k, None)
    for k in _TRAINER_EXCLUDES:
        d["trainer"].pop(k, None)
    for k in _PARALLEL_EXCLUDES:
        d["parallel"].pop(k, None)
    # The schedule length is part of the LR curve only through max_steps, which we exclude on
    # purpose (extending a run keeps its name); everything else about optimisation stays in.
    return d


def config_hash(cfg, n: int = 8) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def run_name(cfg) -> str:
    """``run_name``, else RUN_DIR's last component (so checkpoints land in RUN_DIR too), else a
    stable name derived from the config."""
    if cfg.run_name:
        return cfg.run_name
    env = os.environ.get("RUN_DIR")
    if env:
        return os.path.basename(os.path.normpath(env))
    return f"{cfg.model.name}-{config_hash(cfg)}"


def run_dir(cfg) -> str:
    env = os.environ.get("RUN_DIR")
    if env:
        return env
    return os.path.join(cfg.output_dir, run_name(cfg))
