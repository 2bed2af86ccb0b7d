"""``parallel.engine=deepspeed``: DeepSpeed ZeRO (stages 1-3, optional CPU offload) around our model,
our optimizer and our loop.

Who does what:

- ours: the model (built on ``meta``, materialised by ``init_weights`` from the seed on every rank,
  so ZeRO starts from the same weights as FSDP2 would), AdamW and its parameter groups, the LR of
  every step (written into the parameter groups, no DeepSpeed scheduler), the data cursor, the
  metrics line, the cost meter, and the commit / retention / resume protocol of ``checkpointing``.
- DeepSpeed's: gradient reduction and its partitioning (ZeRO-2/3), the accumulation boundary,
  clipping (``gradient_clipping``), bf16 master weights, optimizer-state partitioning and offload,
  and the files of its checkpoints (``checkpointing.engine_state``).

Experts: our MoE layers are plain modules, not DeepSpeed-MoE's ``deepspeed.moe.layer.MoE``, so
DeepSpeed sees their weights as ordinary parameters and ZeRO partitions them like the rest (no
expert parallelism: ``parallel.ep`` must stay 1 with this engine).

Nothing here imports ``deepspeed`` at module level: the core stays importable without it, and only
:func:`initialize` (called when ``parallel.engine=deepspeed``) pulls it in. The process group (ours,
or the one-rank group :func:`ensure_process_group` makes) is destroyed by
``parallelism.process_group.shutdown`` on every exit path of ``train.main.run``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Mapping

from parallelism.config import DeepSpeedConfig

import torch
import torch.distributed as dist

log = logging.getLogger("moeforge")

ZERO_STAGES = (1, 2, 3)
INSTALL_HINT = "pip install -e '.[deepspeed]' (DeepSpeed's ops are JIT-built, none are needed here)"

# DeepSpeed config keys moeforge sets itself, and the moeforge key that sets each.
OWNED = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size and trainer.micro_batch_size",
    "gradient_clipping": "trainer.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision (fp16 is not offered)",
    "optimizer": "optim.* (moeforge's AdamW)",
    "scheduler": "optim.schedule (moeforge sets the LR every step)",
    "zero_optimization.stage": "parallel.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "parallel.deepspeed.offload_param",
    "zero_optimization.overlap_comm": "parallel.deepspeed.overlap_comm",
    "zero_optimization.reduce_bucket_size": "parallel.deepspeed.reduce_bucket_size",
    "zero_optimization.compute_grad_norm": "trainer.grad_clip (the non-finite guard reads the norm)",
    "zero_force_ds_cpu_optimizer": "optim.* (offload keeps moeforge's AdamW)",
    "steps_per_print": "trainer.log_every (moeforge prints the metrics line)",
}


def deepspeed_errors(ds: DeepSpeedConfig, *, engine: str, world_size: int, dp_replicate: int, dp_shard: int, ep: int,
                     compile: bool, async_mode: str, checkpoint_root: str, upload_root: str,
                     device: str = "auto") -> List[str]:
    """Cross-field rules of ``parallel.deepspeed`` (and what it needs elsewhere), each naming the
    key and the fix. Empty when ``engine`` is not deepspeed."""
    if engine != "deepspeed":
        return []
    errors = []
    if ds.zero_stage not in ZERO_STAGES:
        errors.append(f"parallel.deepspeed.zero_stage={ds.zero_stage} must be one of 1, 2, 3 (1: optimizer "
                      "state sharded, 2: + gradients, 3: + parameters)")
    if ds.offload_param and ds.zero_stage != 3:
        errors.append(f"parallel.deepspeed.offload_param=true needs parallel.deepspeed.zero_stage=3 (it is "
                      f"{ds.zero_stage}): set zero_stage=3 or offload_param=false")
    if ds.reduce_bucket_size < 1:
        errors.append(f"parallel.deepspeed.reduce_bucket_size={ds.reduce_bucket_size} must be >= 1")
    for key in _flat_keys(ds.extra or {}):
        owner = next((OWNED[k] for k in OWNED if key == k or key.startswith(k + ".")), None)
        if owner is not None:
            errors.append(f"parallel.deepspeed.extra sets {key}, which moeforge sets from {owner}: "
                          "remove it from parallel.deepspeed.extra and set that key instead")
    if ep != 1:
        errors.append(f"parallel.ep={ep} is not supported with parallel.engine=deepspeed: ZeRO shards the "
                      "experts like every other parameter (no expert parallelism); set parallel.ep=1, or "
                      "use parallel.engine=fsdp2 for expert parallelism")
    if dp_replicate != 1 or dp_shard not in (-1, world_size):
        errors.append(f"parallel.dp_replicate={dp_replicate} / parallel.dp_shard={dp_shard}: with "
                      "parallel.engine=deepspeed ZeRO shards over every rank; set parallel.dp_replicate=1 "
                      "and parallel.dp_shard=-1")
    if device not in ("auto", "cpu", "cuda"):
        errors.append(f"trainer.device={device} is not supported with parallel.engine=deepspeed (its CPU and CUDA "
                      "accelerators only): set trainer.device=cuda or cpu, or use parallel.engine=fsdp2")
    if compile:
        errors.append("trainer.compile=true is not supported with parallel.engine=deepspeed (untested): set "
                      "trainer.compile=false")
    if async_mode != "off":
        errors.append(f"checkpoint.async_mode={async_mode} is not supported with parallel.engine=deepspeed "
                      "(DeepSpeed writes its checkpoint synchronously): set checkpoint.async_mode=off")
    if "://" in (checkpoint_root or "") and not checkpoint_root.startswith("file://"):
        errors.append(f"checkpoint.root={checkpoint_root} is not a local path: DeepSpeed writes its "
                      "checkpoint files with local file I/O; use a local disk or a shared POSIX mount (FSx)")
    if upload_root:
        errors.append("checkpoint.upload_root is not supported with parallel.engine=deepspeed (a resume "
                      "from the upload tier reads DCP files in place): set checkpoint.upload_root=''")
    return errors


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
            out += _flat_keys(v, key + ".")
    return out


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v) if isinstance(v, (dict, list)) else v
    return out


def deepspeed_config(ds: DeepSpeedConfig, *, global_batch_size: int, micro_batch_size: int, grad_accum: int,
                     grad_clip: float, bf16: bool) -> Dict[str, Any]:
    """DeepSpeed's JSON config from ours (pure). ``global = micro x accumulation x world``, the
    same arithmetic as the FSDP2 loop, so the two engines see the same batches."""
    zero: Dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": bool(ds.overlap_comm),
                            "reduce_bucket_size": int(ds.reduce_bucket_size), "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config: Dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        # bf16: DeepSpeed keeps fp32 master weights in the ZeRO optimizer, reduces gradients in
        # fp32 (as our FSDP2 policy does), and skips a step whose gradient norm is not finite.
        "bf16": {"enabled": bool(bf16), "check_grad_overflow": True},
        "communication_data_type": "fp32",
        # Offload keeps our torch AdamW (optim.*) rather than DeepSpeedCPUAdam, which would need a
        # compiled op: slower on a GPU host, the same maths.
        "zero_force_ds_cpu_optimizer": False,
        # DeepSpeed's own progress lines would interleave with our metrics line.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra or {})


def ensure_process_group(device_type: str, backend: str = "auto") -> bool:
    """DeepSpeed needs a process group even for one process; ``parallelism.process_group`` makes none
    at world size 1. Create a one-rank group on an in-memory store (no port). Returns True when one
    was created here (``process_group.shutdown`` destroys it like any other)."""
    if dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def import_deepspeed(device_type: str):
    """``import deepspeed`` with its accelerator matching our device (a CPU run on a GPU host must
    not pick CUDA; on CPU it uses gloo, not oneCCL, unless oneccl_bindings_for_pytorch is installed).
    DS_ACCELERATOR set by the user wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"parallel.engine=deepspeed needs DeepSpeed, which is not importable ({e}): "
                           f"{INSTALL_HINT}") from e
    # DeepSpeed logs its whole config and per-step lines at INFO to stdout: keep warnings only.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type == "cpu":
        # On its CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (C++, about
        # 20 s on 2 cores, and a compiler on the host) when its comm backend starts. Only its
        # inference all-reduce uses that op; training collectives are torch.distributed's (gloo).
        import importlib

        # (by module name: ``deepspeed.comm.torch`` as an attribute is the torch package itself)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


