"""FSDP2 wrapping: one ``fully_shard`` per transformer block, the routed experts on their own mesh
when experts are split over ep ranks, then the root.

- Parameter FQNs do not change (FSDP2 swaps classes, never inserts wrapper modules), so a
  checkpoint of a sharded run is interchangeable with a single-process one.
- ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``: parameters are all-gathered in
  ``param_dtype`` (None = as stored, fp32) and gradients reduce-scattered in fp32; the sharded
  master weights and optimizer state stay fp32.
- Experts with EP (``ep > 1``) are DTensors ``Shard(0)`` on the ep mesh; FSDP shards them again
  over ``efsdp`` (``dp_shard / ep`` ranks holding the same experts), on dim 0 of the local experts,
  or on dim 1 when there are fewer local experts than efsdp ranks (torchtitan's rule: dim-0 shards
  would then be mostly padding).
- Gradient scale with EP: see the comment at ``set_gradient_divide_factor`` below.
- Explicit prefetch with EP: FSDP2's implicit forward prefetch issues block i+1's all-gather when
  block i+1's pre-forward runs, but the all-to-all's split sizes need a host sync inside block i,
  so the CPU cannot run ahead and the all-gather is never overlapped. Telling each block to
  prefetch the next block (and its experts) in forward, and the previous one in backward, puts the
  all-gathers in flight before the sync.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe.layer import MoELayer
from parallelism.mesh import Meshes

__all__ = ["apply_fsdp"]


def _moe(block: nn.Module) -> Optional[MoELayer]:
    ffn = getattr(block, "ffn", None)
    return ffn if isinstance(ffn, MoELayer) else None


def _gloo(mesh) -> bool:
    import torch.distributed as dist

    return dist.get_backend(mesh.get_group(0)) == "gloo"


def apply_fsdp(model: nn.Module, meshes: Meshes, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True,
               prefetch: Optional[bool] = None) -> nn.Module:
    """Shard ``model`` (a ``Transformer``: ``.layers`` ModuleDict of blocks) in place.

    ``meshes`` is :class:`parallelism.mesh.Meshes`. ``prefetch`` None = explicit prefetch exactly
    when ep > 1.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    ep_on = meshes.ep_enabled
    efsdp_size = meshes.dims.efsdp
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        moe = _moe(block)
        if ep_on and moe is not None:
            n_local = moe.experts.w1.shape[0] // meshes.dims.ep
            placement_fn = (lambda p: Shard(1)) if efsdp_size > n_local else None
            fully_shard(moe.experts, mesh=meshes.experts, mp_policy=mp, shard_placement_fn=placement_fn,
                        reshard_after_forward=reshard_after_forward)
            # The all-to-all backward already summed the expert gradients over the ep ranks; FSDP
            # would divide by the expert mesh size (R * efsdp) only, leaving them ep times too
            # large. Divide by the full data-parallel size, as for every other parameter.
            moe.experts.set_gradient_divide_factor(float(meshes.dims.dp_replicate * meshes.dims.dp_shard))
            if efsdp_size > 1 and _gloo(meshes.experts):  # CPU tests; GPU runs use NCCL
                # A custom factor is a PREMUL_SUM reduce-scatter on NCCL; gloo has no PREMUL_SUM:
                # reduce with SUM, then FSDP divides by the factor. Not with efsdp == 1: there
                # torch (2.13) skips the reduce-scatter and divides by the factor itself, and with
                # forced SUM it would divide a second time.
                moe.experts.set_force_sum_reduction_for_comms(True)
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=meshes.dense, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=reshard_after_forward)

    if prefetch is None:
        prefetch = ep_on
    if prefetch and len(blocks) > 1:
        def with_experts(b):
            m = _moe(b)
            return [b, m.experts] if (ep_on and m is not None) else [b]

        for cur, nxt in zip(blocks[:-1], blocks[1:]):
            cur.set_modules_to_forward_prefetch(with_experts(nxt))
        for cur, prev in zip(blocks[1:], blocks[:-1]):
            cur.set_modules_to_backward_prefetch(with_experts(prev))
    return model
