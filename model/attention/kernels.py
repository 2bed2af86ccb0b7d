"""The one attention kernel seam: ``attend``.

Window semantics (identical to Hugging Face's ``sliding_window`` in ``masking_utils``: causal
``kv_idx <= q_idx`` AND overlay ``kv_idx > q_idx - sliding_window``): with ``window = W > 0``
query ``i`` sees keys ``j`` with ``i - W < j <= i`` -- W keys including itself. ``window = 0`` is
full causal attention.

Backends:

* ``eager``: plain matmul/softmax (fp32 softmax), the reference.
* ``sdpa``: ``F.scaled_dot_product_attention``; ``is_causal=True`` for full causal, a materialised
  boolean ``T x T`` mask for windows (CPU only -- never on CUDA).
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's kernel) with its
  ``window_size``: the kernel skips the key blocks outside the window (CUDA, bf16/fp16, equal
  q/k/v head dims up to 256; torch versions whose varlen_attn takes ``window_size``).
* ``cudnn``: cuDNN's fused attention with its window (diagonal band) through NVIDIA's
  cudnn-frontend torch op (``cudnn_band.py``; CUDA, bf16/fp16, the optional package
  ``nvidia-cudnn-frontend``).
* ``flex``: FlexAttention with a cached causal+window block mask; compiled on CUDA. On CPU flex has
  no backward: use it forward-only there.
* ``auto``: on CUDA, SDPA for full causal (cuDNN's kernel takes MLA's 192/128 dims in bf16 on
  Hopper; elsewhere unequal dims go to flex), flex for windows; off CUDA, SDPA (masked for
  windows).

GQA: ``k``/``v`` carry ``h`` heads with ``H % h == 0``; query head ``i`` uses kv head
``i // (H // h)`` (as HF's ``repeat_kv``). SDPA and flex get ``enable_gqa=True`` instead of a copy.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from model.attention import cudnn_band
from compat.torch_compat import cuda_capability

BACKENDS = ("auto", "sdpa", "flex", "varlen", "cudnn", "eager")

_BLOCK_MASKS: Dict[Tuple[int, int, str], object] = {}
_compiled_flex: Optional[Callable] = None
_cudnn_sdp_on: Optional[bool] = None  # torch.backends.cuda.cudnn_sdp_enabled(), as prepare() last read it


def _repeat_kv(x_BhTD: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x_BhTD
    B, h, T, D = x_BhTD.shape
    return x_BhTD[:, :, None].expand(B, h, n_rep, T, D).reshape(B, h * n_rep, T, D)


def window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """Boolean ``[T, T]`` mask, True where query ``i`` may attend key ``j`` (CPU / tests only)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    keep = j <= i
    if window > 0:
        keep = keep & (j > i - window)
    return keep


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend expects 4-D [B, heads, T, dim] tensors, got {q.shape}, {k.shape}, {v.shape}")
    H, h = q.shape[1], k.shape[1]
    if v.shape[1] != h or H % h != 0:
        raise ValueError(f"kv heads {h} (v: {v.shape[1]}) must match and divide query heads {H}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError("attend is for self-attention over one sequence: q, k, v need the same T")
    if window < 0:
        raise ValueError(f"window={window} must be >= 0 (0 = full causal)")
    return H // h


def _eager(q, k, v, window: int, scale: float, n_rep: int) -> torch.Tensor:
    k = _repeat_kv(k, n_rep)
    v = _repeat_kv(v, n_rep)
    scores_BHTT = torch.matmul(q, k.transpose(-2, -1)) * scale
    keep_TT = window_mask(q.shape[2], window, device=q.device)
    scores_BHTT = scores_BHTT.masked_fill(~keep_TT, float("-inf"))
    probs_BHTT = torch.softmax(scores_BHTT, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs_BHTT, v)


def _sdpa(q, k, v, window: int, scale: float, n_rep: int) -> torch.Tensor:
    # enable_gqa: every torch we support has it (>= 2.5). No lazy probe here: a module global set
    # on first call is a side effect dynamo refuses inside activation checkpointing's region, and
    # that graph break ran whole checkpointed blocks uncompiled.
    kwargs = {"enable_gqa": True} if n_rep > 1 else {}
    if window == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kwargs)
    if q.is_cuda:
        raise ValueError("attention backend 'sdpa' with a sliding window would materialise a T x T mask "
                         "on the GPU; use backend 'flex' or 'auto'")
    mask_TT = window_mask(q.shape[2], window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TT, scale=scale, **kwargs)


