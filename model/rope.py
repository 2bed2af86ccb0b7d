"""Rotary position embeddings (RoPE) with optional YaRN scaling, as pure functions.

Layout is Hugging Face's "rotate_half": the ``dim/2`` frequencies are duplicated
(``cat(freqs, freqs)``) and the second half of a head is rotated against the first.

YaRN follows transformers' ``_compute_yarn_parameters`` (used by DeepSeek-V3):

* inverse frequencies blend interpolation (``1/(factor * base^(2i/d))``) and extrapolation
  (``1/base^(2i/d)``) with a linear ramp over the dims between the correction range given by
  ``beta_fast``/``beta_slow`` at ``yarn_original_max_position`` (range truncated to integers);
* cos/sin are multiplied by the "attention factor"
  ``mscale(factor, yarn_mscale) / mscale(factor, yarn_mscale_all_dim)`` when both are non-zero,
  else ``mscale(factor, 1)`` -- HF's convention (DeepSeek-V3: mscale = mscale_all_dim = 1, so 1.0);
* the softmax scale of MLA additionally gets ``mscale(factor, mscale_all_dim)^2`` when
  ``mscale_all_dim > 0`` (``yarn_softmax_mscale``; HF's ``yarn_apply_mscale``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import torch

from model.config import RopeConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_enabled(rope: RopeConfig) -> bool:
    return rope.yarn_factor > 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """Factor multiplied into cos/sin (1.0 without YaRN)."""
    if not _yarn_enabled(rope):
        return 1.0
    f = rope.yarn_factor
    if rope.yarn_mscale and rope.yarn_mscale_all_dim:
        return float(yarn_get_mscale(f, rope.yarn_mscale) / yarn_get_mscale(f, rope.yarn_mscale_all_dim))
    return float(yarn_get_mscale(f))


def yarn_softmax_mscale(rope: RopeConfig) -> float:
    """Multiplier of MLA's softmax scale: ``mscale(factor, mscale_all_dim)^2`` (1.0 when unused)."""
    if not _yarn_enabled(rope) or not rope.yarn_mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(rope.yarn_factor, rope.yarn_mscale_all_dim)
    return m * m


def rope_for_window(rope: RopeConfig, window: int) -> RopeConfig:
    """The RoPE settings of a layer: sliding-window layers use ``local_theta`` when it is set."""
    if window > 0 and rope.local_theta > 0:
        return dataclasses.replace(rope, theta=rope.local_theta)
    return rope


def rope_inv_freq(dim: int, rope: RopeConfig, device=None) -> torch.Tensor:
    """The ``dim/2`` inverse frequencies in fp32, YaRN-blended when ``rope.yarn_factor > 1``."""
    if dim % 2 != 0:
        raise ValueError(f"RoPE dim {dim} must be even")
    base = float(rope.theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if not _yarn_enabled(rope):
        return 1.0 / pos_freqs
    factor = float(rope.yarn_factor)
    orig = rope.yarn_original_max_position

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 on the fast-rotating dims, which keep their original frequency
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    return inv_inter * (1 - extrapolation) + inv_extra * extrapolation


def rope_cos_sin(dim: int, seq_len: int, rope: RopeConfig, device=None,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions ``0..seq_len-1``, each ``[seq_len, dim]``, computed in fp32."""
    inv_freq_F = rope_inv_freq(dim, rope, device=device)
    pos_T = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs_TF = pos_T[:, None] * inv_freq_F[None, :]
    emb_TD = torch.cat((freqs_TF, freqs_TF), dim=-1)
    attn_factor = yarn_attention_factor(rope)
    cos_TD = emb_TD.cos() * attn_factor
    sin_TD = emb_TD.sin() * attn_factor
    return cos_TD.to(dtype), sin_TD.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., T, D]``) by the tables; cos/sin are cast to x's dtype, as HF does."""
    cos_TD = cos_TD.to(x_BHTD.dtype)
    sin_TD = sin_TD.to(x_BHTD.dtype)
    return x_BHTD * cos_TD + rotate_half(x_BHTD) * sin_TD
