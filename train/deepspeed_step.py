"""One optimizer step through a DeepSpeed engine (``parallel.engine=deepspeed``): the same contract
as ``train.step.train_step`` (same arguments, same ``StepResult``), DeepSpeed doing the reduction,
clipping and update."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from moe.balance import update_expert_bias
from devices.runtime import Runtime
from train.step import StepResult, lm_loss, next_micro_batch


def deepspeed_train_step(
    engine: torch.nn.Module,
    optimizer,
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
    """``engine`` is the DeepSpeed engine (its config carries ``gradient_accumulation_steps=n_micro``
    and ``gradient_clipping=grad_clip``; ``optimizer`` is unused: the engine steps its own).

    No autocast: with bf16 DeepSpeed holds the module in bf16 itself (fp32 master weights in the
    ZeRO optimizer), and in fp32 there is nothing to cast."""
    engine.train()
    model = engine.module
    loss_sum = torch.zeros((), device=runtime.device)
    aux_sum = torch.zeros((), device=runtime.device)
    data_wait = 0.0
    for i in range(n_micro):
        inputs_BT, targets_BT, wait_s = next_micro_batch(micro_batches, runtime)
        data_wait += wait_s
        logits_BTV, aux = engine(inputs_BT)
        loss = lm_loss(logits_BTV, targets_BT)
        if poison:  # fault injection (health.fault_inject_nan_steps): drills of the NaN guard
            loss = loss * float("nan")
        # DeepSpeed divides by gradient_accumulation_steps itself: the sum over micro-batches is
        # the mean over this rank's slice, as in train_step.
        engine.backward(loss + aux)
        loss_sum += loss.detach()
        aux_sum += aux.float().detach()
        if i < n_micro - 1:
            engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
    if before_optimizer_step is not None:
        before_optimizer_step()
    # The boundary: reduce (ZeRO-1) / finish reducing (ZeRO-2/3), clip, AdamW, zero the grads.
    # DeepSpeed skips the update (and zeroes the grads) when the global grad norm is not finite,
    # and then reports it as inf: the guard below only decides what comes next.
    engine.step()
    norm = engine.get_global_grad_norm()
    grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()
    verdict = guard(grad_norm) if guard is not None else "ok"
    if verdict != "ok":
        update_expert_bias(model, 0.0, reduce_fn=None)  # drop this step's counts, bias unchanged
        return StepResult(loss_sum / n_micro, aux_sum / n_micro, grad_norm, data_wait, verdict)
    # Once per optimizer step, outside autograd; rate 0 still snapshots the counts for the stats.
    update_expert_bias(model, bias_update_rate, reduce_fn=reduce_counts)
    return StepResult(loss_sum / n_micro, aux_sum / n_micro, grad_norm, data_wait, verdict)
