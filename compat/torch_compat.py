"""The one place that knows version-dependent and private PyTorch APIs.

Nothing outside ``compat/`` names a private torch symbol (``torch._*``, ``torch.distributed._*``,
``DTensor._local_tensor``); each one used elsewhere has a small function here. This package
imports nothing of ours, so every package may use it.

Grouped GEMM (one kernel for all experts' jagged token groups):

- ``torch.nn.functional.grouped_mm`` is public in 2.11.0+cu130 and 2.13.0+cpu (both probed);
  older builds only have the private ``torch._grouped_mm`` (same call: ``(mat_a, mat_b, offs=)``),
  used when the public name is missing.
- Probed 2026-11-22 on torch 2.11.0+cu130, H200 (sm90): bf16, fp16 and fp32 all run forward and
  backward; on CPU (2.11 and 2.13) fp32, bf16 and fp16 do too. Before sm90 we do not rely on it
  (the fast CUTLASS kernel is sm90+), so ``has_grouped_mm`` says False there and callers use the
  loop. bf16 is the dtype it is fast for; fp32 on CUDA is for tests.

What the kernel requires (same checks on CPU and CUDA):

- every operand's row stride must be a multiple of 16 bytes ("strides should be multiple of 16
  bytes"): ``d_model`` and ``expert_dim`` must be multiples of 4 (fp32) or 8 (bf16/fp16);
- ``offs`` must be int32 cumulative group ends; empty groups (repeated offsets) are fine; group
  starts need NOT be aligned (offs 3,3,7,10 gave exact results on CPU and on H200 in bf16), so
  no per-expert padding of rows is needed;
- rows after ``offs[-1]`` are NOT written (they hold garbage, even NaN): callers mask them;
- under ``torch.compile`` only bf16 traces (the meta kernel checks for bf16); a bf16 MoELayer
  compiles with ``fullgraph=True`` (checked with the aot_eager backend on CPU);
- backward fails ("Invalid strides/sizes, got [0, 0]") when the incoming gradient is an expanded
  zero-stride tensor, which is exactly what ``y.sum().backward()`` produces. ``y.contiguous()`` in
  forward does not help (y is already contiguous, so it is a no-op); :func:`grouped_mm` therefore
  passes its output through an identity whose backward materialises the gradient.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["dcp_metadata_path", "grouped_mm", "grouped_mm_fn", "has_grouped_mm", "grouped_mm_dims_ok",
           "index_select_1d", "index_select_rows", "cuda_capability", "all_to_all_single_autograd", "foreach_mul_",
           "dump_flight_recorder_trace", "dtensor_local", "fsspec_reader_writer", "dynamo_reset",
           "raise_dynamo_recompile_limits"]


def grouped_mm_fn() -> Optional[Callable]:
    """The grouped GEMM of this torch build, or None."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return fn
    return getattr(torch, "_grouped_mm", None)


def grouped_mm_dims_ok(dims: Sequence[int], dtype: torch.dtype) -> bool:
    """Row strides of the operands (the inner dims) must be multiples of 16 bytes."""
    return all((d * dtype.itemsize) % 16 == 0 for d in dims)


_CUDA_CAPABILITY: dict = {}


def cuda_capability(device: torch.device | str) -> Optional[Tuple[int, int]]:
    """``torch.cuda.get_device_capability`` cached per device index (None without CUDA).

    Inside a compiled region that call returns a non-tensor and breaks the graph; under activation
    checkpointing the whole block then runs uncompiled (measured: a ``dsv3_mini`` step at eager
    speed). ``model.attention.kernels.prepare`` fills this cache before the blocks run; a call
    that misses it while compiling still answers, uncached.
    """
    device = torch.device(device)
    index = device.index
    cap = _CUDA_CAPABILITY.get(index)
    if cap is None:
        if not torch.cuda.is_available():
            return None
        cap = tuple(torch.cuda.get_device_capability(device))
        if not torch.compiler.is_compiling():
            _CUDA_CAPABILITY[index] = cap
    return cap


