"""SwiGLU feed-forward: the shared experts of a MoE layer, and the dense MLP of the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "trunc_normal_fp32_"]


@torch.no_grad()
def trunc_normal_fp32_(t: torch.Tensor, std: float) -> None:
    """Truncated normal at +-3 std, drawn in fp32 and copied in. ``nn.init.trunc_normal_`` straight
    on a bf16 CUDA tensor returns values up to +-2 (its erfinv saturates in bf16; seen on H200 with
    std=0.02), so never draw in low precision."""
    tmp = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    nn.init.trunc_normal_(tmp, std=std, a=-3 * std, b=3 * std)
    t.copy_(tmp)


ACTIVATIONS = ("silu", "gelu_tanh")


class SwiGLU(nn.Module):
    """``w2(act(w1 x) * w3 x)``; w1 gate, w3 up, w2 down; no biases. ``act`` is SiLU (SwiGLU) or
    tanh-approximated GELU (GeGLU, Gemma's ``gelu_pytorch_tanh``)."""

    def __init__(self, d_model: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w3 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, d_model, bias=False)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        trunc_normal_fp32_(self.w1.weight, std)
        trunc_normal_fp32_(self.w3.weight, std)
        trunc_normal_fp32_(self.w2.weight, std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.w1(x)
        g = F.silu(g) if self.activation == "silu" else F.gelu(g, approximate="tanh")
        return self.w2(g * self.w3(x))
