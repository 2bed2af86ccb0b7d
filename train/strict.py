"""Strict configs: unknown keys, numeric ranges, path schemes and input paths, each error naming the
key and the fix (exit 2 from the command line, before anything is allocated).

- Unknown keys are refused even when added with ``+`` (Hydra's ``+key=value`` appends to a typed
  node without complaint), with the closest valid key: ``unknown key model.moe.topk: did you mean
  model.moe.top_k?``. Free-form mappings (``*.storage_options``, ``parallel.deepspeed.extra``,
  ``health.xid_actions``) take any key.
- ``RANGES`` bounds every numeric key of the tree; tests/train/test_strict_config.py fails when a
  numeric key is added without a range, so a new knob cannot slip past.
- ``path_scheme_error`` is the generic scheme check for path-valued keys; ``input_path_errors``
  checks that input paths (``data.path``, ``data.val_path``, ``checkpoint.resume``) exist, run by
  the trainer (not the launcher, whose machine may not mount them) before any allocation.

Rules that span keys stay in the packages' validators (train/validate.py and those it calls).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from moe.config import ConfigError


# --- unknown keys --------------------------------------------------------------------------------

def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def schema_paths(schema: type) -> Dict[str, str]:
    """Every valid dotted path of a config dataclass tree -> "node" | "leaf" | "mapping"
    (a free-form ``Dict[str, Any]``: any key below it is fine)."""
    from omegaconf import DictConfig, OmegaConf

    out: Dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            path = f"{prefix}{key}"
            if isinstance(child, DictConfig):
                if _is_dataclass_type(OmegaConf.get_type(child)):
                    out[path] = "node"
                    walk(child, path + ".")
                else:
                    out[path] = "mapping"
            else:
                out[path] = "leaf"

    walk(OmegaConf.structured(schema), "")
    return out


def unknown_keys(dcfg) -> List[str]:
    """Dotted paths in a composed config that its typed schema does not have (keys added with
    ``+``), in the order they appear."""
    from omegaconf import DictConfig, OmegaConf

    found: List[str] = []

    def walk(node, prefix: str) -> None:
        typ = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(typ)} if _is_dataclass_type(typ) else None
        if fields is None:
            return  # a free-form mapping: anything goes
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in fields:
                found.append(path)
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, path + ".")

    walk(dcfg, "")
    return found


def suggest(path: str, valid: Iterable[str]) -> Optional[str]:
    """The closest valid dotted path: same parent first (``moe.topk`` -> ``moe.top_k``), then the
    whole tree (``trainer.lr`` -> ``optim.lr``)."""
    valid = list(valid)
    parent, _, leaf = path.rpartition(".")
    siblings = [v for v in valid if v.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings], n=1, cutoff=0.6)
    if close:
        return f"{parent}.{close[0]}" if parent else close[0]
    by_leaf = [v for v in valid if v.rpartition(".")[2] == leaf]
    if by_leaf:
        return by_leaf[0]
    close = difflib.get_close_matches(path, valid, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key_message(path: str, valid: Iterable[str]) -> str:
    hint = suggest(path, valid)
    fix = f"did you mean {hint}?" if hint else "see docs/configs.md for the keys"
    return (f"unknown key {path}: {fix} (`python -m train --cfg job` prints every key; "
            "a + prefix does not make a new key valid)")


def check_known_keys(dcfg, schema: type) -> None:
    """Raise ConfigError naming the first unknown key of a composed config and the closest valid one."""
    unknown = unknown_keys(dcfg)
    if unknown:
        valid = schema_paths(schema)
        raise ConfigError("; ".join(unknown_key_message(p, valid) for p in unknown))


def override_hints(overrides: Sequence[str], schema: type) -> List[str]:
    """Messages for command-line overrides whose key the schema lacks (for Hydra's own "Could not
    override" error, which names the key but not the fix). Group choices (``model=tiny``) and
    ``hydra.*`` are Hydra's to check."""
    valid = schema_paths(schema)
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or key.startswith("hydra.") or key == "hydra" or "/" in key or "@" in key:
            continue
        parts = key.split(".")
        # below a free-form mapping any key is fine
        if any(valid.get(".".join(parts[:i])) == "mapping" for i in range(1, len(parts))):
            continue
        if key not in valid:
            out.append(unknown_key_message(key, valid))
    return out


# --- numeric ranges ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    lo: Optional[float] = None
    lo_open: bool = False  # True: value > lo; False: value >= lo
    hi: Optional[float] = None
    hi_open: bool = False
    also: Tuple[float, ...] = ()  # sentinel values allowed outside the range (-1 = "auto")
    why: str = ""  # what the sentinel or the bound means, for the message

    def ok(self, v: float) -> bool:
        if v in self.also:
            return True
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def text(self) -> str:
        parts = []
        if self.lo is not None and self.hi is not None:
            parts.append(f"within {'(' if self.lo_open else '['}{_n(self.lo)}, {_n(self.hi)}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_n(self.lo)}")
        elif self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_n(self.hi)}")
        if self.also:
            parts.append("or " + " or ".join(_n(a) for a in self.also))
        return " ".join(parts) + (f" ({self.why})" if self.why else "")

    def outside(self) -> float:
        """A value this range refuses (for the generated tests)."""
        if self.lo is not None:
            v = self.lo if self.lo_open else self.lo - 1
            if v in self.also:
                v = self.lo - 0.5
            return v
        return self.hi + 1 if not self.hi_open else self.hi


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def ge(lo: float, why: str = "", also: Tuple[float, ...] = ()) -> Range:
    return Range(lo=lo, why=why, also=also)