def register_external_parameters(model: torch.nn.Module, deepspeed) -> None:
    """ZeRO-3 gathers a parameter only around its owning module's forward and backward. Two of
    ours are read by another module: the router applies its gate's weight itself (``F.linear`` in
    fp32, never calling ``gate``), and a tied output head reads the embedding's weight. Without
    this, backward finds them partitioned (size 0). The gate is registered on the router's parent
    (the MoE layer), not the router: ZeRO-3 re-gathers before a module's backward through hooks on
    the tensors it returns, and the router returns a dataclass, which it does not look into."""
    from moe.router import Router

    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, Router):
                deepspeed.zero.register_external_parameter(parent, child.gate.weight)
    if getattr(model, "output", False) is None and hasattr(model, "tok_embeddings"):
        deepspeed.zero.register_external_parameter(model, model.tok_embeddings.weight)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any],
               device_type: str, backend: str = "auto", local_rank: int = 0):
    """Wrap ``model`` (materialised, initialised) and ``optimizer`` (ours) in a DeepSpeed engine.
    Returns ``(engine, zero_optimizer)``; set the LR on ``zero_optimizer.param_groups``."""
    deepspeed = import_deepspeed(device_type)
    ensure_process_group(device_type, backend)
    # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; one process and srun may not).
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if config["zero_optimization"]["stage"] == 3:
        register_external_parameters(model, deepspeed)
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                  dist_init_required=False)
    log.info("DeepSpeed %s: ZeRO stage %d%s%s, %s, accumulation %d x micro batch %d", deepspeed.__version__,
             config["zero_optimization"]["stage"],
             ", optimizer offloaded to CPU" if "offload_optimizer" in config["zero_optimization"] else "",
             ", parameters offloaded to CPU" if "offload_param" in config["zero_optimization"] else "",
             "bf16" if config["bf16"]["enabled"] else "fp32", config["gradient_accumulation_steps"],
             config["train_micro_batch_size_per_gpu"])
    return engine, zero_opt
