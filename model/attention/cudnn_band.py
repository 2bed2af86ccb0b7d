"""cuDNN's fused attention with a sliding window (a "diagonal band"), through NVIDIA's
cudnn-frontend package.

PyTorch's SDPA reaches cuDNN's fused kernel only for full causal attention: it has no window
argument. cuDNN's kernel itself takes one (``diagonal_band_left_bound``) and skips the key tiles
outside it. NVIDIA's ``nvidia-cudnn-frontend`` Python package (>= 1.32, the version checked here; our ``cudnn`` extra)
registers ``torch.ops.cudnn.sdpa_fwd`` with autograd (its backward is cuDNN's fused backward) and
a fake kernel, so the op also runs under ``torch.compile``.

Window semantics are ours (``kernels.py``): query ``i`` sees keys ``i - W < j <= i``, W keys
including itself; cuDNN's left bound counts the same W keys (checked against the fp32 reference
in ``tests/gpu/test_attention_gpu.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from compat.torch_compat import cuda_capability

_INSTALL_HINT = "pip install 'nvidia-cudnn-frontend>=1.32' (moeforge's 'cudnn' extra)"
_op_state: Optional[str] = None  # "" when the op loaded; otherwise why it did not


def _load() -> str:
    """Import cudnn-frontend's torch op once; return "" on success, else the reason it is missing."""
    global _op_state
    if _op_state is None:
        try:
            import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd)
        except Exception as e:  # noqa: BLE001 - absent, too old, or no cuDNN library: all mean "unavailable"
            _op_state = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        else:
            _op_state = "" if hasattr(torch.ops.cudnn, "sdpa_fwd") else "cudnn-frontend has no torch op (too old)"
    return _op_state


def preload() -> None:
    """Load the op ahead of ``torch.compile`` (dynamo should not trace an import); a no-op without CUDA."""
    if torch.cuda.is_available():
        _load()


def unavailable_reason(q: torch.Tensor) -> str:
    """Why this path cannot run ``q`` ("" when it can)."""
    if not q.is_cuda:
        return "it needs a CUDA tensor"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bf16/fp16 inputs, got {q.dtype}"
    if (cuda_capability(q.device) or (0, 0)) < (8, 0):
        return "it needs an Ampere or newer GPU"
    if _op_state is None and torch.compiler.is_compiling():
        return "cudnn-frontend was not loaded before torch.compile (model.attention.cudnn_band.preload())"
    why = _load()
    return f"nvidia-cudnn-frontend is not usable ({why}); {_INSTALL_HINT}" if why else ""


def attend_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Causal attention over ``[B, H, T, D]`` (k/v with ``h`` heads, ``H % h == 0``), each query
    seeing its last ``window`` keys (``window = 0``: full causal)."""
    why = unavailable_reason(q)
    if why:
        raise ValueError(f"attention backend 'cudnn': {why}")
    # return_lse=True: the registered backward consumes the forward's softmax statistics.
    out, _lse = torch.ops.cudnn.sdpa_fwd(q, k, v, float(scale), is_causal=True,
                                         window_left=window if window > 0 else -1, window_right=0,
                                         return_lse=True)
    return out
