"""GQA / MLA / sliding-window / QK-norm attention equal Hugging Face transformers in fp32.

Each case builds the HF module with the eager attention implementation, copies its weights into
ours through the name mapping written below, and compares the forward output and the gradients
w.r.t. the input and every weight. HF gets the additive mask that ``transformers.masking_utils``
builds for the eager path (``create_causal_mask`` / ``create_sliding_window_causal_mask``).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from model.attention import GQAttention, MLAttention
from model.config import AttentionConfig, ModelConfig, RopeConfig

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, LlamaConfig, MistralConfig, Qwen3Config  # noqa: E402
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding  # noqa: E402

REL = 1e-5

GQA_MAP = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
           "q_norm": "q_norm", "k_norm": "k_norm"}
MLA_MAP = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
           "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
           "wo": "o_proj"}


def _seed(case: tuple) -> int:
    return zlib.crc32(repr(case).encode())


def _hf_name(ours: str, mapping: dict) -> str:
    mod, leaf = ours.rsplit(".", 1)
    return f"{mapping[mod]}.{leaf}"


def _load_from_hf(ours: torch.nn.Module, hf: torch.nn.Module, mapping: dict, gen: torch.Generator) -> None:
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in hf_params.items():
            # HF norm weights start at one; perturb them so the mapping of norms is really tested.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))
        ours_names = {n for n, _ in ours.named_parameters()}
        assert {_hf_name(n, mapping) for n in ours_names} == set(hf_params), (ours_names, set(hf_params))
        for n, p in ours.named_parameters():
            p.copy_(hf_params[_hf_name(n, mapping)])


def _close(a: torch.Tensor, b: torch.Tensor, what: str, floor: float = 0.0) -> None:
    """max |a - b| <= REL * max |b|; ``floor`` is the scale used when b is (exactly) zero, e.g. the
    q/k weight gradients at T=1, where softmax over one key has zero gradient in exact math."""
    err = (a - b).abs().max().item()
    ref = b.abs().max().item()
    assert err <= REL * max(ref, floor), f"{what}: max abs err {err:.3e} vs max |ref| {ref:.3e}"


def _hf_mask(hf_cfg, x: torch.Tensor, window: int):
    pos = torch.arange(x.shape[1])[None]
    if window:
        hf_cfg.sliding_window = window
        make = create_sliding_window_causal_mask
    else:
        make = create_causal_mask
    mask = make(config=hf_cfg, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=pos)
    assert mask is not None and mask.shape[-2:] == (x.shape[1], x.shape[1])
    return mask


def _compare(ours, hf, rotary, hf_cfg, mapping, x: torch.Tensor, window: int, gen: torch.Generator):
    _load_from_hf(ours, hf, mapping, gen)
    g = torch.randn(x.shape, generator=gen)

    x1 = x.clone().requires_grad_(True)
    y1 = ours(x1)
    (y1 * g).sum().backward()

    x2 = x.clone().requires_grad_(True)
    pos = torch.arange(x.shape[1])[None]
    cos, sin = rotary(x2, pos)
    y2 = hf(x2, position_embeddings=(cos, sin), attention_mask=_hf_mask(hf_cfg, x2, window))[0]
    (y2 * g).sum().backward()

    _close(y1, y2, "output")
    _close(x1.grad, x2.grad, "grad x")
    hf_params = dict(hf.named_parameters())
    floor = max(p.grad.abs().max().item() for p in hf_params.values())
    for n, p in ours.named_parameters():
        _close(p.grad, hf_params[_hf_name(n, mapping)].grad, f"grad {n}", floor)


# ---------------------------------------------------------------------------------------------- GQA

GQA_CASES = [
    # (n_heads, n_kv_heads, head_dim, d_model, bias, theta, B, T)
    (4, 4, 16, 64, False, 10000.0, 2, 17),   # MHA
    (8, 2, 8, 48, True, 500000.0, 1, 33),    # GQA, head_dim != d_model / n_heads, bias
    (6, 1, 12, 72, False, 10000.0, 3, 9),    # MQA
    (4, 2, 32, 64, False, 1000.0, 1, 1),     # a single token
]


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("case", GQA_CASES)
def test_gqa_matches_llama(case, backend):
    H, h, Dh, D, bias, theta, B, T = case
    gen = torch.Generator().manual_seed(_seed(case))
    cfg = ModelConfig(d_model=D, attention=AttentionConfig(n_heads=H, n_kv_heads=h, head_dim=Dh, bias=bias,
                                                          backend=backend),
                      rope=RopeConfig(theta=theta))
    hf_cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=h, head_dim=Dh,
                         attention_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": theta})
    hf_cfg._attn_implementation = "eager"
    ours, hf = GQAttention(cfg, window=0), LlamaAttention(hf_cfg, layer_idx=0)
    x = torch.randn(B, T, D, generator=gen)
    _compare(ours, hf, LlamaRotaryEmbedding(hf_cfg), hf_cfg, GQA_MAP, x, 0, gen)


SLIDING_CASES = [
    # (n_heads, n_kv_heads, head_dim, window, B, T)
    (4, 2, 16, 1, 2, 11),    # window 1: each token sees only itself
    (4, 2, 16, 4, 2, 23),
    (8, 8, 8, 7, 1, 7),      # window == T: same as causal
    (6, 3, 8, 32, 1, 20),    # window > T
    (4, 1, 16, 5, 3, 40),
]


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("case", SLIDING_CASES)
def test_sliding_window_matches_mistral(case, backend):
    H, h, Dh, W, B, T = case
    D = 48
    gen = torch.Generator().manual_seed(1000 + _seed(case))
    cfg = ModelConfig(d_model=D, attention=AttentionConfig(n_heads=H, n_kv_heads=h, head_dim=Dh, window=W,
                                                          backend=backend))
    hf_cfg = MistralConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=h, head_dim=Dh,
                           sliding_window=W, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf_cfg._attn_implementation = "eager"
    ours, hf = GQAttention(cfg, window=W), MistralAttention(hf_cfg, layer_idx=0)
    x = torch.randn(B, T, D, generator=gen)
    _compare(ours, hf, MistralRotaryEmbedding(hf_cfg), hf_cfg, GQA_MAP, x, W, gen)


QK_NORM_CASES = [
    # (n_heads, n_kv_heads, head_dim, bias, window, B, T)
    (4, 2, 16, False, 0, 2, 19),
    (8, 4, 8, True, 0, 1, 12),
    (4, 1, 16, False, 6, 2, 21),
]


@pytest.mark.parametrize("case", QK_NORM_CASES)
def test_qk_norm_matches_qwen3(case):
    H, h, Dh, bias, W, B, T = case
    D = 64
    gen = torch.Generator().manual_seed(2000 + _seed(case))
    cfg = ModelConfig(d_model=D, norm_eps=1e-6,
                      attention=AttentionConfig(n_heads=H, n_kv_heads=h, head_dim=Dh, bias=bias, qk_norm=True))
    hf_cfg = Qwen3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=h, head_dim=Dh,
                         attention_bias=bias, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf_cfg._attn_implementation = "eager"
    ours, hf = GQAttention(cfg, window=W), Qwen3Attention(hf_cfg, layer_idx=0)
    x = torch.randn(B, T, D, generator=gen)
    _compare(ours, hf, Qwen3RotaryEmbedding(hf_cfg), hf_cfg, GQA_MAP, x, W, gen)


# ---------------------------------------------------------------------------------------------- MLA

MLA_CASES = [
    # (n_heads, q_lora, kv_lora, nope, rope, v, bias, yarn (factor, orig, mscale, mscale_all_dim), window, B, T)
    (4, 0, 16, 16, 8, 12, False, None, 0, 2, 13),
    (4, 24, 16, 16, 8, 16, False, None, 0, 1, 17),
    (2, 0, 32, 8, 16, 8, True, (4.0, 8, 1.0, 1.0), 0, 2, 40),          # DeepSeek-V3 style YaRN
    (4, 16, 8, 12, 8, 10, False, (8.0, 16, 1.0, 0.707), 0, 1, 64),     # attention factor != 1
    (3, 12, 16, 8, 8, 8, False, (2.0, 4, 1.0, 0.0), 0, 2, 20),         # no softmax mscale
    (4, 16, 16, 16, 8, 12, False, (4.0, 8, 1.0, 1.0), 5, 2, 24),       # MLA with a sliding window
]


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_matches_deepseek_v3(case, backend):
    H, q_lora, kv_lora, nope, rope_dim, v_dim, bias, yarn, W, B, T = case
    D = 48
    theta = 10000.0
    gen = torch.Generator().manual_seed(3000 + _seed(case))
    rope_cfg = RopeConfig(theta=theta)
    rope_params = {"rope_type": "default", "rope_theta": theta}
    max_pos = 256
    if yarn is not None:
        factor, orig, mscale, mscale_all_dim = yarn
        rope_cfg = RopeConfig(theta=theta, yarn_factor=factor, yarn_original_max_position=orig,
                              yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=mscale,
                              yarn_mscale_all_dim=mscale_all_dim)
        rope_params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                       "original_max_position_embeddings": orig, "beta_fast": 32.0, "beta_slow": 1.0,
                       "mscale": mscale, "mscale_all_dim": mscale_all_dim}
        max_pos = int(factor * orig)
    cfg = ModelConfig(d_model=D, norm_eps=1e-6, rope=rope_cfg,
                      attention=AttentionConfig(kind="mla", n_heads=H, n_kv_heads=H, q_lora_rank=q_lora,
                                                kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                                                qk_rope_head_dim=rope_dim, v_head_dim=v_dim, bias=bias,
                                                backend=backend))
    hf_cfg = DeepseekV3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=H,
                              q_lora_rank=q_lora or None, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                              qk_rope_head_dim=rope_dim, v_head_dim=v_dim, attention_bias=bias,
                              rope_interleave=False, rms_norm_eps=1e-6, max_position_embeddings=max_pos,
                              rope_parameters=rope_params)
    hf_cfg._attn_implementation = "eager"
    ours, hf = MLAttention(cfg, window=W), DeepseekV3Attention(hf_cfg, layer_idx=0)
    assert ours.scale == pytest.approx(hf.scaling, rel=1e-12)
    x = torch.randn(B, T, D, generator=gen)
    _compare(ours, hf, DeepseekV3RotaryEmbedding(hf_cfg), hf_cfg, MLA_MAP, x, W, gen)
