"""The typed config tree of a run, composed by Hydra from configs/train.yaml and its groups.

Each package takes its own small section (``ModelConfig``, ``DataConfig``, ``CheckpointConfig``,
...). Rules that span sections live in ``train/validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from model.config import ModelConfig
from train.data.config import DataConfig


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
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | neuron (Trainium, torch-neuronx) | xla (any torch-xla device)
    grad_clip: float = 1.0
    early_stop_patience: int = 0  # evals without val-loss improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0
    detect_anomaly: bool = False


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


@dataclass
class DeepSpeedConfig:
    """``parallel.engine=deepspeed`` only (docs/backends.md). The batch, accumulation, clipping and
    precision keys of DeepSpeed's JSON come from ``trainer``; the optimizer is ours (``optim``)."""

    zero_stage: int = 2  # 1: optimizer state sharded | 2: + gradients | 3: + parameters
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_param: bool = False  # ZeRO-3 only: parameters live on the CPU between uses
    overlap_comm: bool = False  # overlap gradient reduction with backward (more memory)
    reduce_bucket_size: int = 500_000_000  # elements per gradient-reduction bucket
    # Passed through to DeepSpeed's config as is (e.g. {"zero_optimization": {"round_robin_gradients":
    # true}}); keys moeforge sets itself are refused, naming the key that sets them.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: every rank not used by dp_replicate
    ep: int = 1
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: float = 600.0
    engine: str = "fsdp2"  # fsdp2 | deepspeed (ZeRO 1-3; pip install -e '.[deepspeed]')
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    root: str = ""  # "" = output_dir; a path, an FSx mount or s3://bucket/prefix
    every_steps: int = 50
    keep_last: int = 3
    keep_every: int = 0  # also keep every m-th step forever; 0 = off
    resume: str = "auto"  # auto | none | a checkpoint path
    async_mode: str = "off"  # off | thread | process
    staging: str = "host"  # host | device (thread mode: snapshot in spare GPU memory, ~0 stall)
    save_final: bool = True
    storage_options: Dict[str, Any] = field(default_factory=dict)
    on_save_error: str = "stop"  # stop: a failed save raises; continue: log it, keep training (no marker)
    upload_root: str = ""  # two tiers: commit to root, then upload to this s3://bucket/prefix in the background


@dataclass
class ClusterConfig:
    name: str = "local"
    instance_type: str = "local"
    accelerator: str = "auto"  # device name for the peak-FLOPs table; auto = detect
    accelerators_per_node: int = 0  # 0 = whatever the process sees
    nodes: int = 1
    lifecycle: str = "on_demand"  # on_demand | spot
    price_on_demand_per_hour: float = 0.0  # $ per instance-hour
    price_spot_per_hour: float = 0.0
    price_source: str = ""  # where the on-demand figure comes from
    price_date: str = ""
    spot_price_source: str = ""  # spot prices move: say whether sampled or estimated, and how
    spot_price_date: str = ""
    region: str = ""  # region the prices are for
    peak_tflops_override: float = 0.0  # dense bf16 TFLOP/s per accelerator, 0 = table


@dataclass
class CostConfig:
    price_per_hour: float = 0.0  # override: $ per instance-hour (0 = catalog)
    budget_usd: float = 0.0  # 0 = no budget
    alert_usd: List[float] = field(default_factory=list)  # $ levels: one warning (+ W&B alert) each
    alert_fractions: List[float] = field(default_factory=list)  # of budget_usd, e.g. [0.5, 0.8, 1.0]: alerts too
    # Gap between attempts billed at most this long: -1 = the whole gap (capacity stays paid while
    # a job is requeued), 0 = none (elastic capacity: nothing is paid between attempts).
    max_gap_billed_s: float = -1.0
    heartbeat_every_s: float = 30.0  # rank 0 rewrites RUN_DIR/heartbeat.json at most this often
    projection_warmup_steps: int = 10  # steps of an attempt before its projection is trusted
    target_tokens: int = 0  # project to this many tokens; 0 = to trainer.max_steps


@dataclass
class HealthConfig:
    imds_endpoint: str = "http://169.254.169.254"
    preemption_deadline_s: float = 110.0
    # docs/resilience.md describes each knob; health/ takes this section duck-typed.
    preflight: str = "quick"  # off | quick | deep: node check before training (exit 76 when unhealthy)
    expected_gpus: int = 0  # GPUs per node preflight requires; 0 = cluster.accelerators_per_node (0: any)
    imds_interval_s: float = 5.0  # spot-notice poll period (AWS recommends 5 s)
    imds_timeout_s: float = 0.5  # per IMDS request; the first failure turns the watcher off
    act_on_rebalance: bool = False  # treat an EC2 rebalance recommendation like a spot notice
    nvml_interval_s: float = 30.0  # GPU health poll period; 0 = off
    ecc_uncorrected_max: int = 0  # volatile uncorrected ECC errors tolerated before exit 76
    temp_warn_c: float = 87.0
    pcie_replay_warn_delta: int = 100  # PCIe replays between two polls that warn
    nvlink_error_warn_delta: int = 100  # NVLink CRC/replay errors between two polls that warn
    xid_actions: Dict[str, str] = field(default_factory=dict)  # {"xid": ignore|warn|checkpoint_exit_76}
    hang_timeout_s: float = 1800.0  # no step for this long: dump stacks, exit 78; 0 = off
    straggler_every: int = 50  # gather per-rank step times every N steps; 0 = off
    straggler_threshold: float = 1.2  # rank median / median of medians
    straggler_windows: int = 5  # m: windows remembered
    straggler_min_slow: int = 3  # k: windows over the threshold before a rank is named
    nan_max_skips: int = 3  # consecutive non-finite steps skipped before on_exhausted
    nan_on_exhausted: str = "rollback"  # rollback (to the last committed checkpoint) | stop
    nan_max_rollbacks: int = 3  # rollbacks per process before the guard stops instead (exit 1)
    # Fault injection for drills and tests: the loss of these (1-based) steps is made NaN.
    fault_inject_nan_steps: List[int] = field(default_factory=list)
    fault_inject_rank: int = 0  # the rank that hangs or straggles below
    fault_inject_hang_step: int = 0  # that rank sleeps forever before this step (0 = off)
    fault_inject_slow_s: float = 0.0  # that rank sleeps this long every step (a straggler)


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
    # Alerts (train/alerts.py) as a JSON POST {"text": ...} (Slack-compatible) to this URL; "" = off.
    alert_webhook: str = ""


@dataclass
class NeuronConfig:
    """``trainer.device=neuron`` (and its launch templates); train/neuron_env.py, docs/backends.md."""

    compile_cache: str = ""  # "" = <run dir>/neuron-compile-cache; a path or s3://bucket/prefix
    cc_flags: str = ""  # more neuronx-cc flags, after --model-type=transformer --auto-cast=none
    precompile_steps: int = 10  # launch: steps of the neuron_parallel_compile trial run; 0 = none


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
