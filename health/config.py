"""The ``health`` config section (docs/resilience.md has every knob); rules in ``health/validate.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class HealthConfig:
    imds_endpoint: str = "http://169.254.169.254"
    preemption_deadline_s: float = 110.0
    # docs/resilience.md describes each knob.
    preflight: str = "quick"  # off | quick | deep: node check before training (ExitCode.UNHEALTHY when unhealthy)
    expected_gpus: int = 0  # GPUs per node preflight requires; 0 = cluster.accelerators_per_node (0: any)
    imds_interval_s: float = 5.0  # spot-notice poll period (AWS recommends 5 s)
    imds_timeout_s: float = 0.5  # per IMDS request; 3 failed tries (with backoff) turn IMDS off, loudly
    act_on_rebalance: bool = False  # treat an EC2 rebalance recommendation like a spot notice
    nvml_interval_s: float = 30.0  # GPU health poll period; 0 = off
    ecc_uncorrected_max: int = 0  # volatile uncorrected ECC errors tolerated before ExitCode.UNHEALTHY
    temp_warn_c: float = 87.0
    pcie_replay_warn_delta: int = 100  # PCIe replays between two polls that warn
    nvlink_error_warn_delta: int = 100  # NVLink CRC/replay errors between two polls that warn
    xid_actions: Dict[str, str] = field(default_factory=dict)  # {"xid": ignore|warn|checkpoint_exit_76}
    hang_timeout_s: float = 1800.0  # no step for this long: dump stacks, ExitCode.HANG; 0 = off
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
    fault_inject_raise_step: int = 0  # that rank raises RuntimeError before this step (0 = off)
