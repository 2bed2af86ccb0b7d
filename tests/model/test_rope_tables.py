"""The RoPE table cache (model/rope.py): the attention layers read cached cos/sin instead of
computing them inside their (compiled) forward."""

import dataclasses

import torch

from model import rope as rope_mod
from model.config import RopeConfig
from model.rope import prepare_rope_tables, rope_cos_sin, rope_tables


def test_tables_equal_the_formula_and_are_reused():
    rope_mod._TABLES.clear()
    cfg = RopeConfig(theta=10000.0, yarn_factor=4.0, yarn_mscale_all_dim=1.0)
    cos, sin = rope_tables(64, 128, cfg, device="cpu")
    ref_cos, ref_sin = rope_cos_sin(64, 128, cfg, device="cpu")
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    again = rope_tables(64, 128, cfg, device="cpu")
    assert again[0] is cos and again[1] is sin  # the cached tensors, not recomputed
    # Any setting that changes the values changes the key.
    other = rope_tables(64, 128, dataclasses.replace(cfg, theta=500000.0), device="cpu")
    assert not torch.equal(other[0], cos)
    assert rope_tables(64, 256, cfg, device="cpu")[0].shape == (256, 64)


def test_cache_is_bounded():
    rope_mod._TABLES.clear()
    cfg = RopeConfig()
    for T in range(1, rope_mod._TABLES_MAX + 10):
        rope_tables(8, T, cfg, device="cpu")
    assert len(rope_mod._TABLES) == rope_mod._TABLES_MAX
    assert rope_mod._table_key(8, 1, cfg, "cpu") not in rope_mod._TABLES  # the oldest went first


def test_transformer_prepares_every_layers_tables_and_traced_attention_reads_them():
    """The model fills the cache for each layer's (dim, settings) before its blocks, and every
    attention kind traces whole (``fullgraph``: the cache read breaks no graph) to the eager output."""
    from tests.model.test_transformer import build, load_preset

    rope_mod._TABLES.clear()
    cfg = load_preset("tiny")
    model = build(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        model(tokens)
    keys = {rope_mod._table_key(d, 16, r, tokens.device) for d, r in model.rope_specs}
    assert keys and keys <= set(rope_mod._TABLES)
    kinds = {}
    for block in model.layers.values():
        kinds.setdefault(type(block.attention).__name__, block.attention)
    assert set(kinds) == {"MLAttention", "GQAttention"}
    x = torch.randn(2, 16, cfg.d_model)
    for attn in kinds.values():
        traced = torch.compile(attn, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), attn(x))


def test_prepare_skips_inside_compile_and_fills_outside():
    rope_mod._TABLES.clear()
    prepare_rope_tables([(16, RopeConfig())], 32, "cpu")
    assert rope_mod._table_key(16, 32, RopeConfig(), "cpu") in rope_mod._TABLES
