"""The KD term of one micro-batch, for the train step: the teacher's forward (frozen, no_grad, on
the student's micro-batch) forms its logits chunk by chunk inside its own forward, and the loss
joins the student's graph with its closed-form gradient (``loss.py``)."""

from __future__ import annotations

from typing import Tuple

import torch

from train.distill.config import DistillConfig
from train.distill.loss import attach, kd_forward


def kd_term(student_logits_BTV: torch.Tensor, teacher: torch.nn.Module, inputs_BT: torch.Tensor,
            d: DistillConfig, autocast) -> torch.Tensor:
    """KD loss (fp32 scalar, mean over the micro-batch's tokens) attached to the student's logits."""
    logits_NV = student_logits_BTV.detach().flatten(0, 1)

    def head(h_BTD: torch.Tensor, w_VD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return kd_forward(logits_NV, h_BTD.flatten(0, 1), w_VD, d.temperature, d.top_k_logits, d.chunk_tokens)

    with torch.no_grad(), autocast():
        (loss, grad_NV), _ = teacher(inputs_BT, head=head)
    return attach(student_logits_BTV, loss, grad_NV.view_as(student_logits_BTV))


def combine(lm: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """The objective: ``(1 - alpha) * cross-entropy + alpha * KD``."""
    return (1.0 - alpha) * lm + alpha * kd


def teacher_forward_flops_per_token(teacher_cfg, seq_len: int) -> float:
    """The teacher's forward FLOPs per token: a third of its training FLOPs (forward + backward =
    3 x forward for matmuls and attention alike), so MFU and $/Mtok count the teacher too."""
    from model.flops import flops_per_token

    return flops_per_token(teacher_cfg, seq_len) / 3.0
