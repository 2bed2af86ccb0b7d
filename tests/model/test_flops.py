"""flops_per_token against hand-computed values and against the real module's parameters."""

import pytest
import torch

from model.config import ModelConfig
from model.flops import attention_flops_per_token, flops_per_token, matmul_params, mean_context
from model.transformer import Transformer
from tests.model.test_transformer import PRESETS, load_preset


def test_mean_context():
    assert mean_context(4, 0) == 2.5  # (1+2+3+4)/4
    assert mean_context(4, 2) == (1 + 2 + 2 + 2) / 4
    assert mean_context(4, 8) == 2.5


def test_dense_gqa_by_hand():
    cfg = ModelConfig(vocab_size=100, d_model=64, n_layers=2, ffn_dim=128)
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    hd = 16
    attn = 64 * 4 * hd + 2 * 64 * 2 * hd + 4 * hd * 64
    ffn = 3 * 64 * 128
    params = 2 * (attn + ffn) + 64 * 100
    assert matmul_params(cfg) == params
    t = 32
    att = 2 * 6 * 4 * (hd + hd) * (t + 1) / 2
    assert flops_per_token(cfg, t) == pytest.approx(6 * params + att)


def _module_matmul_params(m: Transformer, cfg: ModelConfig) -> int:
    n = 0
    for name, p in m.named_parameters():
        owner = name.split(".")[-2] if "." in name else ""
        if "norm" in owner or name.startswith("tok_embeddings") or p.ndim < 2:
            continue
        n += p.numel()
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


@pytest.mark.parametrize("name", PRESETS)
def test_matmul_params_match_the_module(name):
    cfg = load_preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert matmul_params(cfg, active=False) == _module_matmul_params(m, cfg)


def test_moe_counts_top_k_of_experts():
    cfg = load_preset("dsv3_mini")
    full, active = matmul_params(cfg, active=False), matmul_params(cfg, active=True)
    n_moe = cfg.n_layers - cfg.moe.first_k_dense
    per_expert = 3 * cfg.d_model * cfg.moe.expert_dim
    assert full - active == n_moe * (cfg.moe.n_experts - cfg.moe.top_k) * per_expert


def test_window_reduces_attention_flops():
    cfg = load_preset("gemma3_swa_1b")
    local = attention_flops_per_token(cfg, 8192)
    cfg.attention.window = 0
    full = attention_flops_per_token(cfg, 8192)
    assert local < 0.4 * full
