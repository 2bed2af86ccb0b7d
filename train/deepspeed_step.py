"""``parallel.engine=deepspeed``: an :class:`train.engine.Engine` over a DeepSpeed engine. The same
contract as :class:`train.fsdp_engine.FSDP2Engine` (same ``StepInputs``, same ``StepResult``, the
same micro-batch loop and guard tail from ``train.step``), DeepSpeed doing the reduction, clipping
and update (``parallelism.deepspeed_engine`` says who does what)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from devices.runtime import Runtime
from train.config import TrainConfig
from train.init_from import init_from_pretrained
from train.step import StepInputs, StepResult, accumulate, finish_step


class DeepSpeedEngine:
    """``ds_engine`` is DeepSpeed's (its config carries ``gradient_accumulation_steps=n_micro`` and
    ``gradient_clipping=trainer.grad_clip``); ``optimizer`` its ZeRO optimizer, whose param groups
    take our LR; ``model`` our Transformer inside it."""

    compiled_loss = False  # trainer.compile is refused with this engine (train.validate)

    def __init__(self, ds_engine: Any, optimizer: Any, runtime: Runtime, rank: int, world_size: int, *,
                 bias_update_rate: float, reduce_counts: Optional[Callable[[torch.Tensor], None]] = None):
        self.ds_engine, self.optimizer, self.runtime = ds_engine, optimizer, runtime
        self.model = ds_engine.module  # hooks, routing stats, evaluation: our Transformer
        self.rank, self.world_size = rank, world_size
        self.bias_update_rate, self.reduce_counts = bias_update_rate, reduce_counts

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, ctx: Any, runtime: Runtime, micro: int,
              n_micro: int) -> "DeepSpeedEngine":
        """ZeRO around our model and optimizer: the full model is materialised from the seed on every
        rank (as FSDP2's would be), then DeepSpeed partitions it (docs/backends.md)."""
        from parallelism.deepspeed_engine import deepspeed_config, initialize
        from parallelism.expert_parallel import make_count_reducer
        from parallelism.parallelize import apply_activation_checkpointing
        from train.optim import build_optimizer

        t = cfg.trainer
        if t.activation_checkpointing:
            apply_activation_checkpointing(model, t.ac_policy, t.ac_every)
        model.init_weights(t.seed, device=runtime.device)
        init_from_pretrained(model, cfg)  # before DeepSpeed copies the weights into its master copy
        optimizer = build_optimizer(model, cfg.optim, runtime.device_type)
        config = deepspeed_config(cfg.parallel.deepspeed, global_batch_size=t.global_batch_size,
                                  micro_batch_size=micro, grad_accum=n_micro, grad_clip=t.grad_clip,
                                  bf16=runtime.amp_dtype == torch.bfloat16)
        ds_engine, zero_optimizer = initialize(model, optimizer, config, runtime.device_type, cfg.parallel.backend,
                                               ctx.local_rank)
        # Every rank is data-parallel: expert-load counts are summed over the whole world.
        reduce_counts = make_count_reducer(None) if ctx.distributed else None
        return cls(ds_engine, zero_optimizer, runtime, ctx.rank, ctx.world_size,
                   bias_update_rate=cfg.model.moe.bias_update_rate, reduce_counts=reduce_counts)

    def step(self, inputs: StepInputs) -> StepResult:
        """No autocast: with bf16 DeepSpeed holds the module in bf16 itself (fp32 master weights in
        the ZeRO optimizer), and in fp32 there is nothing to cast."""
        engine, n_micro = self.ds_engine, inputs.n_micro
        engine.train()

        def backward(total, i):
            # DeepSpeed divides by gradient_accumulation_steps itself: the sum over micro-batches is
            # the mean over this rank's slice, as in train_step.
            engine.backward(total)
            if i < n_micro - 1:
                engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter

        acc = accumulate(inputs, self.runtime, engine, backward)
        if inputs.before_optimizer_step is not None:
            inputs.before_optimizer_step()
        # The boundary: reduce (ZeRO-1) / finish reducing (ZeRO-2/3), clip, AdamW, zero the grads.
        # DeepSpeed skips the update (and zeroes the grads) when the global grad norm is not finite,
        # and then reports it as inf: the guard only decides what comes next.
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()
        return finish_step(self.model, inputs, acc, grad_norm, self.runtime, apply_update=_nothing,
                           discard=_nothing, bias_update_rate=self.bias_update_rate,
                           reduce_counts=self.reduce_counts)

    def checkpoint_state(self):
        """DeepSpeed's own files, inside our step directory."""
        from checkpointing.engine_state import DeepSpeedState

        return DeepSpeedState(self.ds_engine, self.rank, self.world_size)


def _nothing() -> None:
    """DeepSpeed has already stepped (or skipped) and zeroed the gradients at its boundary."""
