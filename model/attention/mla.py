"""Multi-head latent attention (DeepSeek-V2/V3), parameter names as DeepSeek's reference.

Keys and values are reconstructed from a low-rank latent (``kv_lora_rank``); the positional part of
the key is one extra head of ``qk_rope_head_dim`` computed from ``x`` directly and shared by every
query head ("decoupled RoPE"). RoPE uses the rotate_half layout (HF ``rope_interleave=False``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.attention.kernels import attend
from model.config import ModelConfig
from model.norms import RMSNorm
from model.rope import apply_rope, rope_tables, rope_for_window, yarn_softmax_mscale


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__()
        a = cfg.attention
        D = cfg.d_model
        self.n_heads = a.n_heads
        self.q_lora_rank = a.q_lora_rank
        self.kv_lora_rank = a.kv_lora_rank
        self.nope_dim = a.qk_nope_head_dim
        self.rope_dim = a.qk_rope_head_dim
        self.qk_head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        self.v_head_dim = a.v_head_dim
        self.window = int(window)
        self.backend = a.backend
        self.rope = rope_for_window(cfg.rope, self.window)
        self.rope_spec = (self.rope_dim, self.rope)  # the cos/sin tables this layer reads (model/rope.py)
        # With YaRN, DeepSeek-V3 also rescales the logits by mscale(factor, mscale_all_dim)^2.
        self.scale = yarn_softmax_mscale(cfg.rope) / math.sqrt(self.qk_head_dim)
        H = self.n_heads
        # Biases where HF's DeepseekV3Attention puts ``attention_bias``: the down projections and wo.
        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, self.q_lora_rank, bias=a.bias)
            self.q_norm = RMSNorm(self.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(D, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=a.bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, D, bias=a.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H = self.n_heads
        if self.q_lora_rank > 0:
            q = self.wq_b(self.q_norm(self.wq_a(x_BTD)))
        else:
            q = self.wq(x_BTD)
        q_BHTK = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)
        q_nope_BHTN, q_rope_BHTR = torch.split(q_BHTK, [self.nope_dim, self.rope_dim], dim=-1)

        kv_BTC = self.wkv_a(x_BTD)
        latent_BTL, k_rope_BTR = torch.split(kv_BTC, [self.kv_lora_rank, self.rope_dim], dim=-1)
        latent_BTL = self.kv_norm(latent_BTL)

        cos_TR, sin_TR = rope_tables(self.rope_dim, T, self.rope, device=x_BTD.device)
        q_rope_BHTR = apply_rope(q_rope_BHTR, cos_TR, sin_TR)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), cos_TR, sin_TR)

        kv_BHTM = self.wkv_b(latent_BTL).view(B, T, H, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope_BHTN, v_BHTE = torch.split(kv_BHTM, [self.nope_dim, self.v_head_dim], dim=-1)
        k_BHTK = torch.cat((k_nope_BHTN, k_rope_B1TR.expand(B, H, T, self.rope_dim)), dim=-1)
        q_BHTK = torch.cat((q_nope_BHTN, q_rope_BHTR), dim=-1)

        o_BHTE = attend(q_BHTK, k_BHTK, v_BHTE, window=self.window, scale=self.scale, backend=self.backend)
        return self.wo(o_BHTE.transpose(1, 2).reshape(B, T, H * self.v_head_dim))