def gt(lo: float, why: str = "") -> Range:
    return Range(lo=lo, lo_open=True, why=why)


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, why: str = "") -> Range:
    return Range(lo=lo, lo_open=lo_open, hi=hi, hi_open=hi_open, why=why)


POS, NONNEG = gt(0), ge(0)
ONE = ge(1)

# Every numeric key of the tree (lists: each element). A key missing here fails
# tests/train/test_strict_config.py::test_every_numeric_key_has_a_range.
RANGES: Dict[str, Range] = {
    # model
    "model.vocab_size": ONE, "model.d_model": ONE, "model.n_layers": ONE,
    "model.ffn_dim": ge(0, "0 only when every layer is MoE"), "model.max_seq_len": ONE,
    "model.norm_eps": POS, "model.init_std": POS,
    "model.attention.n_heads": ONE, "model.attention.n_kv_heads": ONE, "model.attention.head_dim": ONE,
    "model.attention.q_lora_rank": ge(0, "0 = no query compression"), "model.attention.kv_lora_rank": NONNEG,
    "model.attention.qk_nope_head_dim": NONNEG, "model.attention.qk_rope_head_dim": NONNEG,
    "model.attention.v_head_dim": NONNEG, "model.attention.window": ge(0, "0 = full attention"),
    "model.attention.global_every": ge(0, "0 = off"), "model.attention.layer_windows": ge(0, "0 = full attention"),
    "model.rope.theta": POS, "model.rope.yarn_factor": gt(0, "1 = no YaRN scaling"),
    "model.rope.yarn_original_max_position": ONE, "model.rope.yarn_beta_fast": POS,
    "model.rope.yarn_beta_slow": POS, "model.rope.yarn_mscale": POS, "model.rope.yarn_mscale_all_dim": NONNEG,
    "model.rope.local_theta": ge(0, "0 = model.rope.theta on every layer"),
    "model.moe.n_experts": ge(0, "0 = dense model"), "model.moe.top_k": ONE, "model.moe.expert_dim": ONE,
    "model.moe.n_shared_experts": NONNEG, "model.moe.first_k_dense": NONNEG, "model.moe.moe_every": ONE,
    "model.moe.route_scale": POS, "model.moe.n_groups": ONE, "model.moe.topk_groups": ONE,
    "model.moe.bias_update_rate": ge(0, "0 = no aux-loss-free bias"), "model.moe.aux_loss_coef": NONNEG,
    "model.moe.seq_aux_loss_coef": NONNEG, "model.moe.z_loss_coef": NONNEG,
    "model.moe.capacity_factor": ge(0, "0 = no capacity limit, no token dropped"),
    # data
    "data.val_fraction": within(0, 0.5, lo_open=True, hi_open=True),
    "data.megatron_vocab_size": ge(0, "0 = the data's max token id + 1"), "data.builtin_max_bytes": ONE,
    # trainer
    "trainer.max_steps": ONE, "trainer.seed": NONNEG, "trainer.log_every": ONE,
    "trainer.eval_every": ge(0, "0 = no evaluation"), "trainer.eval_batches": NONNEG,
    "trainer.global_batch_size": ONE, "trainer.micro_batch_size": ge(0, "0 = global batch / ranks"),
    "trainer.seq_len": ONE, "trainer.ac_every": ONE, "trainer.grad_clip": ge(0, "0 disables clipping"),
    "trainer.early_stop_patience": ge(0, "0 = off"), "trainer.early_stop_min_delta": NONNEG,
    "trainer.profile_start": ge(0, "0 = no profile"), "trainer.profile_steps": ONE,
    # optim
    "optim.lr": POS, "optim.min_lr_ratio": within(0, 1), "optim.weight_decay": NONNEG,
    "optim.beta1": within(0, 1, hi_open=True), "optim.beta2": within(0, 1, hi_open=True), "optim.eps": POS,
    "optim.warmup_steps": NONNEG, "optim.decay_fraction": within(0, 1, lo_open=True),
    # parallel
    "parallel.dp_replicate": ONE, "parallel.dp_shard": ge(1, "-1 = every rank not used by dp_replicate", also=(-1,)),
    "parallel.ep": ONE, "parallel.timeout_s": POS, "parallel.init_timeout_s": POS,
    "parallel.deepspeed.zero_stage": ge(1, "1, 2 or 3: the DeepSpeed rules name the stages"),
    "parallel.deepspeed.reduce_bucket_size": ONE,
    # checkpoint
    "checkpoint.every_steps": ge(0, "0 = only the final save"), "checkpoint.keep_last": ge(1, "the newest commit is always kept"),
    "checkpoint.keep_every": ge(0, "0 = off"), "checkpoint.write_threads": ONE, "checkpoint.write_bandwidth_gbps": POS,
    "checkpoint.fault_inject_write_delay_s": NONNEG,
    # cluster
    "cluster.accelerators_per_node": ge(0, "0 = whatever the process sees"), "cluster.nodes": ge(0, "0 = the launched node count"),
    "cluster.price_on_demand_per_hour": NONNEG, "cluster.price_spot_per_hour": NONNEG,
    "cluster.peak_tflops_override": ge(0, "0 = the device table"),
    # cost
    "cost.price_per_hour": ge(0, "0 = the catalog"), "cost.budget_usd": ge(0, "0 = no budget"),
    "cost.alert_usd": POS, "cost.alert_fractions": gt(0, "fractions of cost.budget_usd"),
    "cost.max_gap_billed_s": ge(0, "-1 = bill the whole gap", also=(-1,)), "cost.heartbeat_every_s": POS,
    "cost.projection_warmup_steps": NONNEG, "cost.target_tokens": ge(0, "0 = to trainer.max_steps"),
    # health
    "health.preemption_deadline_s": POS, "health.expected_gpus": NONNEG, "health.imds_interval_s": POS,
    "health.imds_timeout_s": POS, "health.nvml_interval_s": ge(0, "0 = off"), "health.ecc_uncorrected_max": NONNEG,
    "health.temp_warn_c": POS, "health.pcie_replay_warn_delta": NONNEG, "health.nvlink_error_warn_delta": NONNEG,
    "health.hang_timeout_s": ge(0, "0 = off"), "health.straggler_every": ge(0, "0 = off"),
    "health.straggler_threshold": POS, "health.straggler_windows": ONE, "health.straggler_min_slow": ONE,
    "health.nan_max_skips": NONNEG, "health.nan_max_rollbacks": NONNEG, "health.fault_inject_nan_steps": ONE,
    "health.fault_inject_rank": NONNEG, "health.fault_inject_hang_step": ge(0, "0 = off"),
    "health.fault_inject_raise_step": ge(0, "0 = off"),
    "health.fault_inject_slow_s": NONNEG,
    # distill
    "distill.alpha": within(0, 1, why="loss = (1 - alpha) * CE + alpha * KD"), "distill.temperature": POS,
    "distill.top_k_logits": ge(0, "0 = the full vocabulary"), "distill.chunk_tokens": ONE,
    # logging, neuron
    "logging.prometheus.port": within(0, 65535, why="0 = off"),
    "neuron.precompile_steps": ge(0, "0 = no precompile run"),
}


