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

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from parallelism.mesh import Meshes, build_mesh

__all__ = ["parallelize", "apply_activation_checkpointing", "compile_blocks", "clip_grad_norm",
           "grad_norm"]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Full activation checkpointing, one checkpoint per transformer block.

    The block's ``forward`` is replaced (on the instance) by one that runs it under non-reentrant
    ``torch.utils.checkpoint``: parameter names stay as they are (``checkpoint_wrapper`` would
    insert ``._checkpoint_wrapped_module``, which changes ``init_weights``' per-name seeds), FSDP's
    module hooks stay outside the checkpointed region, and torch.compile traces it.
    """
    from torch.utils.checkpoint import checkpoint

    def checkpointed(forward):
        def run(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    for block in model.layers.values():
        if getattr(block, "_moeforge_ac", False):
            continue
        block.forward = checkpointed(block.forward)
        block._moeforge_ac = True


def compile_blocks(model: nn.Module) -> None:
    for block in model.layers.values():
        block.compile()  # in place: parameter names (and so checkpoints) do not change
    # train.step compiles the loss too (one fused log-softmax over bf16 logits, no fp32 copy).
    model.blocks_compiled = True


def _n_experts(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "cfg", None)
    moe = getattr(cfg, "moe", None)
    return getattr(moe, "n_experts", None) if moe is not None else None


def parallelize(model: nn.Module, parallel_cfg: Any, ctx: Any, device_type: str,
                param_dtype: Optional[torch.dtype] = None, activation_checkpointing: bool = False,
                compile: bool = False, meshes: Optional[Meshes] = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply EP -> AC -> compile -> FSDP to ``model`` in place and return it.

    ``ctx`` is the :class:`parallelism.process_group.DistContext` (only ``world_size`` is read).
    ``meshes`` may be passed when the caller built them (``build_mesh``); otherwise they are built
    here (a collective). At world size 1 only AC and compile apply. The meshes are kept on
    ``model.meshes`` for the count reducer and the gradient norm.
    """
    world = int(getattr(ctx, "world_size", 1))
    if meshes is None:
        meshes = build_mesh(parallel_cfg, world, device_type, n_experts=_n_experts(model))
    if meshes.ep_enabled:
        from parallelism.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if world > 1:
        from parallelism.fsdp import apply_fsdp

        apply_fsdp(model, meshes, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    model.meshes = meshes  # plain attribute, not a module or parameter: state dicts are unchanged
    return model


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
                torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
