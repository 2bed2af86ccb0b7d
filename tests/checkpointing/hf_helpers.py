"""Shared bits of the Hugging Face export/import tests: tiny geometries of every family, a few
training steps (so norms, router and the balancing bias are non-trivial), a run directory with one
committed checkpoint, and the logit comparison with transformers."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from model.config import AttentionConfig, ModelConfig, RopeConfig
from model.transformer import Transformer
from moe.balance import update_expert_bias
from moe.config import MoEConfig

V, D = 96, 64


def family_cfg(name: str) -> ModelConfig:
    """A tiny model of family ``name`` (an HF model_type)."""
    gqa = dict(kind="gqa", n_heads=4, n_kv_heads=2)
    base = dict(name=f"tiny-{name}", vocab_size=V, d_model=D, n_layers=3, ffn_dim=96, max_seq_len=64,
                rope=RopeConfig(theta=10000.0))
    if name == "llama":
        return ModelConfig(**base, attention=AttentionConfig(**gqa))
    if name == "mistral":
        return ModelConfig(**base, attention=AttentionConfig(**gqa, window=8))
    if name == "qwen3":
        return ModelConfig(**base, attention=AttentionConfig(**gqa, qk_norm=True, window=8, global_every=3,
                                                             bias=True))
    if name == "qwen3_moe":
        return ModelConfig(**base, attention=AttentionConfig(**gqa, qk_norm=True),
                           moe=MoEConfig(n_experts=4, top_k=2, expert_dim=32, first_k_dense=1,
                                         score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.01))
    if name == "gemma3_text":
        return ModelConfig(**{**base, "n_layers": 4, "rope": RopeConfig(theta=100000.0, local_theta=10000.0)},
                           norm_placement="pre+post", tie_embeddings=True, embed_scale=True,
                           ffn_activation="gelu_tanh",
                           attention=AttentionConfig(kind="gqa", n_heads=4, n_kv_heads=1, head_dim=32, qk_norm=True,
                                                     window=8, global_every=2))
    if name == "olmo2":
        return ModelConfig(**base, norm_placement="post", norm_eps=1e-5,
                           attention=AttentionConfig(**gqa, qk_norm=True, qk_norm_scope="projection"))
    if name == "deepseek_v3":
        return ModelConfig(**base, attention=AttentionConfig(
            kind="mla", n_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16), moe=MoEConfig(n_experts=8, top_k=2, expert_dim=48, n_shared_experts=1, first_k_dense=1,
                                          score_func="sigmoid", route_scale=2.5, n_groups=2, topk_groups=1,
                                          bias_update_rate=0.01))
    raise KeyError(name)


FAMILY_NAMES = ("llama", "mistral", "qwen3", "qwen3_moe", "gemma3_text", "olmo2", "deepseek_v3")


def batch(cfg: ModelConfig, seed: int, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, tokens_BT: torch.Tensor) -> torch.Tensor:
    logits, aux = model(tokens_BT[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens_BT[:, 1:].flatten()) + aux


def train_steps(model: Transformer, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> Transformer:
    """A few AdamW steps on random tokens, with the balancing-bias update after each."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    for i in range(steps):
        loss = lm_loss(model, batch(model.cfg, seed + i))
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_expert_bias(model, model.cfg.moe.bias_update_rate)
    return model.eval()


_TRAINED: dict = {}


def trained(cfg: ModelConfig, steps: int = 3, seed: int = 0) -> Transformer:
    """``cfg`` trained ``steps`` steps; the weights are computed once per test process and config
    (the export and import tests share them), each caller gets its own model."""
    key = (repr(cfg), steps, seed)
    model = Transformer(cfg)
    if key not in _TRAINED:
        torch.manual_seed(seed)
        model.init_weights(seed)
        _TRAINED[key] = {k: v.clone() for k, v in train_steps(model, steps, seed=seed).state_dict().items()}
    model.load_state_dict(_TRAINED[key])
    return model.eval()


def write_run(tmp_path, model: Transformer, step: int = 5) -> str:
    """A run directory as the trainer leaves it: config.yaml (model: section) + one commit."""
    from omegaconf import OmegaConf

    from checkpointing import AppState, CheckpointManager
    from tests.checkpointing.helpers import Cfg

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"run_name": "run", "model": dataclasses.asdict(model.cfg), "trainer": {"max_steps": step}})))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    assert mgr.save(step, {"app": AppState(model, opt)}).committed
    return str(run_dir)


def max_logit_diff(model: Transformer, hf_model, seed: int = 3, T: int = 24) -> float:
    tokens = batch(model.cfg, seed, B=2, T=T)
    with torch.no_grad():
        ours, _ = model.eval()(tokens)
        theirs = hf_model.eval()(tokens).logits
    return (ours.float() - theirs.float()).abs().max().item()
