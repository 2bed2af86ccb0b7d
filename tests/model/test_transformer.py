"""The assembled transformer: meta construction, deterministic init, every preset builds, bad
configs fail at construction naming the field."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from model.config import ModelConfig, layer_is_moe, layer_kinds, layer_windows
from model.transformer import Transformer
from moe.config import ConfigError

PRESETS = ["tiny", "llama_1b", "dsv3_mini", "gemma3_swa_1b", "dsv3_16b"]


def load_preset(name: str) -> ModelConfig:
    base = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(f"configs/model/{name}.yaml")))


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        m = Transformer(cfg)
    m.init_weights(seed, device="cpu")
    return m


@pytest.mark.parametrize("name", PRESETS)
def test_presets_construct_on_meta(name):
    cfg = load_preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert all(p.is_meta for p in m.parameters())
    assert len(m.layers) == cfg.n_layers


def test_tiny_exercises_every_path():
    cfg = load_preset("tiny")
    assert set(layer_kinds(cfg)) == {"mla", "gqa"}
    assert any(w > 0 for w in layer_windows(cfg)) and any(w == 0 for w in layer_windows(cfg))
    moes = layer_is_moe(cfg)
    assert moes[0] is False and any(moes)
    assert cfg.moe.n_shared_experts > 0 and cfg.attention.qk_norm


def test_gemma_pattern_is_five_local_to_one_global():
    cfg = load_preset("gemma3_swa_1b")
    w = layer_windows(cfg)
    assert w[:6] == [1024] * 5 + [0]
    assert sum(1 for x in w if x == 0) == cfg.n_layers // 6


def test_init_is_deterministic_and_seed_dependent():
    cfg = load_preset("tiny")
    a, b, c = build(cfg, 7), build(cfg, 7), build(cfg, 8)
    for (n, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)
    # Norm weights start at one, biases and buffers at zero.
    assert torch.all(a.norm.weight == 1)


def test_forward_backward_batch_one_and_many():
    torch.manual_seed(0)
    cfg = load_preset("tiny")
    m = build(cfg)
    for b in (1, 3):
        tokens = torch.randint(0, cfg.vocab_size, (b, 80))
        logits, aux = m(tokens)
        assert logits.shape == (b, 80, cfg.vocab_size)
        assert aux.ndim == 0
        (logits.float().logsumexp(-1).mean() + aux).backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        m.zero_grad()


def test_causality():
    cfg = load_preset("tiny")
    m = build(cfg).eval()
    t = torch.randint(0, cfg.vocab_size, (1, 40))
    t2 = t.clone()
    t2[0, 30:] = (t2[0, 30:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, _ = m(t)
        b, _ = m(t2)
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_tied_embeddings_share_the_weight():
    cfg = load_preset("tiny")
    cfg.tie_embeddings = True
    m = build(cfg)
    assert m.output is None and m.output_weight() is m.tok_embeddings.weight


def _bad(mutate):
    cfg = load_preset("tiny")
    mutate(cfg)
    return cfg


BAD = [
    (lambda c: setattr(c.attention, "n_kv_heads", 3), "model.attention.n_kv_heads=3 must divide"),
    (lambda c: setattr(c.moe, "top_k", 9), "model.moe.top_k=9"),
    (lambda c: setattr(c.moe, "n_groups", 3), "model.moe.n_groups=3 must divide"),
    (lambda c: setattr(c.moe, "topk_groups", 3), "model.moe.topk_groups=3"),
    (lambda c: setattr(c.attention, "qk_rope_head_dim", 15), "model.attention.qk_rope_head_dim=15 must be even"),
    (lambda c: setattr(c.attention, "layer_windows", [0, -1, 0, 0]), "model.attention.layer_windows"),
    (lambda c: setattr(c.attention, "window", -4), "model.attention.window=-4"),
    (lambda c: setattr(c.attention, "kv_lora_rank", 0), "model.attention.kv_lora_rank=0: MLA layers need it"),
    (lambda c: setattr(c.attention, "head_dim", 33), "must be even for RoPE"),
    (lambda c: setattr(c.attention, "layer_kinds", ["mla", "gqa"]), "needs one per layer"),
    (lambda c: setattr(c.attention, "layer_kinds", ["mla", "gqa", "xyz", "gqa"]), "'xyz' must be one of"),
    (lambda c: setattr(c, "norm_placement", "sandwich"), "model.norm_placement='sandwich'"),  # "post" is OLMo 2 now
    (lambda c: setattr(c.moe, "score_func", "relu"), "model.moe.score_func='relu'"),
    (lambda c: setattr(c, "ffn_activation", "relu"), "model.ffn_activation='relu' must be one of"),
    (lambda c: setattr(c.attention, "qk_norm_scope", "all"), "model.attention.qk_norm_scope='all'"),
    (lambda c: setattr(c.rope, "local_theta", -1.0), "model.rope.local_theta=-1.0"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_configs_fail_at_construction(mutate, message):
    cfg = _bad(mutate)
    with pytest.raises(ConfigError, match=_escape(message)):
        with torch.device("meta"):
            Transformer(cfg)


def _escape(s):
    import re

    return re.escape(s)
