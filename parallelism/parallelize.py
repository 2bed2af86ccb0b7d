"""The one call that parallelises a model, in one fixed order, and the gradient-norm helper that
works in every layout.

Order (torchtitan's): expert parallel -> activation checkpointing -> compile -> FSDP.

- EP first: it replaces the expert weights with their ep-local DTensor slices and installs the
  all-to-all dispatcher; everything after sees the final parameters.
- Activation checkpointing wraps each block's forward so recompute covers the whole block (its
  MoE all-to-all included: recompute repeats it, in the same order on every rank).
- ``block.compile()`` compiles each block in place (no ``_orig_mod.`` in parameter names).
- FSDP last, per block (experts on their own mesh with EP), then the root.

Call it on the model built on the ``meta`` device, BEFORE ``model.init_weights(seed, device)``:
FSDP shards meta parameters without memory; ``init_weights`` then materialises each rank's shards
(``to_empty``) and fills them from the same full tensor on every rank, so weights equal those of a
single-process run with the same seed.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from compat.torch_compat import foreach_mul_, foreach_norm
from parallelism.config import AC_POLICIES, ParallelConfig
from parallelism.mesh import Meshes, build_mesh
from parallelism.process_group import DistContext

__all__ = ["parallelize", "ParallelizeResult", "apply_activation_checkpointing", "AC_POLICIES", "compile_blocks",
           "clip_grad_norm", "grad_norm"]


@dataclass(frozen=True)
class ParallelizeResult:
    """What :func:`parallelize` learned about the model, returned instead of attached to it."""

    meshes: Meshes  # the count reducer reads ``meshes.dp_group``
    blocks_compiled: bool = False  # train.step then compiles the loss too (one fused kernel on CUDA)
    checkpointed_blocks: Tuple[int, ...] = ()  # indices of the blocks under activation checkpointing


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    """What selective AC keeps from the forward: the outputs of matmuls (dense, batched, grouped)
    and of the fused attention kernels, the expensive ops; everything else (norms, activations,
    RoPE, casts, routing) is recomputed in the backward."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        # op is an overload (aten.mm.default); the set holds packets (aten.mm).
        return (CheckpointPolicy.MUST_SAVE if getattr(op, "overloadpacket", op) in saved
                else CheckpointPolicy.PREFER_RECOMPUTE)

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, policy: str = "full", every: int = 1) -> Tuple[int, ...]:
    """Activation checkpointing per transformer block (``trainer.activation_checkpointing``).

    ``policy="full"`` recomputes the whole block in the backward; ``"selective"`` keeps the
    outputs of its matmuls and attention kernels and recomputes only the cheap ops between them
    (``_saved_ops``). ``every=N`` checkpoints every N-th block (blocks 0, N, 2N, ...) and leaves
    the others as they are: a memory/speed dial between none and all.

    The block's ``forward`` is replaced (on the instance) by one that runs it under non-reentrant
    ``torch.utils.checkpoint``: parameter names stay as they are (``checkpoint_wrapper`` would
    insert ``._checkpoint_wrapped_module``, which changes ``init_weights``' per-name seeds), FSDP's
    module hooks stay outside the checkpointed region, and torch.compile traces it. A block whose
    instance already has its own ``forward`` is wrapped already and left alone (a second call
    would checkpoint inside a checkpoint). Returns the indices of the blocks now checkpointed.
    """
    if policy not in AC_POLICIES:
        raise ValueError(f"trainer.ac_policy={policy!r} must be one of {AC_POLICIES}")
    if every < 1:
        raise ValueError(f"trainer.ac_every={every} must be >= 1")
    from torch.utils.checkpoint import checkpoint

    extra = {"context_fn": _selective_context} if policy == "selective" else {}

    def checkpointed(forward):
        def run(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

        return run

    done = []
    for i, block in enumerate(model.layers.values()):
        if i % every:
            continue
        if "forward" not in vars(block):  # the class's forward: not wrapped yet
            block.forward = checkpointed(block.forward)
        done.append(i)
    return tuple(done)


def compile_blocks(model: nn.Module) -> None:
    attention_cfg = getattr(getattr(model, "cfg", None), "attention", None)
    if getattr(attention_cfg, "backend", None) == "cudnn":
        from model.attention import cudnn_band

        cudnn_band.preload()  # cudnn-frontend's op, imported before dynamo traces the blocks
    for block in model.layers.values():
        block.compile()  # in place: parameter names (and so checkpoints) do not change
    # train.step compiles the loss too (one fused log-softmax over bf16 logits, no fp32 copy):
    # parallelize says so in ParallelizeResult.blocks_compiled.


def _n_experts(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "cfg", None)
    moe = getattr(cfg, "moe", None)
    return getattr(moe, "n_experts", None) if moe is not None else None


def parallelize(model: nn.Module, parallel_cfg: ParallelConfig, ctx: DistContext, device_type: str,
                param_dtype: Optional[torch.dtype] = None, activation_checkpointing: bool = False,
                compile: bool = False, meshes: Optional[Meshes] = None,
                reshard_after_forward: bool = True, ac_policy: str = "full",
                ac_every: int = 1) -> ParallelizeResult:
    """Apply EP -> AC -> compile -> FSDP to ``model`` in place; return what was applied.

    ``ctx`` is the :class:`parallelism.process_group.DistContext` (only ``world_size`` is read).
    ``meshes`` may be passed when the caller built them (``build_mesh``); otherwise they are built
    here (a collective). At world size 1 only AC and compile apply. The meshes, whether the blocks
    were compiled and which blocks are checkpointed come back in the :class:`ParallelizeResult`
    (nothing is attached to the model: its state dict and attributes are as they were).
    """
    world = ctx.world_size
    if meshes is None:
        meshes = build_mesh(parallel_cfg, world, device_type, n_experts=_n_experts(model))
    if meshes.ep_enabled:
        from parallelism.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep)
    checkpointed = apply_activation_checkpointing(model, ac_policy, ac_every) if activation_checkpointing else ()
    if compile:
        compile_blocks(model)
    if world > 1:
        from parallelism.fsdp import apply_fsdp

        apply_fsdp(model, meshes, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    return ParallelizeResult(meshes=meshes, blocks_compiled=compile, checkpointed_blocks=checkpointed)


def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0, foreach: Optional[bool] = None,
              error_if_nonfinite: bool = False) -> torch.Tensor:
    """Total gradient norm over parameters that may be plain tensors or DTensors on different
    meshes (dense params on dp_shard, experts on (efsdp, ep)).

    ``torch.nn.utils.get_total_norm`` stacks the per-tensor norms, which fails when they are
    DTensors of different meshes; here the grads are grouped by mesh, each group's norm is made
    a plain tensor (``full_tensor()``: one all-reduce per mesh group), and the groups are combined.
    """
    norms = [_group_norm(grads, norm_type, foreach, error_if_nonfinite)
             for grads in _by_mesh(p.grad for p in params if p.grad is not None)]
    if not norms:
        return torch.zeros(())
    if math.isinf(norm_type):
        return torch.stack(norms).max()
    return torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)