def has_grouped_mm(device: torch.device | str, dtype: Optional[torch.dtype] = None,
                   dims: Sequence[int] = ()) -> bool:
    """Whether :func:`grouped_mm` runs (forward and backward) for this device, dtype and dims.

    ``dtype`` None asks about the device alone (for CUDA: with bf16 operands).
    """
    if grouped_mm_fn() is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        cap = cuda_capability(device)
        if cap is None or cap[0] < 9:
            return False
        ok_dtypes = (torch.bfloat16, torch.float16, torch.float32)
        dtype = torch.bfloat16 if dtype is None else dtype
    elif device.type == "cpu":
        ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
        dtype = torch.float32 if dtype is None else dtype
    else:
        return False
    if dtype not in ok_dtypes:
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # The meta (fake tensor) kernel used by torch.compile accepts bf16 only ("Expected inputs
        # of BF16 type"), although eager runs fp32/fp16: compiled fp32 models take the loop.
        return False
    return grouped_mm_dims_ok(dims, dtype)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands grouped_mm a materialised (non-expanded) gradient."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        if any(s == 0 for s in g.stride()) or not g.is_contiguous():
            g = g.clone(memory_format=torch.contiguous_format)
        return g


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of group e] = x[rows of group e] @ w[e]`` for the jagged groups ending at offs.

    ``offs_E``: int32 cumulative group ends (``cumsum(tokens_per_expert)``). Rows of x past
    ``offs_E[-1]`` produce unspecified output rows; mask them. Raises RuntimeError where the
    build has no grouped GEMM (check :func:`has_grouped_mm` and fall back first).
    """
    fn = grouped_mm_fn()
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm; use the loop experts")
    if offs_E.dtype != torch.int32:
        offs_E = offs_E.to(torch.int32)
    y_NF = fn(x_ND, w_EDF, offs=offs_E)
    if torch.is_grad_enabled() and y_NF.requires_grad:
        y_NF = _DenseGrad.apply(y_NF)
    return y_NF


def index_select_1d(x_N: torch.Tensor, index_M: torch.Tensor) -> torch.Tensor:
    """``x_N.index_select(0, index_M)`` for a 1-D ``x_N``.

    torch-xla 2.9.0 (PJRT CPU, probed 2026-11-22) aborts the process ("F shape.h:848 Check failed:
    buffer != nullptr") when ``index_select``'s index is a sort's indices output (``argsort``,
    ``sort().indices``) still pending in the lazy graph; ``gather`` computes the same and runs.
    CPU and CUDA keep ``index_select``.
    """
    if x_N.device.type == "xla":
        return torch.gather(x_N, 0, index_M)
    return x_N.index_select(0, index_M)


def index_select_rows(x_ND: torch.Tensor, index_M: torch.Tensor) -> torch.Tensor:
    """``x_ND.index_select(0, index_M)`` for a 2-D ``x_ND``; the same torch-xla 2.9 abort as
    ``index_select_1d`` (an index still pending from a sort), the same ``gather`` way round."""
    if x_ND.device.type == "xla":
        return torch.gather(x_ND, 0, index_M.unsqueeze(-1).expand(-1, x_ND.shape[-1]))
    return x_ND.index_select(0, index_M)


def all_to_all_single_autograd(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all (backward is the reverse all-to-all), waited on.

    ``torch.distributed._functional_collectives`` is private; its ``all_to_all_single_autograd``
    is the only differentiable uneven all-to-all in torch (gloo and NCCL, zero-row splits included).
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a, wait_tensor

    return wait_tensor(a2a(x, out_splits, in_splits, group))


def foreach_mul_(tensors: List[torch.Tensor], scalar: torch.Tensor) -> None:
    """``torch._foreach_mul_``: one fused in-place multiply over a list (no public name yet)."""
    torch._foreach_mul_(tensors, scalar)


def foreach_norm(tensors: List[torch.Tensor], ord: float, dtype: torch.dtype) -> List[torch.Tensor]:
    """Per-tensor norms accumulated and returned in ``dtype`` (``torch._foreach_norm``'s dtype
    argument): bf16 gradients (optim.master_weights) get fp32 norms without an fp32 copy of each."""
    return list(torch._foreach_norm(tensors, ord, dtype=dtype))


def dump_flight_recorder_trace() -> Optional[bytes]:
    """The pickled NCCL/c10d flight-recorder trace, or None where this build cannot produce one.

    ``torch._C._distributed_c10d`` is private: ``_dump_nccl_trace`` (CUDA builds; includes NCCL
    communicator state), else ``_dump_fr_trace`` (any backend, torch >= 2.9). Exceptions from the
    dump itself propagate: the caller decides whether they matter.
    """
    try:
        from torch._C import _distributed_c10d as c10d
    except ImportError:
        return None
    fn = getattr(c10d, "_dump_nccl_trace", None) or getattr(c10d, "_dump_fr_trace", None)
    return None if fn is None else fn()


def dtensor_local(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The local shard a DTensor holds, as a view that in-place writes reach; None for a plain tensor.

    ``DTensor.to_local()`` is public but goes through an autograd function; ``_local_tensor`` is
    the shard tensor itself, which initialisation fills in place.
    """
    return getattr(p, "_local_tensor", None)


def fsspec_reader_writer() -> Tuple[type, type]:
    """DCP's ``(FsspecReader, FsspecWriter)``: public names since 2.3, private module before."""
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter
    except ImportError:  # pragma: no cover - older layouts
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    return FsspecReader, FsspecWriter


def dcp_metadata_path(reader, rank: Optional[int] = None):
    """Where a DCP ``FileSystemReader``/``FsspecReader`` reads its ``.metadata`` (``rank``: the
    rank-local ``__<rank>.metadata`` of checkpoints saved without collectives). The private
    ``_get_metadata_path`` arrived with rank-local metadata; before it there was one file."""
    get = getattr(reader, "_get_metadata_path", None)
    if get is not None:
        return get(rank)
    return reader.fs.concat_path(reader.path, ".metadata")  # pragma: no cover - older DCP


def dynamo_reset() -> None:
    """Drop every compiled graph and its guards (``torch.compiler.reset``; ``torch._dynamo`` before)."""
    reset = getattr(torch.compiler, "reset", None)
    if reset is None:  # pragma: no cover - older torch
        from torch import _dynamo  # not "import torch._dynamo": that makes torch a local name here

        reset = _dynamo.reset
    reset()


def raise_dynamo_recompile_limits(limit: int = 256, accumulated: int = 4096) -> None:
    """Raise dynamo's recompile limits (names differ across versions; missing ones are skipped).

    Past the default limit of 8 recompiles a function silently runs unfused: benchmarks that
    recompile per variant must raise it or they time the fallback.
    """
    import torch._dynamo

    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", accumulated), ("accumulated_cache_size_limit", accumulated)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
