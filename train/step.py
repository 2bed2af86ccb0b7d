"""One optimizer step: micro-batches forward/backward (gradient accumulation), clip, step.

``StepInputs`` is what the loop hands an engine each step; ``accumulate`` (the micro-batch loop)
and ``finish_step`` (the non-finite guard's tail) are shared by every engine (``train/engine.py``);
``train_step`` is the FSDP2 engine's step (plain models at world size 1 too)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from moe.balance import update_expert_bias
from parallelism.parallelize import clip_grad_norm, grad_norm as total_grad_norm
from devices.runtime import Runtime
from train.optim import can_fold_clip, fold_clip, unfold_clip


@dataclass
class StepResult:
    loss: torch.Tensor  # mean cross-entropy over this rank's tokens (device scalar, no sync)
    aux_loss: torch.Tensor  # MoE auxiliary losses, averaged over micro-batches
    grad_norm: torch.Tensor
    data_wait_s: float
    verdict: str = "ok"  # the non-finite guard's: ok | skip | rollback | stop (no update unless ok)
    kd_loss: torch.Tensor | None = None  # distillation term, averaged over micro-batches (distill.teacher)


def _lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(0, 1))


_compiled_lm_loss = None


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy in fp32. ``compiled`` (on CUDA, with compiled blocks): one fused kernel
    reads the bf16 logits instead of materialising an fp32 copy of ``[B, T, V]`` and its gradient."""
    global _compiled_lm_loss
    if not (compiled and logits_BTV.is_cuda):
        return _lm_loss(logits_BTV, targets_BT)
    if _compiled_lm_loss is None:
        _compiled_lm_loss = torch.compile(_lm_loss)
    return _compiled_lm_loss(logits_BTV, targets_BT)


