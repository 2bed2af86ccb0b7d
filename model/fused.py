"""One GEMM for several projections of the same input: MLA's query and kv-latent projections
(``moe.experts.cat_last`` does the same for the routed experts' gate and up: one grouped GEMM of
width 2F).

The parameters stay separate (``wq``, ``wkv_a``; ``w1``, ``w3``): checkpoints, Hugging Face
import/export, FSDP2 sharding and the optimizer see the same tensors as before. Only the compute
concatenates the weights, already cast to the compute dtype, so the cast pass that ran per weight
now writes one wider matrix. One GEMM of N = sum(out_features) reads the input once where the
separate layers read it once each, and in backward the input gradient is one GEMM where it was
several GEMMs plus adds.

The weights' gradients come back as row slices of one gradient: contiguous, so AccumulateGrad takes
them as they are. (The experts' 3-D weights are joined on their last dim; ``cat_last``'s backward
makes its slices contiguous inside the compiled graph.)

Fused only where the layers are plain ``nn.Linear`` with matching biases: a torchao
``Float8Linear`` (``trainer.precision=fp8``) keeps its own forward, which quantizes per layer.

Where it is used is measured (one H200, the user command, docs/PERFORMANCE.md): the experts' gate/up
and MLA's projections are thin (N 1408 and 576) and gain from the wider GEMM (dsv3_mini bf16 +1.4%
with these plus the SwiGLU pair fused). Fusing GQA's q/k/v and the dense SwiGLU's gate/up as well
cost llama_1b 1.3% (77.2k against 78.2k tok/s), so those stay separate layers.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fusable", "fused_linear"]


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
