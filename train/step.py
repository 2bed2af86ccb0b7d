"""One optimizer step: micro-batches forward/backward (gradient accumulation), clip, step."""

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


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n_micro: int,
    runtime: Runtime,
    grad_clip: float,
    bias_update_rate: float,
    reduce_counts: Callable[[torch.Tensor], None] | None = None,
    before_optimizer_step: Callable[[], None] | None = None,
    guard: Callable[[torch.Tensor], str] | None = None,
    poison: bool = False,
) -> StepResult:
    model.train()
    compiled = getattr(model, "blocks_compiled", False)
    loss_sum = torch.zeros((), device=runtime.device)
    aux_sum = torch.zeros((), device=runtime.device)
    data_wait = 0.0
    for _ in range(n_micro):
        inputs_BT, targets_BT, wait_s = next_micro_batch(micro_batches, runtime)
        data_wait += wait_s
        with runtime.autocast():
            logits_BTV, aux = model(inputs_BT)
        loss = lm_loss(logits_BTV, targets_BT, compiled)
        if poison:  # fault injection (health.fault_inject_nan_steps): drills of the NaN guard
            loss = loss * float("nan")
        # Every micro-batch has the same number of tokens, so averaging the per-micro-batch means
        # gives the mean over the global batch slice this rank holds.
        ((loss + aux) / n_micro).backward()
        loss_sum += loss.detach()
        aux_sum += aux.detach()
        runtime.sync()  # XLA: one traced graph per micro-batch, whatever the accumulation count
    params = [p for p in model.parameters() if p.grad is not None]
    # Works for plain tensors and for DTensors on different meshes (experts under EP). With fused
    # AdamW on plain tensors the clip is folded into the optimizer kernel (no extra pass).
    fold = grad_clip > 0 and can_fold_clip(optimizer, params)
    if grad_clip > 0 and not fold:
        grad_norm = clip_grad_norm(params, grad_clip)
    else:
        grad_norm = total_grad_norm(params)
    # The guard reads the global grad norm (the same on every rank, so every rank decides alike):
    # the step's one host synchronisation. A non-finite loss makes the gradients non-finite too.
    verdict = guard(grad_norm) if guard is not None else "ok"
    if verdict != "ok":
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model, 0.0, reduce_fn=None)  # drop this step's counts, bias unchanged
        runtime.sync()
        return StepResult(loss_sum / n_micro, aux_sum / n_micro, grad_norm, data_wait, verdict)
    if before_optimizer_step is not None:
        # An async checkpoint must finish staging its copy before the parameters change; waiting
        # here (not right after the save) overlaps staging with this step's forward/backward.
        before_optimizer_step()
    if fold:
        fold_clip(optimizer, grad_norm, grad_clip)
    try:
        optimizer.step()
    finally:
        unfold_clip(optimizer)
    optimizer.zero_grad(set_to_none=True)
    # Once per optimizer step, outside autograd; rate 0 still snapshots the counts for the stats.
    update_expert_bias(model, bias_update_rate, reduce_fn=reduce_counts)
    # XLA: the optimizer step and the bias update as one graph. On one device optimizer.step() is
    # what xm.optimizer_step does minus the cross-replica gradient all-reduce.
    runtime.sync()
    return StepResult(loss_sum / n_micro, aux_sum / n_micro, grad_norm, data_wait, verdict)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime,
             distributed: bool = False) -> float:
    """Mean validation cross-entropy over a fixed set of batches (one host sync). Distributed,
    each rank scores its equal share of the same fixed set and the means are averaged, so the
    value does not depend on the world size."""
    model.eval()
    total = torch.zeros((), device=runtime.device)
    for inputs_BT, targets_BT in batches:
        with runtime.autocast():
            logits_BTV, _ = model(inputs_BT.to(runtime.device))
        total += lm_loss(logits_BTV, targets_BT.to(runtime.device), getattr(model, "blocks_compiled", False))
        runtime.sync()
    model.train()
    mean = total / max(1, len(batches))
    if distributed:
        torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
    return mean.item()
