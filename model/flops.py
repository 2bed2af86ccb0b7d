"""FLOPs per trained token, from the config alone (pure functions; MFU everywhere uses these).

Training FLOPs per token = 6 x active matmul parameters + the attention score/value term.
Active parameters count the routed experts at top_k/n_experts (i.e. top_k experts per token), the
shared experts and the router in full, and the output head; the embedding lookup is not a matmul.
The attention term uses each layer's real context: a causal query at position i attends to
min(i + 1, window) keys, averaged over the sequence.
"""

from __future__ import annotations

from model.config import ModelConfig, gqa_head_dim, layer_is_moe, layer_kinds, layer_windows


def attention_params(cfg: ModelConfig, kind: str) -> int:
    a, d = cfg.attention, cfg.d_model
    if kind == "gqa":
        hd = gqa_head_dim(cfg)
        return d * a.n_heads * hd + 2 * d * a.n_kv_heads * hd + a.n_heads * hd * d
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = d * a.q_lora_rank + a.q_lora_rank * a.n_heads * qk if a.q_lora_rank > 0 else d * a.n_heads * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.n_heads * (
        a.qk_nope_head_dim + a.v_head_dim
    )
    return q + kv + a.n_heads * a.v_head_dim * d


def ffn_params(cfg: ModelConfig, is_moe: bool, active: bool = True) -> int:
    d, m = cfg.d_model, cfg.moe
    if not is_moe:
        return 3 * d * cfg.ffn_dim
    routed = (m.top_k if active else m.n_experts) * 3 * d * m.expert_dim
    shared = 3 * d * m.n_shared_experts * m.expert_dim
    return routed + shared + d * m.n_experts


def matmul_params(cfg: ModelConfig, active: bool = True) -> int:
    """Parameters that take part in a matmul per token (all experts when ``active`` is False)."""
    kinds, moes = layer_kinds(cfg), layer_is_moe(cfg)
    n = sum(attention_params(cfg, k) + ffn_params(cfg, e, active) for k, e in zip(kinds, moes))
    return n + cfg.d_model * cfg.vocab_size


def mean_context(seq_len: int, window: int) -> float:
    """Average number of keys a causal query attends to (window 0 = full causal)."""
    t = seq_len
    if window <= 0 or window >= t:
        return (t + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (t - w) * w) / t


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of QK^T and AV per token, summed over layers (3x the forward)."""
    a = cfg.attention
    total = 0.0
    for kind, window in zip(layer_kinds(cfg), layer_windows(cfg)):
        if kind == "gqa":
            dqk = dv = gqa_head_dim(cfg)
        else:
            dqk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        total += 6 * a.n_heads * (dqk + dv) * mean_context(seq_len, window)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention."""
    return 6.0 * matmul_params(cfg, active=True) + attention_flops_per_token(cfg, seq_len)


def total_params(cfg: ModelConfig) -> int:
    """All parameters (embedding, every expert, norms excluded as negligible)."""
    emb = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return matmul_params(cfg, active=False) - cfg.d_model * cfg.vocab_size + emb + head
