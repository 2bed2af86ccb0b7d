"""The KD term of one micro-batch, for the train step: the teacher's forward (frozen, no_grad, on
the student's micro-batch) forms its logits chunk by chunk inside its own forward, and the loss
joins the student's graph with its closed-form gradient (``loss.py``)."""

from __future__ import annotations

import logging
from typing import Tuple

import torch

from train.distill.config import DistillConfig
from train.distill.loss import attach, kd_forward

log = logging.getLogger("moeforge")


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


def build_kd(cfg, ctx, runtime):
    """(the ``StepInputs.kd`` callable, the teacher's forward FLOPs per token) for ``cfg.distill``:
    the teacher is built (frozen, sharded like the student) and checked against the student's vocab."""
    from train.distill.config import check_teacher_vocab
    from train.distill.teacher import build_teacher, teacher_model_config

    d = cfg.distill
    opts = dict(cfg.checkpoint.storage_options or {})
    tcfg = teacher_model_config(d.teacher, opts)
    check_teacher_vocab(tcfg.vocab_size, cfg.model.vocab_size, d.teacher)
    teacher = build_teacher(tcfg, d.teacher, cfg.parallel, ctx, runtime, opts, compile=cfg.trainer.compile)
    from model.flops import total_params

    log.info("distill: teacher %s (%s, %.2fM params), alpha=%g, temperature=%g, top_k_logits=%d", d.teacher,
             tcfg.name, total_params(tcfg) / 1e6, d.alpha, d.temperature, d.top_k_logits)

    def kd(logits_BTV: torch.Tensor, inputs_BT: torch.Tensor, lm: torch.Tensor):
        k = kd_term(logits_BTV, teacher, inputs_BT, d, runtime.autocast)
        return combine(lm, k, d.alpha), k

    return kd, teacher_forward_flops_per_token(tcfg, cfg.trainer.seq_len)


def teacher_forward_flops_per_token(teacher_cfg, seq_len: int) -> float:
    """The teacher's forward FLOPs per token: a third of its training FLOPs (forward + backward =
    3 x forward for matmuls and attention alike), so MFU and $/Mtok count the teacher too."""
    from model.flops import flops_per_token

    return flops_per_token(teacher_cfg, seq_len) / 3.0
