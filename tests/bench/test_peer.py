"""bench/peer.py: the Hugging Face peer has our geometry. Llama and DeepSeek-V3 peers loaded with
our weights (``checkpointing.export.to_hf``) give our logits; the Gemma 3 mapping keeps the preset's
layer pattern, heads and window."""

from __future__ import annotations

import pytest
import torch

from bench.common import preset
from bench.ours import model_config
from bench.peer import PeerConfigError, gemma3_text_config, peer_architecture

pytest.importorskip("transformers", reason="the peer is transformers, in the test extra")


@pytest.mark.parametrize("name,arch", [("llama_1b", "llama"), ("dsv3_mini", "deepseek_v3")])
def test_peer_with_our_weights_gives_our_logits(name, arch):
    from bench.peer import build_peer
    from checkpointing.export import to_hf
    from model.transformer import Transformer

    cfg = model_config(name, tiny=True)
    ours = Transformer(cfg)
    ours.init_weights(0, device="cpu")
    peer, info = build_peer(cfg, torch.device("cpu"))
    missing, unexpected = peer.load_state_dict(to_hf(ours.state_dict(), arch, "fused"), strict=False)
    assert not missing and not unexpected
    ours.eval(), peer.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peer(input_ids=x, use_cache=False).logits, ours(x)[0], rtol=1e-4, atol=1e-4)


def test_gemma3_mapping_keeps_the_preset_geometry():
    cfg = preset("gemma3_swa_1b")
    c = gemma3_text_config(cfg)
    assert c["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2
    assert c["sliding_window"] == 1024 and c["head_dim"] == 256 == c["query_pre_attn_scalar"]
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (4, 1)
    assert c["tie_word_embeddings"] and c["vocab_size"] == 32768 and c["hidden_activation"] == "silu"
    assert peer_architecture(cfg) == "gemma3"


def test_gemma3_mapping_refuses_what_gemma3_cannot_express():
    cfg = preset("gemma3_swa_1b", attention={"qk_norm": False})
    with pytest.raises(PeerConfigError, match="qk_norm"):
        gemma3_text_config(cfg)


def test_peer_recipe_is_the_users_build():
    """The peer as issue 19's recipe builds it: fp32 weights, sdpa, grouped-GEMM experts, the WHOLE
    model under one torch.compile (not per layer), a plain AdamW over every parameter."""
    from bench.peer import peer_recipe

    cfg = model_config("dsv3_mini", tiny=True)
    r = peer_recipe(cfg, torch.device("cpu"), compile=True)
    assert r.forward is not r.model and getattr(r.forward, "_orig_mod", None) is r.model
    assert all(not getattr(layer, "_compiled_call_impl", None) for layer in r.model.model.layers)
    assert {p.dtype for p in r.model.parameters()} == {torch.float32}
    assert r.info["attn_implementation"] == "sdpa" and r.info["experts_implementation"] == "grouped_mm"
    assert isinstance(r.optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in r.optimizer.param_groups) == len(list(r.model.parameters()))
    eager = peer_recipe(cfg, torch.device("cpu"), compile=False)
    assert eager.forward is eager.model and eager.info["compile"] == "none"
    layers = peer_recipe(cfg, torch.device("cpu"), compile=True, layer_compile=True)
    assert layers.forward is layers.model and "per decoder layer" in layers.info["compile"]


def test_peer_loss_is_transformers_own_shifted_loss():
    """``labels=input_ids``: transformers shifts inside; equal to cross-entropy of logits[:, :-1]
    against tokens[:, 1:]."""
    from bench.peer import peer_loss, peer_recipe

    cfg = model_config("llama_1b", tiny=True)
    r = peer_recipe(cfg, torch.device("cpu"), compile=False)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = peer_loss(r.forward, x)
    logits = r.model(input_ids=x, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size).float(), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in r.model.parameters() if p.requires_grad)


def test_tf32_matmul_is_set_inside_and_restored_after():
    from bench.peer import tf32_matmul

    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmul(not before):
        assert torch.backends.cuda.matmul.allow_tf32 == (not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RuntimeError), tf32_matmul(not before):
        raise RuntimeError("a failed variant")
    assert torch.backends.cuda.matmul.allow_tf32 == before
