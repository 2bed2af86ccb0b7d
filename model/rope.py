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


# Tables per (dim, T, RoPE settings, device): the attention layers read them instead of computing
# cos/sin themselves. Computed inside a compiled block, inductor fuses pow/cos/sin into the q/k
# kernels and evaluates them per element, per head, in forward and again in backward (MLA on an
# H100: ~10 ms of a 212 ms dsv3_mini step); a table read is memory traffic only.
_TABLES: dict = {}
_TABLES_MAX = 32  # distinct (dim, T, settings, device) kept; sequence lengths rarely vary more


def _table_key(dim: int, seq_len: int, rope: RopeConfig, device) -> tuple:
    # Plain field reads (no dataclasses.astuple): torch.compile traces this without a graph break.
    return (dim, seq_len, float(rope.theta), float(rope.yarn_factor), int(rope.yarn_original_max_position),
            float(rope.yarn_beta_fast), float(rope.yarn_beta_slow), float(rope.yarn_mscale),
            float(rope.yarn_mscale_all_dim), str(device))


def rope_tables(dim: int, seq_len: int, rope: RopeConfig, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rope_cos_sin`` in fp32, cached. Filled by ``prepare_rope_tables`` outside compiled or
    checkpointed regions (a cache write there would break the graph); inside them a missing entry is
    computed and not stored."""
    key = _table_key(dim, seq_len, rope, device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    tables = rope_cos_sin(dim, seq_len, rope, device=device)
    if not torch.compiler.is_compiling():
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.pop(next(iter(_TABLES)))  # oldest first
        _TABLES[key] = tables
    return tables


def prepare_rope_tables(specs, seq_len: int, device) -> None:
    """Fill the cache for each ``(dim, rope)`` in ``specs`` (``Transformer.forward_hidden`` calls
    this before its blocks, outside any compiled region)."""
    if torch.compiler.is_compiling():
        return
    for dim, rope in specs:
        rope_tables(dim, seq_len, rope, device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., T, D]``) by the tables; cos/sin are cast to x's dtype, as HF does."""
    cos_TD = cos_TD.to(x_BHTD.dtype)
    sin_TD = sin_TD.to(x_BHTD.dtype)
    return x_BHTD * cos_TD + rotate_half(x_BHTD) * sin_TD
