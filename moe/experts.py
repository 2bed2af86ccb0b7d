"""Routed experts: E SwiGLU FFNs stored as 3-D weights, run on rows already grouped by expert.

``impl``:
- ``"grouped_mm"``: three grouped GEMMs (gate, up, down) over all experts; no Python loop over
  experts and no host sync (group offsets are a device cumsum). Raises where unsupported.
- ``"loop"``: a per-expert loop of plain matmuls; the reference, and the fallback. It reads the
  counts on the host (one sync).
- ``"padded"``: static shapes for XLA devices (Trainium): rows are scattered into an
  ``[E, C, D]`` buffer of ``C`` slots per expert, three batched matmuls, gathered back. ``C`` is
  the layer's capacity (``capacity_factor``), so a capacity-limited layer drops nothing more; a
  dropless layer (``capacity_factor=0``) gets ``C = N`` (exact, E x the expert FLOPs). No host
  sync and no data-dependent shape, so XLA compiles the step once instead of per routing.
- ``"auto"``: padded on XLA devices; elsewhere grouped_mm where :func:`compat.torch_compat.has_grouped_mm` says it runs for this
  device, dtype and dims (CUDA sm90+ bf16; CPU on torch >= 2.13; dims*elem_size % 16 == 0),
  else loop. The choice depends only on static properties, so it is compile-friendly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import math

from compat.torch_compat import grouped_mm, has_grouped_mm, index_select_1d
from moe.fp8_experts import fp8_swiglu
from moe.shared import trunc_normal_fp32_

__all__ = ["GroupedExperts", "IMPLS"]

IMPLS = ("auto", "grouped_mm", "loop", "padded")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on for ``x``'s device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, expert_dim: int, impl: str = "auto",
                 capacity_factor: float = 0.0):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
        self.n_experts, self.d_model, self.expert_dim, self.impl = n_experts, d_model, expert_dim, impl
        self.capacity_factor = capacity_factor  # the layer's; sizes the padded path's slots
        # Set by model.fp8.convert_to_fp8 (trainer.precision=fp8): the grouped path then runs its
        # GEMMs through this fp8 grouped GEMM on 16-row-aligned groups (moe/fp8_experts.py; CPU
        # tests set a plain grouped GEMM to check the layout). None = GEMMs in the compute dtype.
        self.fp8_mm = None
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
        if x_ND.device.type == "xla":
            return "padded"
        ok = has_grouped_mm(x_ND.device, compute_dtype(x_ND), (self.d_model, self.expert_dim))
        return "grouped_mm" if ok else "loop"

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``tokens_per_expert_E`` rows each; rows past their sum
        (dropped assignments) give zeros and receive zero gradient."""
        # Autocast does not cover grouped_mm, and the residual stream arrives in fp32: without this
        # the experts would run in fp32 (and, compiled, fall back to the loop) under bf16 autocast.
        x_ND = x_ND.to(compute_dtype(x_ND))
        impl = self.resolve_impl(x_ND)
        if impl == "grouped_mm" and self.fp8_mm is not None:
            return fp8_swiglu(x_ND, self.w1, self.w3, self.w2, tokens_per_expert_E, self.fp8_mm)
        if impl == "grouped_mm":
            return self._forward_grouped(x_ND, tokens_per_expert_E)
        if impl == "padded":
            return self._forward_padded(x_ND, tokens_per_expert_E)
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

    def slots_per_expert(self, n_rows: int) -> int:
        """C of the padded path: the layer's capacity for ``n_rows`` = tokens x top_k rows
        (``moe.layer.capacity``), or every row when dropless."""
        if self.capacity_factor > 0:
            return min(n_rows, math.ceil(self.capacity_factor * n_rows / self.w1.shape[0]))
        return n_rows

    def _forward_padded(self, x_ND, tokens_per_expert_E):
        N, D = x_ND.shape
        E = self.w1.shape[0]
        C = self.slots_per_expert(N)
        offs_E = torch.cumsum(tokens_per_expert_E, dim=0)
        row_N = torch.arange(N, device=x_ND.device)
        # Rows arrive sorted by expert: row i is expert e's (i - start_e)-th; rows past the total
        # (dropped assignments) get e = E.
        expert_N = (row_N.unsqueeze(1) >= offs_E.unsqueeze(0)).sum(dim=1)
        e_N = expert_N.clamp(max=E - 1)
        pos_N = row_N - index_select_1d(offs_E - tokens_per_expert_E, e_N)
        keep_N = (expert_N < E) & (pos_N < C)
        # Slot E*C is a sink for rows without a slot; it is never computed on and reads back zero.
        slot_N = torch.where(keep_N, e_N * C + pos_N, torch.full_like(pos_N, E * C))
        buf = x_ND.new_zeros(E * C + 1, D).index_copy(0, slot_N, x_ND)
        x_ECD = buf[: E * C].view(E, C, D)
        dt = x_ND.dtype
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1.to(dt))) * torch.bmm(x_ECD, self.w3.to(dt))
        y_SD = torch.bmm(h_ECF, self.w2.to(dt)).reshape(E * C, D)
        y_SD = torch.cat([y_SD, y_SD.new_zeros(1, D)])
        return y_SD.index_select(0, slot_N)

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