def _get(cfg: Any, path: str) -> Tuple[bool, Any]:
    node = cfg
    for part in path.split("."):
        if not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def range_errors(cfg: Any, ranges: Dict[str, Range] = RANGES) -> List[str]:
    """Numeric values outside their range, as ``key=value must be ...`` messages (keys absent from
    ``cfg``, e.g. a section another branch adds, are skipped)."""
    errors = []
    for path, rng in ranges.items():
        present, value = _get(cfg, path)
        if not present or value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not rng.ok(v):
                shown = value if len(values) == 1 and not isinstance(value, (list, tuple)) else list(values)
                errors.append(f"{path}={shown} must be {rng.text()}")
                break
    return errors


# --- paths ---------------------------------------------------------------------------------------

LOCAL_OR_S3 = ("", "file", "s3")


def path_scheme(value: str) -> str:
    """``s3`` for ``s3://b/k``, ``""`` for a plain path."""
    head, sep, _ = str(value).partition("://")
    return head.lower() if sep and head and "/" not in head else ""


def path_scheme_error(key: str, value: str, allowed: Sequence[str] = LOCAL_OR_S3) -> Optional[str]:
    """The message for a path whose scheme is not supported, or None. Generic: any path-valued
    key (data here; checkpointing applies its own list to checkpoint.root/upload_root)."""
    if not value:
        return None
    scheme = path_scheme(value)
    if scheme in allowed:
        return None
    names = ", ".join("a local path" if s == "" else f"{s}://" for s in allowed)
    what = f"the {scheme}:// scheme is not supported" if scheme else "a plain path is not supported here"
    return f"{key}={value!r}: {what}; use {names}"


