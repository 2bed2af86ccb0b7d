"""Routed experts: E SwiGLU FFNs stored as 3-D weights, run on rows already grouped by expert.

``impl``:
- ``"grouped_mm"``: three grouped GEMMs (gate, up, down) over all experts; no Python loop over
  experts and no host sync (group offsets are a device cumsum). Raises where unsupported.
- ``"loop"``: a per-expert loop of plain matmuls; the reference, and the fallback. It reads the
  counts on the host (one sync).
- ``"auto"``: grouped_mm where :func:`model.torch_compat.has_grouped_mm` says it runs for this
  device, dtype and dims (CUDA sm90+ bf16; CPU on torch >= 2.13; dims*elem_size % 16 == 0),
  else loop. The choice depends only on static properties, so it is compile-friendly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.torch_compat import grouped_mm, has_grouped_mm
from moe.shared import trunc_normal_fp32_

__all__ = ["GroupedExperts", "IMPLS"]

IMPLS = ("auto", "grouped_mm", "loop")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on for ``x``'s device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, expert_dim: int, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
        self.n_experts, self.d_model, self.expert_dim, self.impl = n_experts, d_model, expert_dim, impl
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, expert_dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_dim, d_model))  # down
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        trunc_normal_fp32_(self.w1, std)
        trunc_normal_fp32_(self.w3, std)
        trunc_normal_fp32_(self.w2, std if out_std is None else out_std)

    def resolve_impl(self, x_ND: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        ok = has_grouped_mm(x_ND.device, compute_dtype(x_ND), (self.d_model, self.expert_dim))
        return "grouped_mm" if ok else "loop"

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``tokens_per_expert_E`` rows each; rows past their sum
        (dropped assignments) give zeros and receive zero gradient."""
        # Autocast does not cover grouped_mm, and the residual stream arrives in fp32: without this
        # the experts would run in fp32 (and, compiled, fall back to the loop) under bf16 autocast.
        x_ND = x_ND.to(compute_dtype(x_ND))
        if self.resolve_impl(x_ND) == "grouped_mm":
            return self._forward_grouped(x_ND, tokens_per_expert_E)
        return self._forward_loop(x_ND, tokens_per_expert_E)

    def _forward_grouped(self, x_ND, tokens_per_expert_E):
        offs_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
        # grouped_mm leaves rows past offs[-1] unwritten (garbage, possibly NaN), in forward
        # and for dx in backward: mask the input and the output.
        valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs_E[-1]).unsqueeze(-1)
        x_ND = torch.where(valid_N1, x_ND, 0.0)
        dt = x_ND.dtype
        h_NF = F.silu(grouped_mm(x_ND, self.w1.to(dt), offs_E)) * grouped_mm(x_ND, self.w3.to(dt), offs_E)
        y_ND = grouped_mm(h_NF, self.w2.to(dt), offs_E)
        return torch.where(valid_N1, y_ND, 0.0)

    def _forward_loop(self, x_ND, tokens_per_expert_E):
        counts = tokens_per_expert_E.tolist()  # host sync: the reference path only
        dt = x_ND.dtype
        outs, start = [], 0
        for e, n in enumerate(counts):
            xe = x_ND[start:start + n]
            h = F.silu(xe @ self.w1[e].to(dt)) * (xe @ self.w3[e].to(dt))
            outs.append(h @ self.w2[e].to(dt))
            start += n
        rest = x_ND.shape[0] - start
        outs.append(x_ND.new_zeros(rest, self.d_model))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, expert_dim={self.expert_dim}, "
                f"impl={self.impl}")
