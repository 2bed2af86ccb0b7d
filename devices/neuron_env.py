"""``trainer.device=neuron`` (Trainium, torch-neuronx) and ``xla`` (any torch-xla PJRT device):
the config rules and the one place that decides which environment variables a run sets.

Pure functions of the config, the run directory and an environment mapping; nothing here imports
torch or torch_xla, so the launcher (which renders them as ``export`` lines before
``neuron_parallel_compile``) and the tests use them without either installed. The trainer applies
the same plan (:func:`apply_xla_env`) before it imports torch_xla, and keeps every variable the
user or the launcher already set, so the two always agree.

Neuron variables (docs/backends.md, "Trainium"):

==================================  ============================================================
NEURON_CC_FLAGS                     ``--model-type=transformer --auto-cast=none`` plus
                                    ``neuron.cc_flags``. neuronx-cc casts fp32 matmuls to bf16
                                    by default; ``--auto-cast=none`` keeps the precision the
                                    trainer chose (bf16 through ``torch.autocast("xla")`` with
                                    fp32 master weights, or fp32), the replacement AWS documents
                                    for the retired XLA_USE_BF16 / XLA_DOWNCAST_BF16
NEURON_COMPILE_CACHE_URL            the persistent compile cache: ``neuron.compile_cache`` or
                                    ``<run dir>/neuron-compile-cache`` (survives requeues; shared
                                    with the ``neuron_parallel_compile`` trial run). A path or
                                    ``s3://bucket/prefix``
NEURON_RT_VISIBLE_CORES             ``LOCAL_RANK``: one NeuronCore per process (by default the
                                    runtime reserves every core of the instance for the first
                                    process that starts)
PJRT_DEVICE                         ``NEURON``
==================================  ============================================================

``trainer.device=xla`` sets nothing: PJRT_DEVICE (CPU, TPU, CUDA) is the user's choice.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Dict, List, Mapping, MutableMapping, Optional

from devices.config import NeuronConfig
from devices.env import EnvSetting  # key, value, reason: the EFA settings' record too

XLA_DEVICES = ("neuron", "xla")
DEFAULT_CC_FLAGS = ("--model-type=transformer", "--auto-cast=none")
CACHE_SUBDIR = "neuron-compile-cache"
PRECOMPILE_SUBDIR = "neuron-precompile"  # RUN_DIR of the neuron_parallel_compile trial run
EXTRACT_GRAPHS_VAR = "NEURON_EXTRACT_GRAPHS_ONLY"  # set by neuron_parallel_compile in its trial run

__all__ = ["XLA_DEVICES", "EnvSetting", "is_xla_device", "xla_config_errors", "compile_cache_url",
           "neuron_cc_flags", "recommended_xla_env", "apply_xla_env", "shell_exports",
           "extracting_graphs", "precompile_overrides"]


def is_xla_device(device: str) -> bool:
    return device in XLA_DEVICES


def xla_config_errors(cfg, world_size: int) -> List[str]:
    """What the XLA path cannot do, each message naming the key and the fix (empty: fine).

    ``cfg`` is the whole ``TrainConfig``; nothing is checked unless ``trainer.device`` is an XLA
    device.
    """
    t = cfg.trainer
    if not is_xla_device(t.device):
        return []
    errors = []
    n = cfg.neuron
    if world_size > 1:
        errors.append(
            f"trainer.device={t.device} runs one process (world size {world_size} requested): data "
            "parallelism over several NeuronCores (a torch-xla process group and a gradient all-reduce) "
            "is not implemented; launch with --nproc-per-node 1 (docs/backends.md, Trainium)")
    if cfg.parallel.engine != "fsdp2":
        errors.append(f"parallel.engine={cfg.parallel.engine} with trainer.device={t.device}: the XLA path "
                      "is our own single-device step; set parallel.engine=fsdp2")
    if t.compile:
        errors.append(f"trainer.compile=true with trainer.device={t.device}: torch-xla already traces "
                      "and compiles whole steps; set trainer.compile=false")
    if cfg.checkpoint.async_mode != "off":
        errors.append(f"checkpoint.async_mode={cfg.checkpoint.async_mode} with trainer.device={t.device}: "
                      "async staging copies device tensors from a background thread, which torch-xla's "
                      "lazy tensors do not support; set checkpoint.async_mode=off")
    moe = cfg.model.moe
    if moe.n_experts and moe.experts_impl == "grouped_mm":
        errors.append(f"model.moe.experts_impl=grouped_mm with trainer.device={t.device}: torch-xla has no "
                      "grouped GEMM; use model.moe.experts_impl=auto (the per-expert loop)")
    if cfg.model.attention.backend == "flex":
        errors.append(f"model.attention.backend=flex with trainer.device={t.device}: FlexAttention needs "
                      "CUDA or CPU; use model.attention.backend=auto (SDPA)")
    if n.precompile_steps < 0:
        errors.append(f"neuron.precompile_steps={n.precompile_steps} must be >= 0 (0 = no precompile)")
    if re.search(r"--cache_dir\b", n.cc_flags):
        errors.append("neuron.cc_flags must not set --cache_dir (it would override the cache the launcher "
                      "precompiles into); set neuron.compile_cache instead")
    return errors


def compile_cache_url(neuron_cfg: NeuronConfig, run_dir: str) -> str:
    """``neuron.compile_cache`` (a path, made absolute, or an ``s3://`` URL), else
    ``<run_dir>/neuron-compile-cache``."""
    where = neuron_cfg.compile_cache
    if not where:
        return os.path.join(os.path.abspath(run_dir), CACHE_SUBDIR)
    if "://" in where:
        return where
    return os.path.abspath(where)


def neuron_cc_flags(neuron_cfg: NeuronConfig) -> str:
    extra = neuron_cfg.cc_flags.split()
    ours = [f for f in DEFAULT_CC_FLAGS if f.split("=")[0] not in {e.split("=")[0] for e in extra}]
    return " ".join(ours + extra)


def recommended_xla_env(device: str, neuron_cfg: NeuronConfig, run_dir: str,
                        local_rank: Optional[int] = 0) -> List[EnvSetting]:
    """The variables a ``device`` run sets (empty for ``cpu``/``cuda``/``xla``).

    ``local_rank`` None leaves out the per-process ones (the launcher's exports)."""
    if device != "neuron":
        return []
    s = [
        EnvSetting("PJRT_DEVICE", "NEURON", "torch-xla's runtime: the Neuron PJRT plugin"),
        EnvSetting("NEURON_CC_FLAGS", neuron_cc_flags(neuron_cfg),
                   "neuronx-cc: transformer tuning; no automatic fp32->bf16 matmul cast, so the "
                   "precision is trainer.precision's"),
        EnvSetting("NEURON_COMPILE_CACHE_URL", compile_cache_url(neuron_cfg, run_dir),
                   "persistent compile cache: requeued attempts and the neuron_parallel_compile "
                   "trial run share it"),
    ]
    if local_rank is not None:
        s.append(EnvSetting("NEURON_RT_VISIBLE_CORES", str(int(local_rank)),
                            "one NeuronCore per process; otherwise the runtime reserves them all"))
    return s


def apply_xla_env(settings: List[EnvSetting], environ: Optional[MutableMapping[str, str]] = None) -> dict:
    """Set each variable the environment does not already have. Call it before importing torch_xla.

    Returns ``{"set": [EnvSetting], "kept": {key: value already there}, "notes": [str]}``.
    """
    env = os.environ if environ is None else environ
    report: Dict[str, object] = {"set": [], "kept": {}, "notes": []}
    for s in settings:
        if s.key in env:
            report["kept"][s.key] = env[s.key]
        else:
            env[s.key] = s.value
            report["set"].append(s)
    flags = env.get("NEURON_CC_FLAGS", "")
    if settings and re.search(r"--cache_dir\b", flags):
        report["notes"].append("NEURON_CC_FLAGS sets --cache_dir, which takes precedence over "
                               "NEURON_COMPILE_CACHE_URL: compiled graphs go there")
    if settings and "NEURON_CC_FLAGS" in report["kept"] and "--auto-cast" not in flags:
        report["notes"].append("NEURON_CC_FLAGS (yours) has no --auto-cast: neuronx-cc casts fp32 "
                               "matmuls to bf16 by default, whatever trainer.precision says")
    return report


def shell_exports(settings: List[EnvSetting]) -> str:
    """``export KEY=${KEY-value}`` lines: a value already in the job's environment wins, as in
    :func:`apply_xla_env`."""
    lines = []
    for s in settings:
        lines.append(f"export {s.key}=${{{s.key}-{shlex.quote(s.value)}}}  # {s.reason}")
    return "\n".join(lines)


def extracting_graphs(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True inside ``neuron_parallel_compile``'s trial run: graphs are traced and compiled, never
    executed, so every value read back is a placeholder."""
    env = os.environ if environ is None else environ
    return env.get(EXTRACT_GRAPHS_VAR, "") not in ("", "0")


def precompile_overrides(steps: int, cache_url: str, run_dir: str) -> List[str]:
    """Trainer overrides for the ``neuron_parallel_compile`` trial run of a job whose RUN_DIR is
    ``run_dir``: a few steps (one evaluation at the last), nothing saved or resumed, the same
    compile cache. Its own RUN_DIR (:data:`PRECOMPILE_SUBDIR`) is exported by the launcher, so
    the real run's directory never sees a checkpoint of the placeholder weights."""
    return [f"trainer.max_steps={int(steps)}", "checkpoint.resume=none", "checkpoint.every_steps=0",
            "checkpoint.save_final=false", f"neuron.compile_cache={cache_url}",
            "health.preflight=off", "logging.wandb=false", "logging.tensorboard=false"]
