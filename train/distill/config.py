"""The ``distill:`` section (off while ``teacher`` is empty) and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ConfigError


@dataclass
class DistillConfig:
    # A Hugging Face directory (config.json + safetensors, local or s3://) or one of our run / step
    # directories (a committed checkpoint with the run's config.yaml); "" = no distillation.
    teacher: str = ""
    # loss = (1 - alpha) * cross-entropy + alpha * KD
    alpha: float = 0.5
    temperature: float = 1.0
    # 0 = KD over the full vocabulary; k = sparse KD on the teacher's top-k logits, renormalised.
    top_k_logits: int = 0
    # Tokens per chunk of teacher logits (the teacher's full [tokens, vocab] logits never exist).
    chunk_tokens: int = 1024


def validate_distill_config(d: DistillConfig) -> None:
    if not d.teacher:
        return
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={d.alpha} must be in [0, 1] (loss = (1 - alpha) * CE + alpha * KD)")
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature={d.temperature} must be > 0")
    if d.top_k_logits < 0:
        raise ConfigError(f"distill.top_k_logits={d.top_k_logits} must be >= 0 (0 = full vocabulary)")
    if d.chunk_tokens < 1:
        raise ConfigError(f"distill.chunk_tokens={d.chunk_tokens} must be >= 1")


def check_teacher_vocab(teacher_vocab: int, student_vocab: int, teacher: str) -> None:
    if teacher_vocab != student_vocab:
        raise ConfigError(f"distill.teacher={teacher} has vocab_size={teacher_vocab} but the student has "
                          f"model.vocab_size={student_vocab}: KD compares logits token id by token id, so "
                          "both must use the same tokenizer and vocabulary")
