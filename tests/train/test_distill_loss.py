"""train/distill/loss.py: the KD loss against the direct formula (full and top-k), the closed-form
gradient against autograd, chunking, and gradient reaching the student only."""

from __future__ import annotations

import pytest
import torch

from train.distill.loss import attach, kd_forward, kd_reference, kd_targets


def _logits(seed, N=6, V=11, scale=3.0):
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_full_vocab_formula(T):
    s, t = _logits(0), _logits(1)
    p_t = torch.softmax(t / T, -1)
    p_s = torch.softmax(s / T, -1)
    direct = T * T * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(kd_reference(s, t, T), direct)
    assert kd_reference(t, t, T).abs() < 1e-6  # KL(p || p) = 0


@pytest.mark.parametrize("T,k", [(1.0, 3), (2.0, 1), (1.5, 11)])
def test_top_k_formula(T, k):
    s, t = _logits(2), _logits(3)
    vals, ids = (t / T).topk(k, -1)
    q = torch.softmax(vals, -1)  # renormalised over the teacher's top-k
    logp_s = torch.log_softmax(s / T, -1).gather(-1, ids)  # the student's full-vocabulary log-probs
    direct = T * T * (q * (q.log() - logp_s)).sum(-1).mean()
    torch.testing.assert_close(kd_reference(s, t, T, top_k=k), direct)
    q_dense = kd_targets(t, T, k)
    assert torch.allclose(q_dense.sum(-1), torch.ones(6)) and int((q_dense > 0).sum(-1).max()) == k


@pytest.mark.parametrize("k,chunk", [(0, 4), (0, 100), (3, 1), (3, 5)])
def test_chunked_forward_and_closed_form_grad_match_autograd(k, chunk):
    T = 2.0
    s = _logits(4, N=13).requires_grad_()
    D = 7
    h = torch.randn(13, D, generator=torch.Generator().manual_seed(5))
    w = torch.randn(11, D, generator=torch.Generator().manual_seed(6))
    ref = kd_reference(s, h @ w.t(), T, k)
    ref.backward()
    loss, grad = kd_forward(s.detach(), h, w, T, k, chunk_tokens=chunk)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, s.grad)


def test_gradient_reaches_the_student_only():
    """Through attach(): the student's parameters get the KD gradient; the teacher's none."""
    torch.manual_seed(0)
    student = torch.nn.Linear(5, 11)
    teacher_body, teacher_head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 11, bias=False)
    x = torch.randn(8, 5)
    logits = student(x)
    with torch.no_grad():
        h = teacher_body(x)
    loss, grad = kd_forward(logits.detach(), h, teacher_head.weight, 2.0, 0)
    kd = attach(logits, loss, grad)
    (0.5 * kd).backward()
    assert all(p.grad is None for p in list(teacher_body.parameters()) + list(teacher_head.parameters()))
    # Same gradient as autograd through the direct formula.
    g_attach = student.weight.grad.clone()
    student.zero_grad()
    (0.5 * kd_reference(student(x), teacher_head(teacher_body(x)).detach(), 2.0)).backward()
    torch.testing.assert_close(g_attach, student.weight.grad)


def test_kd_term_through_a_real_teacher_matches_the_formula():
    """train/distill/step.kd_term: the teacher's head runs inside its forward (chunked), and the
    attached loss and gradient equal the direct formula on the teacher's full logits."""
    import contextlib

    from model.transformer import Transformer
    from tests.checkpointing.hf_helpers import family_cfg
    from train.distill.config import DistillConfig
    from train.distill.step import kd_term

    torch.manual_seed(0)
    student, teacher = Transformer(family_cfg("llama")), Transformer(family_cfg("qwen3"))
    student.init_weights(0)
    teacher.init_weights(1)
    teacher.requires_grad_(False).eval()
    tokens = torch.randint(0, 96, (2, 9))
    d = DistillConfig(teacher="x", temperature=2.0, top_k_logits=5, chunk_tokens=4)
    logits, _ = student(tokens)
    kd = kd_term(logits, teacher, tokens, d, contextlib.nullcontext)
    kd.backward()
    got = student.output.weight.grad.clone()
    student.zero_grad()
    logits, _ = student(tokens)
    ref = kd_reference(logits.flatten(0, 1), teacher(tokens)[0].flatten(0, 1), 2.0, 5)
    ref.backward()
    torch.testing.assert_close(kd.detach(), ref.detach())
    torch.testing.assert_close(got, student.output.weight.grad)
    assert all(p.grad is None for p in teacher.parameters())
