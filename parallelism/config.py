"""The ``parallel`` config section and its ``parallel.deepspeed`` subsection (docs/distributed.md,
docs/backends.md); rules in ``parallelism/validate.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

AC_POLICIES = ("full", "selective")  # trainer.ac_policy (parallelism/parallelize.py applies them)


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
    timeout_s: float = 600.0  # collectives
    init_timeout_s: float = 120.0  # process-group set-up (store + connect); past it: exit 1, restart
    engine: str = "fsdp2"  # fsdp2 | deepspeed (ZeRO 1-3; pip install -e '.[deepspeed]')
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
