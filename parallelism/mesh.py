"""The device meshes: ``dp_replicate x dp_shard`` for everything, with ``ep`` carved out of
``dp_shard`` for the routed experts.

- ``dense``: ``(dp_shard,)``, or ``(dp_replicate, dp_shard)`` for HSDP. Everything but the routed
  experts is FSDP-sharded over it.
- ``expert_world`` (only when ep > 1): ``("dp_replicate", "efsdp", "ep")`` of shape
  ``(R, S/ep, ep)``; the two expert meshes are slices of it, because FSDP2 composes a DTensor
  parameter (experts sharded over ``ep``) with its own sharding only when both meshes share a root:
  - ``ep``: the ``ep`` ranks inside one ``dp_shard`` group (contiguous ranks, so the all-to-all
    stays inside a node when ``ep`` <= GPUs per node). Each holds ``n_experts / ep`` experts.
  - ``experts``: ``efsdp`` (``dp_shard / ep`` ranks holding the same experts), ``(dp_replicate,
    efsdp)`` for HSDP; the experts are FSDP-sharded over it.
- ``dp_group``: every data-parallel rank (the world): what expert-load counts are summed over.

Rank layout (row-major, both meshes): rank = r * S + s, and s = f * ep + e.

Dense and expert meshes are separate ``init_device_mesh`` calls (no private ``_flatten``); nothing
mixes a dense DTensor with an expert DTensor in one op except the gradient norm, which
:func:`parallelism.parallelize.grad_norm` combines per mesh.

``resolve_parallel`` is pure and runs before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from parallelism.config import ParallelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ParallelDims", "Meshes", "resolve_parallel", "validate_parallel", "build_mesh"]


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    world_size: int

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1


@dataclass
class Meshes:
    dims: ParallelDims
    dense: Optional["DeviceMesh"] = None  # FSDP mesh of the non-expert parameters; None at world size 1
    expert_world: Optional["DeviceMesh"] = None  # ("dp_replicate", "efsdp", "ep") when ep > 1
    experts: Optional["DeviceMesh"] = None  # FSDP mesh of the routed experts when ep > 1 (efsdp; HSDP: 2-D)
    ep: Optional["DeviceMesh"] = None  # 1-D mesh the experts are split over (None when ep == 1)

    @property
    def ep_enabled(self) -> bool:
        return self.dims.ep > 1

    @property
    def dp_group(self):
        """Process group of all data-parallel ranks (the world), None at world size 1."""
        if self.dims.world_size == 1:
            return None
        import torch.distributed as dist

        return dist.group.WORLD


def resolve_parallel(parallel_cfg: ParallelConfig, world_size: int, n_experts: Optional[int] = None) -> ParallelDims:
    """Resolve ``dp_shard=-1`` and check every rule; raises ``ValueError`` naming the key and fix.

    Pure: call it before any process group or allocation (``n_experts`` None skips the expert rule).
    """
    R, S, ep = int(parallel_cfg.dp_replicate), int(parallel_cfg.dp_shard), int(parallel_cfg.ep)
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    if R < 1:
        raise ValueError(f"parallel.dp_replicate={R} must be >= 1")
    if ep < 1:
        raise ValueError(f"parallel.ep={ep} must be >= 1")
    if S == -1:
        if world_size % R:
            raise ValueError(f"parallel.dp_replicate={R} must divide the world size {world_size} "
                             f"(parallel.dp_shard=-1 takes the rest)")
        S = world_size // R
    elif S < 1:
        raise ValueError(f"parallel.dp_shard={S} must be >= 1, or -1 for every rank not in dp_replicate")
    if R * S != world_size:
        raise ValueError(f"parallel.dp_replicate={R} x parallel.dp_shard={S} = {R * S} must equal the "
                         f"world size {world_size}; set parallel.dp_shard=-1 to use the rest")
    if S % ep:
        raise ValueError(f"parallel.ep={ep} must divide parallel.dp_shard={S} (experts are split over ep "
                         f"ranks carved out of dp_shard)")
    if n_experts is not None and ep > 1:
        if n_experts < 1:
            raise ValueError(f"parallel.ep={ep} needs an MoE model (model.moe.n_experts={n_experts}); "
                             f"set parallel.ep=1")
        if n_experts % ep:
            raise ValueError(f"parallel.ep={ep} must divide model.moe.n_experts={n_experts}")
    return ParallelDims(R, S, ep, world_size)


validate_parallel = resolve_parallel


def build_mesh(parallel_cfg: ParallelConfig, world_size: int, device_type: str,
               n_experts: Optional[int] = None) -> Meshes:
    """Validate, then build the meshes (collective: every rank calls it, in the same order).

    At world size 1 no mesh is built (every field but ``dims`` is None).
    """
    dims = resolve_parallel(parallel_cfg, world_size, n_experts)
    if world_size == 1:
        return Meshes(dims)
    from torch.distributed.device_mesh import init_device_mesh

    R, S, F, ep = dims.dp_replicate, dims.dp_shard, dims.efsdp, dims.ep
    if dims.hsdp:
        dense = init_device_mesh(device_type, (R, S), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        dense = init_device_mesh(device_type, (S,), mesh_dim_names=("dp_shard",))
    meshes = Meshes(dims, dense=dense)
    if ep > 1:
        world = init_device_mesh(device_type, (R, F, ep), mesh_dim_names=("dp_replicate", "efsdp", "ep"))
        meshes.expert_world = world
        meshes.ep = world["ep"]
        meshes.experts = world["dp_replicate", "efsdp"] if dims.hsdp else world["efsdp"]
    return meshes
