"""The distillation loss, as pure functions.

``KL(p_t || p_s)`` at temperature ``T`` (``p = softmax(z / T)``), times ``T**2`` so its gradient keeps
the scale of the cross-entropy's as ``T`` changes (Hinton et al., 2015); the mean over tokens. With
``top_k > 0`` the target is sparse: the teacher's ``k`` largest logits, softmax-renormalised over
those ``k`` (``q``), against the student's full-vocabulary log-probabilities at the same ids:
``sum_i q_i (log q_i - log p_s,i)``, which still penalises student mass outside the teacher's top-k.

Memory: the teacher's full logits never exist. :func:`kd_forward` takes the teacher's final hidden
states and head weight and, chunk by chunk over the tokens, forms one chunk of teacher logits in
fp32, the loss and its gradient w.r.t. the student's logits (``T * (p_s - q)`` per token, closed
form), written into one buffer in the student logits' dtype. :func:`attach` then hands that
gradient to autograd, so nothing of the teacher and no fp32 copy of the student's logits is kept for
the backward.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def kd_targets(teacher_logits_NV: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """The target distribution ``q`` [N, V] in fp32: the teacher's softmax at ``temperature``, or its
    top-``k`` renormalised (zeros elsewhere)."""
    z_NV = teacher_logits_NV.float() / temperature
    if top_k <= 0 or top_k >= z_NV.shape[-1]:
        return torch.softmax(z_NV, dim=-1)
    vals_NK, ids_NK = z_NV.topk(top_k, dim=-1)
    return torch.zeros_like(z_NV).scatter_(-1, ids_NK, torch.softmax(vals_NK, dim=-1))


def kd_chunk(student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, temperature: float,
             top_k: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over the N tokens, its gradient w.r.t. the student's logits), both fp32."""
    T = float(temperature)
    q_NV = kd_targets(teacher_logits_NV, T, top_k)
    logp_NV = torch.log_softmax(student_logits_NV.float() / T, dim=-1)
    # q log q with 0 log 0 = 0 (the sparse target's zeros, and underflowed probabilities).
    plogp = torch.where(q_NV > 0, q_NV * torch.log(q_NV.clamp_min(1e-38)), 0.0)
    loss = (T * T) * (plogp - q_NV * logp_NV).sum()
    # d/dz_s of T^2 * sum q (log q - log softmax(z_s / T)) = T * (softmax(z_s / T) - q): sum(q) = 1.
    grad_NV = T * (logp_NV.exp() - q_NV)
    return loss, grad_NV


def kd_reference(student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, temperature: float,
                 top_k: int = 0) -> torch.Tensor:
    """The direct formula, differentiable (tests): ``T^2 * mean_tokens KL(q || p_s)``."""
    T = float(temperature)
    q_NV = kd_targets(teacher_logits_NV, T, top_k)
    logp_NV = F.log_softmax(student_logits_NV.float() / T, dim=-1)
    kl_N = (torch.special.xlogy(q_NV, q_NV) - q_NV * logp_NV).sum(-1)
    return T * T * kl_N.mean()


@torch.no_grad()
def kd_forward(student_logits_NV: torch.Tensor, teacher_h_ND: torch.Tensor, teacher_w_VD: torch.Tensor,
               temperature: float, top_k: int = 0, chunk_tokens: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean KD loss over the N tokens and its gradient w.r.t. ``student_logits_NV`` (in their dtype),
    forming the teacher's logits ``h @ w.T`` one chunk of tokens at a time."""
    N = student_logits_NV.shape[0]
    grad_NV = torch.empty_like(student_logits_NV)
    total = torch.zeros((), dtype=torch.float32, device=student_logits_NV.device)
    for s in range(0, N, max(1, chunk_tokens)):
        e = min(N, s + chunk_tokens)
        teacher_cV = teacher_h_ND[s:e].to(teacher_w_VD.dtype) @ teacher_w_VD.t()  # the teacher's precision
        loss_c, grad_cV = kd_chunk(student_logits_NV[s:e], teacher_cV, temperature, top_k)
        total += loss_c
        grad_NV[s:e] = (grad_cV / N).to(grad_NV.dtype)
    return total / N, grad_NV


class _Attach(torch.autograd.Function):
    """``loss`` as a function of ``logits`` whose gradient was computed in the forward."""

    @staticmethod
    def forward(ctx, logits, loss, grad):
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (g * grad).to(grad.dtype), None, None


def attach(student_logits_NV: torch.Tensor, loss: torch.Tensor, grad_NV: torch.Tensor) -> torch.Tensor:
    """The KD loss in the student's graph: its backward adds ``grad_NV`` (scaled) to the logits' grad."""
    return _Attach.apply(student_logits_NV, loss, grad_NV)