# Path-valued keys outside checkpointing (whose schemes the checkpoint storage checks itself).
PATH_KEYS: Dict[str, Sequence[str]] = {
    "data.path": LOCAL_OR_S3,
    "data.val_path": LOCAL_OR_S3,
    "output_dir": ("",),
    "neuron.compile_cache": LOCAL_OR_S3,
    "health.imds_endpoint": ("http", "https"),
    "logging.alert_webhook": ("http", "https"),
}
RESERVED_PORTS = {8080: "HyperPod EKS's elastic agent listens there"}


def scheme_errors(cfg: Any) -> List[str]:
    """Path/URL keys with a scheme their reader does not support, and reserved ports."""
    errors = []
    present, port = _get(cfg, "logging.prometheus.port")
    if present and port in RESERVED_PORTS:
        errors.append(f"logging.prometheus.port={port} is taken: {RESERVED_PORTS[port]}; pick another, e.g. 9464 (9400 is the DCGM exporter's)")
    for key, allowed in PATH_KEYS.items():
        present, value = _get(cfg, key)
        if present:
            error = path_scheme_error(key, value or "", allowed)
            if error:
                errors.append(error)
    return errors


def _local(value: str) -> Optional[str]:
    """The local filesystem path of ``value``; None for a remote URL (s3://: the loader checks)."""
    scheme = path_scheme(value)
    if scheme == "":
        return value
    if scheme == "file":
        return value[len("file://"):]
    return None


def input_path_errors(cfg: Any) -> List[str]:
    """Input paths that do not exist (local paths; remote ones are checked by their readers).

    ``data.path`` is a shard directory (data=shards) or the prefix of ``<prefix>.bin/.idx``
    (data=megatron); ``checkpoint.resume`` other than auto/none is a step directory."""
    errors = []
    data = cfg.data
    for key in ("path", "val_path"):
        value = getattr(data, key, "") or ""
        local = _local(value) if value else None
        if local is None or data.source == "builtin":
            continue
        exists = (os.path.exists(local + ".bin") and os.path.exists(local + ".idx")) if data.source == "megatron" \
            else os.path.isdir(local)
        if not exists:
            what = ("<prefix>.bin and <prefix>.idx" if data.source == "megatron"
                    else "a directory written by `moeforge prepare`")
            errors.append(f"data.{key}={value!r} does not exist (data.source={data.source} reads {what}); "
                          "check the path, or the mount it is on")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none", ""):
        local = _local(resume)
        if local is not None and not os.path.isdir(local):
            errors.append(f"checkpoint.resume={resume!r} does not exist: give a step_<N> directory, "
                          "or auto (the newest commit of this run) or none")
    return errors


def check_input_paths(cfg: Any) -> None:
    errors = input_path_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
