"""One transformer block: attention then FFN (dense SwiGLU or MoE); pre-norm, Gemma-3 sandwich, or
OLMo-2 post-norm."""

from __future__ import annotations

import torch
from torch import nn

from model.attention.gqa import GQAttention
from model.attention.mla import MLAttention
from model.config import ModelConfig
from model.norms import RMSNorm
from moe.layer import MoELayer
from moe.shared import SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, kind: str, window: int, is_moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.kind = kind
        self.window = window
        self.is_moe = is_moe
        self.attention = GQAttention(cfg, window) if kind == "gqa" else MLAttention(cfg, window)
        if is_moe:
            self.ffn = MoELayer(cfg.d_model, cfg.moe)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim, cfg.ffn_activation)
        # "post" (OLMo 2) has no input norms: each sub-layer reads the raw residual stream.
        self.pre = cfg.norm_placement != "post"
        if self.pre:
            self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Gemma 3 "sandwich" and OLMo 2: a norm on each sub-layer's output before the residual add.
        self.sandwich = cfg.norm_placement in ("pre+post", "post")
        if self.sandwich:
            self.post_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_BTD = self.attention(self.attention_norm(x_BTD) if self.pre else x_BTD)
        if self.sandwich:
            h_BTD = self.post_attention_norm(h_BTD)
        x_BTD = x_BTD + h_BTD
        f_BTD = self.ffn_norm(x_BTD) if self.pre else x_BTD
        if self.is_moe:
            h_BTD, aux = self.ffn(f_BTD)
        else:
            h_BTD = self.ffn(f_BTD)
            aux = x_BTD.new_zeros((), dtype=torch.float32)
        if self.sandwich:
            h_BTD = self.post_ffn_norm(h_BTD)
        return x_BTD + h_BTD, aux
