"""AdamW and the learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int, schedule: str,
          min_lr_ratio: float, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based). Stateless, so resuming needs no
    scheduler state: the step alone says where the schedule is."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    if schedule == "wsd":
        # Warmup-stable-decay: flat until the last decay_fraction of the steps, then linear down.
        decay_start = max_steps - int(round(decay_fraction * max_steps))
        if step < decay_start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    raise ValueError(f"optim.schedule={schedule!r} must be one of cosine, linear, wsd, constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and 1-D tensors are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device_type: str, master_weights: bool = False) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; with ``master_weights`` (``optim.master_weights`` as
    ``train.master_weights.use_master_weights`` resolved it) the compute weights become bf16 first and
    ``MasterAdamW`` keeps their fp32 masters (``optim.fused`` is not read then)."""
    if master_weights:
        from train.master_adamw import MasterAdamW
        from train.master_weights import to_bf16_compute

        report = to_bf16_compute(model)
        return MasterAdamW(param_groups(model, cfg.weight_decay), report.masters, lr=cfg.lr,
                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    from train.config import switch

    fused = switch(cfg.fused) == "true" or (switch(cfg.fused) == "auto" and device_type == "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def can_fold_clip(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether gradient clipping can ride inside the optimizer kernel: fused AdamW divides every
    gradient by ``optimizer.grad_scale`` as it reads it (the hook AMP's GradScaler uses), so the
    clip costs no separate pass over the gradients. Plain tensors only: with DTensor parameters
    (FSDP2, EP) the scale would mix a plain tensor into DTensor ops, and the clip stays a foreach
    multiply."""
    from torch.distributed.tensor import DTensor

    fused = getattr(optimizer, "folds_clip", False) or all(g.get("fused") for g in optimizer.param_groups)
    return fused and not any(isinstance(p, DTensor) for p in params)


def fold_clip(optimizer: torch.optim.Optimizer, total_norm: torch.Tensor, max_norm: float) -> None:
    """Arm the next ``optimizer.step()`` to scale gradients by ``min(1, max_norm / (norm + 1e-6))``
    (torch's clip_grad_norm_ coefficient), on device, without a host sync."""
    coef = (max_norm / (total_norm.float() + 1e-6)).clamp(max=1.0)
    if getattr(optimizer, "folds_clip", False):
        optimizer.clip_coef = coef  # train.master_adamw: multiplies each gradient as clip_grad_norm does
    else:
        optimizer.grad_scale = 1.0 / coef


def unfold_clip(optimizer: torch.optim.Optimizer) -> None:
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("clip_coef", None)
