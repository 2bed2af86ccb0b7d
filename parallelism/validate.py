"""Rules for the ``parallel`` section, with messages that name the key and the fix.

``train/validate.py`` calls ``parallel_errors`` before any process group; the DeepSpeed rules, which
read the trainer and checkpoint sections too, are ``parallelism.deepspeed_engine.deepspeed_errors``.
``parallelism.mesh.resolve_parallel`` checks the same layout again where the meshes are built.
"""

from __future__ import annotations

from typing import List

from parallelism.config import ParallelConfig

ENGINES = ("fsdp2", "deepspeed")
BACKENDS = ("auto", "nccl", "gloo")


def parallel_errors(p: ParallelConfig, world_size: int, n_experts: int) -> List[str]:
    errs: List[str] = []
    if p.timeout_s <= 0:
        errs.append(f"parallel.timeout_s={p.timeout_s} must be > 0")
    if p.init_timeout_s <= 0:
        errs.append(f"parallel.init_timeout_s={p.init_timeout_s} must be > 0 (seconds for process-group set-up)")
    if p.engine not in ENGINES:
        errs.append(f"parallel.engine={p.engine!r} must be one of {ENGINES}")
    if p.backend not in BACKENDS:
        errs.append(f"parallel.backend={p.backend!r} must be auto, nccl or gloo")
    if p.dp_replicate < 1:
        errs.append(f"parallel.dp_replicate={p.dp_replicate} must be >= 1")
        return errs  # the layout rules below divide by it
    shard = p.dp_shard if p.dp_shard > 0 else world_size // p.dp_replicate
    if p.dp_replicate * shard != world_size:
        errs.append(f"parallel.dp_replicate={p.dp_replicate} x parallel.dp_shard={p.dp_shard} must equal the "
                    f"world size ({world_size}); set parallel.dp_shard=-1 to use every remaining rank")
    if p.ep < 1 or shard % p.ep != 0:
        errs.append(f"parallel.ep={p.ep} must divide parallel.dp_shard={shard}")
    if p.ep > 1 and (n_experts == 0 or n_experts % p.ep != 0):
        errs.append(f"parallel.ep={p.ep} must divide model.moe.n_experts={n_experts}")
    return errs