def next_micro_batch(micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                     runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The next (inputs, targets) on the device, and the seconds spent waiting for them."""
    t0 = time.perf_counter()
    inputs_BT, targets_BT = next(micro_batches)
    inputs_BT = inputs_BT.to(runtime.device, non_blocking=True)
    targets_BT = targets_BT.to(runtime.device, non_blocking=True)
    return inputs_BT, targets_BT, time.perf_counter() - t0


@dataclass
class StepInputs:
    """What one optimizer step takes from the loop (the model, optimizer, clip and bias rate belong
    to the engine, which holds them for the whole run)."""

    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # this rank's (inputs_BT, targets_BT)
    n_micro: int  # gradient-accumulation count: micro-batches consumed by this step
    # Called just before the parameters change: an async checkpoint must finish staging first.
    before_optimizer_step: Callable[[], None] | None = None
    # The non-finite guard: global grad norm -> ok | skip | rollback | stop (no update unless ok).
    guard: Callable[[torch.Tensor], str] | None = None
    poison: bool = False  # fault injection (health.fault_inject_nan_steps): a NaN loss this step
    # Distillation (train/distill/step.py): (logits_BTV, inputs_BT, lm_loss) -> (objective, kd_loss).
    kd: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Accumulated:
    """The forward/backward half of a step: sums over the micro-batches, gradients in place."""

    loss_sum: torch.Tensor
    aux_sum: torch.Tensor
    data_wait_s: float
    n_micro: int
    kd_sum: torch.Tensor | None = None

    def result(self, grad_norm: torch.Tensor, verdict: str) -> StepResult:
        return StepResult(self.loss_sum / self.n_micro, self.aux_sum / self.n_micro, grad_norm, self.data_wait_s,
                          verdict, None if self.kd_sum is None else self.kd_sum / self.n_micro)


def accumulate(inputs: StepInputs, runtime: Runtime,
               forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               backward: Callable[[torch.Tensor, int], None], compiled_loss: bool = False) -> Accumulated:
    """The micro-batch loop every engine shares: fetch, ``forward(inputs_BT) -> (logits, aux)``,
    loss, ``backward(loss + aux, i)`` (the engine scales by the accumulation count its own way)."""
    loss_sum = torch.zeros((), device=runtime.device)
    aux_sum = torch.zeros((), device=runtime.device)
    kd_sum = None if inputs.kd is None else torch.zeros((), device=runtime.device)
    data_wait = 0.0
    for i in range(inputs.n_micro):
        inputs_BT, targets_BT, wait_s = next_micro_batch(inputs.micro_batches, runtime)
        data_wait += wait_s
        logits_BTV, aux = forward(inputs_BT)
        loss = lm_loss(logits_BTV, targets_BT, compiled_loss)
        if inputs.poison:  # fault injection (health.fault_inject_nan_steps): drills of the NaN guard
            loss = loss * float("nan")
        objective = loss
        if inputs.kd is not None:
            objective, kd_loss = inputs.kd(logits_BTV, inputs_BT, loss)
            kd_sum += kd_loss.detach()
        backward(objective + aux, i)
        loss_sum += loss.detach()
        aux_sum += aux.float().detach()
        runtime.sync()  # XLA: one traced graph per micro-batch, whatever the accumulation count
    return Accumulated(loss_sum, aux_sum, data_wait, inputs.n_micro, kd_sum)


def finish_step(model: torch.nn.Module, inputs: StepInputs, acc: Accumulated, grad_norm: torch.Tensor,
                runtime: Runtime, *, apply_update: Callable[[], None], discard: Callable[[], None],
                bias_update_rate: float, reduce_counts: Callable[[torch.Tensor], None] | None) -> StepResult:
    """The guard tail every engine shares. The guard reads the global grad norm (the same on every
    rank, so every rank decides alike): the step's one host synchronisation. On ``ok``
    ``apply_update`` runs and the expert bias moves; otherwise ``discard`` drops the gradients and
    this step's expert-load counts are dropped with the bias unchanged."""
    verdict = inputs.guard(grad_norm) if inputs.guard is not None else "ok"
    if verdict != "ok":
        discard()
        update_expert_bias(model, 0.0, reduce_fn=None)  # drop this step's counts, bias unchanged
    else:
        apply_update()
        # Once per optimizer step, outside autograd; rate 0 still snapshots the counts for the stats.
        update_expert_bias(model, bias_update_rate, reduce_fn=reduce_counts)
    # XLA: the optimizer step and the bias update as one graph.
    runtime.sync()
    return acc.result(grad_norm, verdict)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: StepInputs, runtime: Runtime,
               grad_clip: float, bias_update_rate: float,
               reduce_counts: Callable[[torch.Tensor], None] | None = None,
               compiled_loss: bool = False) -> StepResult:
    """One optimizer step of a plain or FSDP2-wrapped model (``train.fsdp_engine.FSDP2Engine.step``)."""
    model.train()
    n_micro = inputs.n_micro

    def forward(inputs_BT):
        with runtime.autocast():
            return model(inputs_BT)

    def backward(total, _i):
        # Every micro-batch has the same number of tokens, so averaging the per-micro-batch means
        # gives the mean over the global batch slice this rank holds.
        (total / n_micro).backward()

    acc = accumulate(inputs, runtime, forward, backward, compiled_loss)
    params = [p for p in model.parameters() if p.grad is not None]
    # Works for plain tensors and for DTensors on different meshes (experts under EP). With fused
    # AdamW on plain tensors the clip is folded into the optimizer kernel (no extra pass).
    fold = grad_clip > 0 and can_fold_clip(optimizer, params)
    if grad_clip > 0 and not fold:
        grad_norm = clip_grad_norm(params, grad_clip)
    else:
        grad_norm = total_grad_norm(params)

    def apply_update():
        if inputs.before_optimizer_step is not None:
            # An async checkpoint must finish staging its copy before the parameters change; waiting
            # here (not right after the save) overlaps staging with this step's forward/backward.
            inputs.before_optimizer_step()
        if fold:
            fold_clip(optimizer, grad_norm, grad_clip)
        try:
            optimizer.step()  # on one XLA device: xm.optimizer_step minus the cross-replica all-reduce
        finally:
            unfold_clip(optimizer)
        optimizer.zero_grad(set_to_none=True)

    return finish_step(model, inputs, acc, grad_norm, runtime, apply_update=apply_update,
                       discard=lambda: optimizer.zero_grad(set_to_none=True), bias_update_rate=bias_update_rate,
                       reduce_counts=reduce_counts)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime,
             distributed: bool = False, compiled_loss: bool = False) -> float:
    """Mean validation cross-entropy over a fixed set of batches (one host sync). Distributed,
    each rank scores its equal share of the same fixed set and the means are averaged, so the
    value does not depend on the world size."""
    model.eval()
    total = torch.zeros((), device=runtime.device)
    for inputs_BT, targets_BT in batches:
        with runtime.autocast():
            logits_BTV, _ = model(inputs_BT.to(runtime.device))
        total += lm_loss(logits_BTV, targets_BT.to(runtime.device), compiled_loss)
        runtime.sync()
    model.train()
    mean = total / max(1, len(batches))
    if distributed:
        torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
    return mean.item()