def _mask_mod(window: int):
    if window == 0:
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
        return causal

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    return sliding


def flex_block_mask(T: int, window: int, device: torch.device):
    """Block mask for causal (+ window) attention over ``T`` tokens, cached per (T, window, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    key = (T, window, str(device))
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        # _compile builds the block mask without materialising the dense T x T mask on the GPU.
        compile_mask = device.type == "cuda" and not torch.compiler.is_compiling()
        bm = create_block_mask(_mask_mod(window), B=None, H=None, Q_LEN=T, KV_LEN=T, device=device,
                               _compile=compile_mask)
        _BLOCK_MASKS[key] = bm
    return bm


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        # Inside an outer torch.compile dynamo compiles flex itself; on CPU we run it unfused.
        return flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# fp32 with head dims over 128 (MLA's 192) overflows the 227 KiB of shared memory per SM of
# H100/H200 with flex's default tiles (torch 2.11: "out of resource ... Required: 278784"); these
# smaller tiles fit. bf16 -- the training dtype -- keeps the defaults.
_FP32_WIDE_HEAD_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2,
                           "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32}


# bf16 with head dims over 128 (gemma3's 256): 128x32 tiles, 8 warps, 2 stages ran a window-1024
# layer's fwd+bwd in 1.33-1.38 ms vs 1.57-1.71 ms with the defaults, and vs 1.49 ms for
# FlashAttention's varlen window kernel, on an H100 (docs/PERFORMANCE.md, `python -m bench attn`).
_BF16_WIDE_HEAD_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}


def _flex_kernel_options(q: torch.Tensor, v: torch.Tensor) -> Optional[dict]:
    if not q.is_cuda or max(q.shape[-1], v.shape[-1]) <= 128:
        return None
    if q.dtype == torch.float32:
        return dict(_FP32_WIDE_HEAD_OPTIONS)
    return dict(_BF16_WIDE_HEAD_OPTIONS)


def _flex(q, k, v, window: int, scale: float, n_rep: int) -> torch.Tensor:
    block_mask = flex_block_mask(q.shape[2], window, q.device)
    return _flex_fn(q.device)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=n_rep > 1,
                              kernel_options=_flex_kernel_options(q, v))


_varlen_api: Optional[Tuple[Optional[Callable], bool]] = None


def _varlen_fn() -> Tuple[Optional[Callable], bool]:
    """(varlen_attn, takes enable_gqa) when this torch's varlen_attn has ``window_size``, else (None, _)."""
    global _varlen_api
    if _varlen_api is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _varlen_api = (None, False)
        else:
            params = inspect.signature(varlen_attn).parameters
            _varlen_api = (varlen_attn if "window_size" in params else None, "enable_gqa" in params)
    return _varlen_api


