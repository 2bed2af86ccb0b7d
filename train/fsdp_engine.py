"""``parallel.engine=fsdp2`` (the default): ``parallelism.parallelize`` around our model, our clip and
AdamW in ``train.step.train_step``, DCP checkpoints that reshard across world sizes."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch

from model.fp8 import Fp8Report, convert_to_fp8
from parallelism.parallelize import ParallelizeResult
from parallelism.process_group import DistContext
from devices.runtime import Runtime
from train.config import TrainConfig, TrainerConfig
from train.init_from import init_from_pretrained
from train.master_weights import mode, use_master_weights
from train.optim import build_optimizer
from train.step import StepInputs, StepResult, train_step

log = logging.getLogger("moeforge")


def convert_precision(model: torch.nn.Module, trainer_cfg: TrainerConfig, device: torch.device,
                      ctx: DistContext) -> Optional[Fp8Report]:
    """``trainer.precision=fp8``: the fp8 surgery (model/fp8.py) on the meta-built model, before
    ``parallelize``; logs and returns its report (None for other precisions). FSDP2 all-gathers the
    fp8 weights in fp8 where torchao supports it (tensorwise, more than one rank)."""
    if trainer_cfg.precision != "fp8":
        return None
    from compat.torch_compat import cuda_capability

    capability = cuda_capability(device) if device.type == "cuda" else None
    report = convert_to_fp8(model, trainer_cfg.fp8, capability=capability, fsdp_float8_all_gather=ctx.world_size > 1)
    if ctx.rank == 0:
        log.info("%s; kept in bf16: %s", report.summary(), sorted(set(report.kept.values())))
    return report


class FSDP2Engine:
    """An :class:`train.engine.Engine`: the model as ``parallelize`` left it (plain at world size 1)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, *,
                 grad_clip: float, bias_update_rate: float,
                 reduce_counts: Optional[Callable[[torch.Tensor], None]] = None,
                 parallel: Optional[ParallelizeResult] = None):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        self.grad_clip, self.bias_update_rate, self.reduce_counts = grad_clip, bias_update_rate, reduce_counts
        self.parallel = parallel
        self.compiled_loss = parallel is not None and parallel.blocks_compiled

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, ctx: Any, runtime: Runtime, micro: int,
              n_micro: int) -> "FSDP2Engine":
        from parallelism.expert_parallel import make_count_reducer
        from parallelism.parallelize import parallelize

        t = cfg.trainer
        convert_precision(model, t, runtime.device, ctx)  # trainer.precision=fp8: before compile and FSDP
        fsdp_bf16 = ctx.world_size > 1 and runtime.amp_dtype is not None
        parallel = parallelize(model, cfg.parallel, ctx, runtime.device_type,
                               param_dtype=runtime.amp_dtype if fsdp_bf16 else None,
                               activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                               ac_policy=t.ac_policy, ac_every=t.ac_every)
        model.init_weights(t.seed, device=runtime.init_device)
        init_from_pretrained(model, cfg)  # model.init_from / init_from_dense: each rank its shards
        if runtime.init_device != runtime.device:
            model.to(runtime.device)  # XLA: initialised on CPU, then moved (devices/xla.py)
        masters = use_master_weights(cfg, ctx.world_size, n_micro, runtime.device_type,
                                     runtime.amp_dtype == torch.bfloat16)
        if ctx.rank == 0:
            log.info("optim.master_weights=%s: %s", mode(cfg.optim.master_weights),
                     "bf16 compute weights, fp32 masters in the optimizer" if masters else "fp32 parameters")
        optimizer = build_optimizer(model, cfg.optim, runtime.device_type, master_weights=masters)
        reduce_counts = make_count_reducer(parallel.meshes.dp_group) if ctx.distributed else None
        return cls(model, optimizer, runtime, grad_clip=t.grad_clip, bias_update_rate=cfg.model.moe.bias_update_rate,
                   reduce_counts=reduce_counts, parallel=parallel)

    def step(self, inputs: StepInputs) -> StepResult:
        return train_step(self.model, self.optimizer, inputs, self.runtime, self.grad_clip, self.bias_update_rate,
                          self.reduce_counts, compiled_loss=self.compiled_loss)

    def checkpoint_state(self) -> Dict[str, Any]:
        from checkpointing.state import AppState

        return {"app": AppState(self.model, self.optimizer)}
