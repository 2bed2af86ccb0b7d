"""``model.init_from``: our model initialised from a Hugging Face directory. Export -> import is the
identity; a model made by transformers (random weights, save_pretrained) gives transformers' logits
in ours; the trainer continues an exported run with the same loss; model= is checked key by key."""

from __future__ import annotations

import json

import pytest
import torch

from checkpointing.cli import main as cli_main
from checkpointing.errors import CheckpointError
from checkpointing.hf.load import load_hf_weights, model_config_from_hf
from model.transformer import Transformer
from tests.checkpointing.hf_helpers import FAMILY_NAMES, batch, family_cfg, lm_loss, max_logit_diff, trained, write_run

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")


def _export(tmp_path, model, layout="per_expert", shard_gb="5") -> str:
    out = str(tmp_path / "hf")
    assert cli_main(["export", write_run(tmp_path, model), "--out", out, "--dtype", "float32",
                     "--experts-layout", layout, "--max-shard-gb", shard_gb]) == 0
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_import_round_trip(tmp_path, family):
    model = trained(family_cfg(family))
    out = _export(tmp_path, model, "fused" if family == "deepseek_v3" else "per_expert", "0.0001")
    cfg = model_config_from_hf(out)
    fresh = Transformer(cfg)
    fresh.init_weights(123)
    load_hf_weights(fresh, out)
    ours, theirs = model.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:  # Gemma's (1 + w) norms round once in w - 1: 1 ulp of 1.0
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=2.5e-7, msg=k)
    tokens = batch(model.cfg, 7)
    with torch.no_grad():
        assert abs(lm_loss(fresh.eval(), tokens).item() - lm_loss(model, tokens).item()) < 1e-5


def _hf_model(family: str, **extra):
    """A transformers model of the family, built from transformers' own config class with its own
    defaults where ours has no say (Gemma 3's 10k/1M RoPE bases, OLMo 2's eps 1e-5), every weight
    perturbed so norms, biases and the routing bias are non-trivial."""
    T = transformers
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        c = T.LlamaConfig(**common, head_dim=16, attention_bias=True)
    elif family == "mistral":
        c = T.MistralConfig(**common, sliding_window=8)
    elif family == "qwen3":
        c = T.Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    elif family == "qwen3_moe":
        c = T.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             mlp_only_layers=[0], norm_topk_prob=True)
    elif family == "gemma3_text":
        c = T.Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=32,
                               sliding_window=8, sliding_window_pattern=2)
    elif family == "olmo2":
        c = T.Olmo2Config(**common)
    else:
        c = T.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, moe_intermediate_size=48, n_routed_experts=8,
                               num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                               first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24,
                               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                               rope_interleave=extra.get("rope_interleave", False))
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(c, dtype=torch.float32)
    with torch.no_grad():
        for p in list(hf.parameters()) + [b for n, b in hf.named_buffers() if "correction_bias" in n]:
            p.add_(torch.randn_like(p) * 0.05)
    return hf.eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_import_transformers_model(tmp_path, family):
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    cfg = model_config_from_hf(str(tmp_path / "hf"))
    ours = Transformer(cfg)
    ours.init_weights(0)
    load_hf_weights(ours, str(tmp_path / "hf"))
    assert max_logit_diff(ours, hf) <= 1e-4


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_import_deepseek_v3_with_interleaved_rope(tmp_path, q_lora_rank):
    """DeepSeek's own layout (rope_interleave=true, transformers' default): the rotary rows are
    permuted into our rotate_half layout on import, logits equal."""
    hf = _hf_model("deepseek_v3", rope_interleave=True)
    if q_lora_rank is None:  # the plain q projection (DeepSeek-V2-Lite style)
        hf.config.q_lora_rank = None
        hf = type(hf)(hf.config).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    assert hf.config.rope_interleave
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer(model_config_from_hf(str(tmp_path / "hf")))
    ours.init_weights(0)
    load_hf_weights(ours, str(tmp_path / "hf"))
    assert max_logit_diff(ours, hf) <= 1e-4


def test_import_refuses_what_we_cannot_express(tmp_path):
    hf = _hf_model("gemma3_text")
    hf.config.final_logit_softcapping = 30.0
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="final_logit_softcapping=30.0"):
        model_config_from_hf(str(tmp_path / "hf"))


def test_import_refuses_unread_tensors(tmp_path):
    model = trained(family_cfg("llama"), steps=1)
    out = _export(tmp_path, model)
    config = json.load(open(f"{out}/config.json"))
    config["num_hidden_layers"] = 2  # the directory holds 3 layers
    json.dump(config, open(f"{out}/config.json", "w"))
    small = Transformer(model_config_from_hf(out))
    small.init_weights(0)
    with pytest.raises(CheckpointError, match="no place for"):
        load_hf_weights(small, out)


def test_import_from_s3(tmp_path, s3):
    """An HF directory on s3:// (a real S3 API on loopback), read by byte range."""
    from checkpointing.storage import Storage

    model = trained(family_cfg("qwen3"), steps=1)
    out = _export(tmp_path, model)
    opts = s3.storage_options()
    url = f"s3://{s3.bucket}/hf/qwen3"
    remote = Storage(url, opts)
    for name in ("config.json", "model.safetensors"):
        remote.put_file(f"{out}/{name}", f"{url}/{name}")
    fresh = Transformer(model_config_from_hf(url, opts))
    fresh.init_weights(5)
    load_hf_weights(fresh, url, opts)
    for k, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], t), k


def test_upcycling_copies_the_dense_mlp_into_every_expert(tmp_path):
    """model.init_from_dense: a transformers Qwen3 (dense) into a Qwen3-MoE-shaped model of ours with
    a shared expert. Identical experts with normalised top-k weights sum to the MLP, so each MoE
    layer gives twice the dense MLP (routed + shared); attention and norms are the dense model's."""
    import dataclasses

    from checkpointing.hf.load import upcycle_source  # noqa: F401  (the mapping under test)
    from moe.config import MoEConfig
    from train.init_from import check_upcycling

    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf")
    dense_cfg = model_config_from_hf(path)
    dense = Transformer(dense_cfg)
    dense.init_weights(0)
    load_hf_weights(dense, path)
    moe_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(n_experts=4, top_k=2, expert_dim=dense_cfg.ffn_dim,
                                                           n_shared_experts=1, norm_topk_prob=True),
                                  init_from_dense=path)
    from types import SimpleNamespace

    check_upcycling(SimpleNamespace(model=moe_cfg, checkpoint=SimpleNamespace(storage_options={})))
    moe = Transformer(moe_cfg)
    moe.init_weights(1)
    router_before = moe.layers["0"].ffn.router.gate.weight.clone()
    load_hf_weights(moe, path, upcycle=True)
    assert torch.equal(moe.layers["0"].ffn.router.gate.weight, router_before)  # the new router
    x = torch.randn(2, 5, dense_cfg.d_model)
    with torch.no_grad():
        for i in ("0", "3"):
            y, _ = moe.layers[i].ffn(x)
            torch.testing.assert_close(y, 2 * dense.layers[i].ffn(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(moe.layers[i].attention.wq.weight, dense.layers[i].attention.wq.weight)
    bad = dataclasses.replace(moe_cfg, moe=dataclasses.replace(moe_cfg.moe, expert_dim=32))
    from moe.config import ConfigError

    with pytest.raises(ConfigError, match="model.moe.expert_dim=32"):
        check_upcycling(SimpleNamespace(model=bad, checkpoint=SimpleNamespace(storage_options={})))