def _varlen(q, k, v, window: int, scale: float, n_rep: int) -> torch.Tensor:
    fn, takes_gqa = _varlen_fn()
    if fn is None:
        raise ValueError("attention backend 'varlen' needs torch.nn.attention.varlen.varlen_attn with "
                         "window_size (torch >= 2.10); use backend 'flex' or 'auto'")
    kwargs = {}
    if n_rep > 1:
        if takes_gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    B, H, T, D = q.shape
    # Packed [B*T, heads, dim] with B sequences of T tokens each.
    q_NHD = q.transpose(1, 2).reshape(B * T, H, D)
    k_NhD = k.transpose(1, 2).reshape(B * T, k.shape[1], D)
    v_NhE = v.transpose(1, 2).reshape(B * T, v.shape[1], v.shape[-1])
    cu_seq = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    # FlashAttention's window (left, right): keys i - left <= j <= i + right. Ours: W keys up to i.
    left = window - 1 if window > 0 else -1
    o_NHE = fn(q_NHD, k_NhD, v_NhE, cu_seq, cu_seq, T, T, scale=scale, window_size=(left, 0), **kwargs)
    return o_NHE.view(B, T, H, v.shape[-1]).transpose(1, 2)


def prepare(T: int, windows, device: torch.device) -> None:
    """Fill the lazy caches (flex block masks for ``T`` tokens and each window, the varlen API)
    outside any compiled or checkpointed region. Inside activation checkpointing's region dynamo
    refuses a cache write ("non-nullified side effect"), breaks the graph, and the whole block then
    runs uncompiled; ``Transformer.forward_hidden`` calls this before its blocks on CUDA."""
    global _cudnn_sdp_on
    if torch.compiler.is_compiling() or torch.device(device).type != "cuda":
        return
    for window in windows:
        flex_block_mask(T, window, device)
    _varlen_fn()
    cuda_capability(device)
    _cudnn_sdp_on = torch.backends.cuda.cudnn_sdp_enabled()  # read per forward: users may toggle it


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor, window: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} must be one of {BACKENDS}")
    if backend != "auto":
        return backend
    if q.is_cuda:
        if window > 0:
            # flex with tuned tiles: at gemma3's head dim 256 it ran a window-1024 layer in 1.09-1.11 ms
            # fwd+bwd vs 1.20-1.50 ms for cuDNN's band kernel ("cudnn") and 1.44-2.00 ms for
            # "varlen", H100 (docs/PERFORMANCE.md). Both stay selectable.
            return "flex"
        return "sdpa" if q.shape[-1] == v.shape[-1] or _cudnn_takes_unequal_dims(q) else "flex"
    return "sdpa"


def _cudnn_takes_unequal_dims(q: torch.Tensor) -> bool:
    """SDPA reaches cuDNN's fused attention, which takes q/k and v head dims that differ (MLA's
    192/128), in bf16/fp16 on Hopper and newer: 295 TFLOP/s fwd+bwd vs FlexAttention's 121 on an
    H100 (docs/PERFORMANCE.md). Elsewhere SDPA would fall back to its slow memory-efficient
    kernel, and FlexAttention is the better choice."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return False
    sdp_on = torch.backends.cuda.cudnn_sdp_enabled() if _cudnn_sdp_on is None else _cudnn_sdp_on
    cap = cuda_capability(q.device)
    return bool(sdp_on) and cap is not None and cap >= (9, 0)


def attend(q_BHTD: torch.Tensor, k_BhTD: torch.Tensor, v_BhTE: torch.Tensor, *, window: int,
           scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal (optionally sliding-window) attention; returns ``[B, H, T, E]``."""
    n_rep = _check(q_BHTD, k_BhTD, v_BhTE, window)
    which = resolve_backend(backend, q_BHTD, v_BhTE, window)
    if which == "eager":
        return _eager(q_BHTD, k_BhTD, v_BhTE, window, scale, n_rep)
    if which == "sdpa":
        return _sdpa(q_BHTD, k_BhTD, v_BhTE, window, scale, n_rep)
    if which == "varlen":
        return _varlen(q_BHTD, k_BhTD, v_BhTE, window, scale, n_rep)
    if which == "cudnn":
        return cudnn_band.attend_band(q_BHTD, k_BhTD, v_BhTE, window, scale)
    return _flex(q_BHTD, k_BhTD, v_BhTE, window, scale, n_rep)
