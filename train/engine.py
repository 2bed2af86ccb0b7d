"""The engine seam: who owns the model's parallel layout, its optimizer step and its checkpoint state.

The trainer builds one engine from ``parallel.engine`` and then only calls it; it never asks which
one it has. Two implementations:

- ``fsdp2`` (:class:`train.fsdp_engine.FSDP2Engine`): ``parallelism.parallelize`` (EP -> activation
  checkpointing -> compile -> FSDP2), our clip and AdamW, DCP checkpoints that reshard.
- ``deepspeed`` (:class:`train.deepspeed_step.DeepSpeedEngine`): ZeRO around our model and AdamW
  (``parallelism.deepspeed_engine``), DeepSpeed's clip, reduction and checkpoint files.

Contract shared by every engine:

- ``build(model, cfg, ctx, runtime, micro, n_micro)`` takes the model built on the ``meta`` device
  and returns the engine with the model parallelised and materialised from ``trainer.seed`` (the
  same weights on every engine and world size), and ``optimizer`` built from ``optim.*``;
- ``model`` is our ``Transformer`` (never a wrapper): the trainer hooks it, evaluates it, reads its
  routing stats and checks it for non-finite values;
- ``optimizer``'s ``param_groups`` take the LR the trainer writes before every step;
- ``step(StepInputs)`` consumes exactly ``inputs.n_micro`` micro-batches, calls
  ``inputs.before_optimizer_step`` before the parameters change, asks ``inputs.guard`` about the
  global gradient norm (the same on every rank) and updates nothing unless it says ``ok``; it moves
  the expert bias once per applied step, summing the expert-load counts over the data-parallel ranks;
- ``checkpoint_state()`` is what ``CheckpointManager.save``/``load_latest`` take: a dict of DCP
  Stateful objects (``checkpointing.state.AppState``) or a ``checkpointing.engine_state.EngineState``
  (an engine's own file format inside our step directory);
- ``compiled_loss`` says whether the loss is compiled too (with compiled blocks): ``evaluate`` uses it.
"""

from __future__ import annotations

from typing import Any, Dict, Protocol, runtime_checkable

import torch

from devices.runtime import Runtime
from train.config import TrainConfig
from train.step import StepInputs, StepResult

__all__ = ["Engine", "ENGINES", "build_engine"]


@runtime_checkable
class Engine(Protocol):
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    compiled_loss: bool

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, ctx: Any, runtime: Runtime, micro: int,
              n_micro: int) -> "Engine":
        """Parallelise and materialise ``model`` (built on ``meta``), build the optimizer."""
        ...

    def step(self, inputs: StepInputs) -> StepResult:
        """One optimizer step over ``inputs.n_micro`` micro-batches (collective)."""
        ...

    def checkpoint_state(self) -> Any:
        """The state ``CheckpointManager`` saves and loads: dict of Stateful, or an EngineState."""
        ...


def _fsdp2() -> type:
    from train.fsdp_engine import FSDP2Engine

    return FSDP2Engine


def _deepspeed() -> type:
    from train.deepspeed_step import DeepSpeedEngine  # imports deepspeed only when built

    return DeepSpeedEngine


# parallel.engine -> the engine class (imported on first use).
ENGINES: Dict[str, Any] = {"fsdp2": _fsdp2, "deepspeed": _deepspeed}


def build_engine(model: torch.nn.Module, cfg: TrainConfig, ctx: Any, runtime: Runtime, micro: int,
                 n_micro: int) -> Engine:
    """The engine ``parallel.engine`` names, built around ``model`` (on ``meta``)."""
    try:
        engine_cls = ENGINES[cfg.parallel.engine]()
    except KeyError:
        raise ValueError(f"parallel.engine={cfg.parallel.engine!r} must be one of {tuple(ENGINES)}") from None
    return engine_cls.build(model, cfg, ctx, runtime, micro, n_micro)
