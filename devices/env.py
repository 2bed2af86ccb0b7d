"""One environment variable a backend wants set, and why: the record of the Neuron plan
(devices/neuron_env.py) and of the EFA/NCCL plan (parallelism/efa.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvSetting:
    key: str
    value: str
    reason: str
