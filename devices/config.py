"""The ``neuron`` section: settings for ``trainer.device=neuron`` (devices/neuron_env.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NeuronConfig:
    """``trainer.device=neuron`` (and its launch templates); devices/neuron_env.py, docs/backends.md."""

    compile_cache: str = ""  # "" = <run dir>/neuron-compile-cache; a path or s3://bucket/prefix
    cc_flags: str = ""  # more neuronx-cc flags, after --model-type=transformer --auto-cast=none
    precompile_steps: int = 10  # launch: steps of the neuron_parallel_compile trial run; 0 = none
