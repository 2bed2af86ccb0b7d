"""Attention: the kernel seam (``attend``) and the GQA / MLA modules built on it."""

from model.attention.kernels import attend
from model.attention.gqa import GQAttention
from model.attention.mla import MLAttention

__all__ = ["attend", "GQAttention", "MLAttention"]
