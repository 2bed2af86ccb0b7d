"""``python -m checkpointing export``: our checkpoint -> HF safetensors + config.json, loaded by
transformers, logits equal to our model's (fp32)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from checkpointing import AppState, CheckpointManager
from checkpointing.cli import main as cli_main
from model.config import AttentionConfig, ModelConfig, RopeConfig
from model.transformer import Transformer
from moe.config import MoEConfig
from tests.checkpointing.helpers import Cfg

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")


def _llama_cfg() -> ModelConfig:
    return ModelConfig(name="tiny-llama", vocab_size=96, d_model=64, n_layers=2, ffn_dim=160,
                       max_seq_len=64, attention=AttentionConfig(kind="gqa", n_heads=4, n_kv_heads=2),
                       rope=RopeConfig(theta=10000.0))


def _dsv3_cfg(q_lora_rank: int) -> ModelConfig:
    return ModelConfig(
        name="tiny-dsv3", vocab_size=96, d_model=64, n_layers=3, ffn_dim=160, max_seq_len=64,
        attention=AttentionConfig(kind="mla", n_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=MoEConfig(n_experts=8, top_k=2, expert_dim=48, n_shared_experts=1, first_k_dense=1,
                      score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=2,
                      topk_groups=1, experts_impl="loop"))


def _run_with_checkpoint(tmp_path, cfg: ModelConfig, seed: int = 0):
    """A fake run directory: config.yaml (model: section, as the trainer writes it) + one commit."""
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):  # a trained selection bias, so its mapping is tested
                buf.copy_(torch.randn(buf.shape) * 0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"run_name": "run", "model": dataclasses.asdict(cfg), "trainer": {"max_steps": 5}})))
    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    assert mgr.save(5, {"app": AppState(model, opt)}).committed
    return model.eval(), str(run_dir)


def _compare(model, out_dir, atol=2e-5):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    assert err < atol, f"max |logit diff| = {err}"
    return hf


def test_export_llama(tmp_path):
    model, run_dir = _run_with_checkpoint(tmp_path, _llama_cfg())
    out = str(tmp_path / "hf")
    assert cli_main(["export", run_dir, "--out", out, "--dtype", "float32"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["moeforge"]["step"] == 5
    hf = _compare(model, out)
    assert type(hf).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("q_lora_rank,layout", [(0, "per_expert"), (24, "fused")])
def test_export_deepseek_v3(tmp_path, q_lora_rank, layout):
    model, run_dir = _run_with_checkpoint(tmp_path, _dsv3_cfg(q_lora_rank))
    out = str(tmp_path / "hf")
    assert cli_main(["export", run_dir, "--out", out, "--dtype", "float32", "--step", "5",
                     "--experts-layout", layout, "--max-shard-gb", "0.0002"]) == 0
    assert "model.safetensors.index.json" in os.listdir(out)  # sharded at 200 kB
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["rope_interleave"] is False
    hf = _compare(model, out)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, model.layers["1"].ffn.router.expert_bias)


def test_export_refuses_what_hf_cannot_express(tmp_path, capsys):
    cfg = _llama_cfg()
    cfg.attention.qk_norm = True  # -> Qwen3ForCausalLM, whose QK-norm is per head, not over the projection
    cfg.attention.qk_norm_scope = "projection"
    _, run_dir = _run_with_checkpoint(tmp_path, cfg)
    assert cli_main(["export", run_dir, "--out", str(tmp_path / "hf")]) == 1
    assert "qk_norm" in capsys.readouterr().out


def test_export_from_and_to_s3(tmp_path, s3):
    """Checkpoint on s3:// (config.yaml named with --config), export written to s3://."""
    from omegaconf import OmegaConf

    cfg = _llama_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opts = s3.storage_options()
    mgr = CheckpointManager(Cfg(root=f"s3://{s3.bucket}/ckpt", storage_options=opts), "/unused", "run")
    assert mgr.save(7, {"app": AppState(model, opt)}).committed
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
    out = f"s3://{s3.bucket}/export/tiny-llama"
    args = ["export", mgr.run_dir, "--out", out, "--dtype", "float32", "--config", str(config_yaml)]
    for key in ("endpoint_url", "region"):
        args += ["-o", f"{key}={opts[key]}"]
    assert cli_main(args) == 0
    from checkpointing.storage import Storage

    st = Storage(out, opts)
    assert st.files(out) == ["config.json", "model.safetensors"]
    local = tmp_path / "hf"
    for name in st.files(out):
        st.get_file(f"{out}/{name}", str(local / name))
    _compare(model.eval(), str(local))
