"""One GEMM for several projections of the same input (attention's q/k/v, SwiGLU's gate/up).

The parameters stay separate (``wq``, ``wk``, ``wv``; ``w1``, ``w3``): checkpoints, Hugging Face
import/export, FSDP2 sharding and the optimizer see the same tensors as before. Only the compute
concatenates the weights, already cast to the compute dtype, so the cast pass that ran per weight
now writes one wider matrix. One GEMM of N = sum(out_features) reads the input once where the
separate layers read it once each, and in backward the input gradient is one GEMM where it was
several GEMMs plus adds.

The weights' gradients come back as slices of one gradient: row slices for ``nn.Linear``
(contiguous), and, for the routed experts' 3-D weights concatenated on their last dim, slices made
contiguous in the compiled backward (:class:`_CatLast`), so AccumulateGrad never makes an eager
strided copy.

Fused only where the layers are plain ``nn.Linear`` with matching biases: a torchao
``Float8Linear`` (``trainer.precision=fp8``) keeps its own forward, which quantizes per layer.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fusable", "fused_linear", "cat_last"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def fusable(mods: Sequence[nn.Module]) -> bool:
    """Plain ``nn.Linear`` layers (not a subclass such as torchao's ``Float8Linear``), all with a
    bias or all without, and the same input width."""
    if not all(type(m) is nn.Linear for m in mods):
        return False
    if len({m.bias is None for m in mods}) != 1 or len({m.in_features for m in mods}) != 1:
        return False
    return True


def fused_linear(x: torch.Tensor, mods: Sequence[nn.Linear]) -> List[torch.Tensor]:
    """``[m(x) for m in mods]`` computed as one GEMM when :func:`fusable`, else layer by layer."""
    if not fusable(mods):
        return [m(x) for m in mods]
    dt = _compute_dtype(x)
    w = torch.cat([m.weight.to(dt) for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias.to(dt) for m in mods])
    y = F.linear(x, w, b)
    return list(y.split([m.out_features for m in mods], dim=-1))


class _CatLast(torch.autograd.Function):
    """Forward: the tensors cast to ``dtype`` and concatenated on the last dim. Backward: each
    gradient slice cast back to its tensor's dtype and made contiguous (the parameter's layout)."""

    @staticmethod
    def forward(ctx, dtype, *ws):
        ctx.sizes = [w.shape[-1] for w in ws]
        ctx.dtypes = [w.dtype for w in ws]
        return torch.cat([w.to(dtype) for w in ws], dim=-1)

    @staticmethod
    def backward(ctx, g):
        parts = g.split(ctx.sizes, dim=-1)
        return (None, *[p.to(d).contiguous() for p, d in zip(parts, ctx.dtypes)])


def cat_last(dtype: torch.dtype, *ws: torch.Tensor) -> torch.Tensor:
    """``torch.cat([w.to(dtype) for w in ws], -1)`` whose gradients come back contiguous."""
    return _CatLast.apply(dtype, *ws)
