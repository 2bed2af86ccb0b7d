"""Grouped-query attention (MHA when n_kv_heads == n_heads, MQA when 1), as Llama / Qwen3."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.attention.kernels import attend
from model.config import ModelConfig, gqa_head_dim
from model.norms import RMSNorm
from model.rope import apply_rope, rope_tables, rope_for_window


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__()
        a = cfg.attention
        self.n_heads = a.n_heads
        self.n_kv_heads = a.n_kv_heads
        self.head_dim = gqa_head_dim(cfg)
        self.window = int(window)
        self.backend = a.backend
        self.rope = rope_for_window(cfg.rope, self.window)
        self.rope_spec = (self.head_dim, self.rope)  # the cos/sin tables this layer reads (model/rope.py)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        D, Dh = cfg.d_model, self.head_dim
        self.wq = nn.Linear(D, self.n_heads * Dh, bias=a.bias)
        self.wk = nn.Linear(D, self.n_kv_heads * Dh, bias=a.bias)
        self.wv = nn.Linear(D, self.n_kv_heads * Dh, bias=a.bias)
        self.wo = nn.Linear(self.n_heads * Dh, D, bias=a.bias)
        # QK-norm before RoPE: over each head's dim (Qwen3 / Gemma 3), or over the whole
        # projection (OLMo 2).
        self.qk_norm_per_head = a.qk_norm_scope == "head"
        q_dim, k_dim = (Dh, Dh) if self.qk_norm_per_head else (self.n_heads * Dh, self.n_kv_heads * Dh)
        self.q_norm = RMSNorm(q_dim, eps=cfg.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(k_dim, eps=cfg.norm_eps) if a.qk_norm else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTX, k_BTY = self.wq(x_BTD), self.wk(x_BTD)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q_BTX, k_BTY = self.q_norm(q_BTX), self.k_norm(k_BTY)
        q_BTHD = q_BTX.view(B, T, self.n_heads, self.head_dim)
        k_BThD = k_BTY.view(B, T, self.n_kv_heads, self.head_dim)
        v_BThD = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:
            q_BTHD = self.q_norm(q_BTHD)
            k_BThD = self.k_norm(k_BThD)
        cos_TD, sin_TD = rope_tables(self.head_dim, T, self.rope, device=x_BTD.device)
        q_BHTD = apply_rope(q_BTHD.transpose(1, 2), cos_TD, sin_TD)
        k_BhTD = apply_rope(k_BThD.transpose(1, 2), cos_TD, sin_TD)
        v_BhTD = v_BThD.transpose(1, 2)
        o_BHTD = attend(q_BHTD, k_BhTD, v_BhTD, window=self.window, scale=self.scale, backend=self.backend)
        return self.wo(o_BHTD.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