def _by_mesh(tensors) -> list:
    """Tensors grouped by DTensor mesh (plain tensors together), in first-seen order (the same
    on every rank, so the per-group collectives line up)."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


def _group_norm(grads, norm_type, foreach, error_if_nonfinite) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if foreach is not False and any(g.dtype != torch.float32 and not isinstance(g, DTensor) for g in grads):
        # bf16 gradients (optim.master_weights): each tensor's norm accumulated in fp32, as
        # get_total_norm computes it over fp32 gradients, so the clip coefficient matches.
        n = torch.linalg.vector_norm(torch.stack(foreach_norm(grads, float(norm_type), torch.float32)), norm_type)
        if error_if_nonfinite and not torch.isfinite(n):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
        return n
    n = torch.nn.utils.get_total_norm(grads, float(norm_type), error_if_nonfinite, foreach)
    return n.full_tensor() if isinstance(n, DTensor) else n


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   foreach: Optional[bool] = None, error_if_nonfinite: bool = False) -> torch.Tensor:
    """``clip_grad_norm_`` that works in every layout (single process, FSDP2, FSDP2 + EP).

    Returns the total norm before clipping as a plain tensor, the same value on every rank.
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type, foreach, error_if_nonfinite)
    if max_norm > 0:
        # torch's clip_grads_with_norm_ math, one foreach call per mesh: foreach ops cannot mix
        # DTensors of different meshes.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grads in _by_mesh(p.grad for p in params):
            if foreach is False:
                for g in grads:
                    g.mul_(coef.to(g.device))
            else:
                foreach_mul_(grads, coef.to(grads[0].device))
    return total
