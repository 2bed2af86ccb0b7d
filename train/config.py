"""The typed config tree of a run, composed by Hydra from configs/train.yaml and its groups.

Each package owns its own small section (``model/config.py``, ``train/data/config.py``,
``checkpointing/config.py``, ``parallelism/config.py``, ``health/config.py``, ...); this module keeps
the trainer's own sections and composes them all. Rules that span sections live in ``train/validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from checkpointing.config import CheckpointConfig
from cost.config import ClusterConfig, CostConfig
from devices.config import NeuronConfig
from health.config import HealthConfig
from model.config import ModelConfig
from model.fp8 import Fp8Config
from parallelism.config import DeepSpeedConfig, ParallelConfig
from train.data.config import DataConfig
from train.distill.config import DistillConfig

SWITCH = ("auto", "true", "false")


def switch(value) -> str:
    """An ``auto | true | false`` key's value, normalised: Hydra hands ``true`` given on the command
    line to a string-typed key as ``"True"``, and code may set a bool."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()

# The sections other packages own, composed below (and importable from here for Hydra users).
__all__ = ["TrainConfig", "TrainerConfig", "OptimConfig", "LoggingConfig", "ClusterConfig", "CostConfig",
           "NeuronConfig", "CheckpointConfig", "HealthConfig", "ParallelConfig", "DeepSpeedConfig"]


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    global_batch_size: int = 16  # sequences per optimizer step, whatever the world size
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = global batch / dp ranks
    seq_len: int = 128
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False
    ac_policy: str = "full"  # full: recompute each block | selective: keep matmul/attention outputs
    ac_every: int = 1  # checkpoint every N-th block (1 = all)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | fp8 (SM89+, model/fp8.py)
    fp8: Fp8Config = field(default_factory=Fp8Config)  # read only with precision=fp8
    device: str = "auto"  # auto | cpu | cuda | neuron (Trainium, torch-neuronx) | xla (any torch-xla device)
    grad_clip: float = 1.0
    early_stop_patience: int = 0  # evals without val-loss improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0
    detect_anomaly: bool = False
    # torch.profiler over optimizer steps profile_start .. profile_start + profile_steps - 1 of this
    # run (0 = off): <run dir>/profile/ gets a chrome trace and the top ops (train/profiling.py).
    profile_start: int = 0
    profile_steps: int = 3


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final LR as a fraction of lr (cosine/linear/wsd)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: share of steps in the final decay
    fused: str = "auto"  # auto (fused on CUDA) | true | false
    # bf16 matmul weights with fp32 masters in the optimizer (train/master_weights.py): auto | true | false.
    # auto: on for a one-GPU bf16/fp8 run with one micro-batch per step (measured faster), else off
    master_weights: str = "auto"


@dataclass
class PrometheusConfig:
    """Rank 0 serves /metrics (train/prometheus.py, docs/monitoring.md); needs the `prometheus` extra."""

    port: int = 0  # 0 = off; not 8080 (HyperPod EKS's elastic agent owns it)
    addr: str = "0.0.0.0"  # listen address; 127.0.0.1 to keep it on the node


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "moeforge"
    # auto (online iff WANDB_API_KEY or WANDB_BASE_URL is set, else offline) | online | offline
    # | disabled; an explicit WANDB_MODE in the environment wins over auto
    wandb_mode: str = "auto"
    wandb_entity: str = ""  # "" = the key's default entity
    tensorboard: bool = False
    progress: str = "auto"  # auto (bar on a TTY) | on | off
    jsonl: bool = True
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    # Alerts (moeforge/alerts.py) as a JSON POST {"text": ...} (Slack-compatible) to this URL; "" = off.
    alert_webhook: str = ""


@dataclass
class TrainConfig:
    run_name: str = ""  # "" = stable name derived from the config (never the clock)
    output_dir: str = "outputs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
