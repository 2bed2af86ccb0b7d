"""``optim.master_weights``: bf16 compute weights, fp32 masters held by the optimizer.

The matmul weights that run in bf16 anyway become bf16 parameters in place before the optimizer is
built, so no forward casts them and no backward casts their gradients back to fp32 (about 5 ms of a
186 ms dsv3_mini step on an H200); ``train.master_adamw.MasterAdamW`` keeps their fp32 values and
updates them in one pass per tensor (measured on an H200: dsv3_mini 172.1k -> 181.0k tok/s,
llama_1b 76.4k -> 78.2k; docs/PERFORMANCE.md). Converted: every ``nn.Linear`` weight (attention, dense and
shared-expert SwiGLU, the output head) and the routed experts' ``w1``/``w2``/``w3``. Kept in fp32:
embeddings, norms, biases, the router's gate (it scores in fp32: ``moe/router.py``) and the expert
bias buffer, so the residual stream and the routing keep today's precision.

``auto`` (the default) turns it on where it is measured faster and every rule below holds: CUDA,
bf16 or fp8 precision (``auto`` on a GPU), world size 1, ``parallel.engine=fsdp2``, one micro-batch
per step, no distillation teacher (:func:`use_master_weights`; the trainer logs the choice).
Checkpoints are the same either way, so a run resumes across modes in both directions.

Rules of ``true`` (``master_weights_errors``; each names the key and the fix): bf16 or fp8 precision (``auto``
means bf16 in this mode, on CPU too: the same math runs eagerly there; fp8 quantizes from the bf16
weights), world size 1 with
``parallel.engine=fsdp2`` (plain parameters: no FSDP2/EP DTensors, not DeepSpeed), CPU or CUDA, and
one micro-batch per step (bf16 ``.grad`` accumulation would round every partial sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:  # torch is imported where it is used: validation imports master_weights_errors,
    import torch  # and a config-only command (launch --dry-run, a config error) need not pay for torch
    from torch import nn

__all__ = ["MasterReport", "to_bf16_compute", "master_weights_errors", "effective_precision", "mode",
           "use_master_weights"]


def mode(value) -> str:
    """``optim.master_weights`` normalised (``train.config.switch``: Hydra's ``"True"``, a bool)."""
    from train.config import switch

    return switch(value)


def use_master_weights(cfg, world_size: int, n_micro: int, device_type: str, amp_bf16: bool) -> bool:
    """Whether this run keeps bf16 compute weights with fp32 masters: ``true`` (validated by
    :func:`master_weights_errors`), ``false``, or ``auto``: on a CUDA device with bf16 autocast
    (precision bf16 or fp8), world size 1, fsdp2, one micro-batch, no distillation teacher.
    Pure; every input is the same on every rank, so all ranks decide alike."""
    m = mode(cfg.optim.master_weights)
    if m != "auto":
        return m == "true"
    return (device_type == "cuda" and amp_bf16 and world_size == 1 and n_micro == 1
            and cfg.parallel.engine == "fsdp2" and not cfg.distill.teacher)


@dataclass
class MasterReport:
    masters: Dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)  # bf16 param -> fp32 master
    converted: List[str] = field(default_factory=list)  # parameter names now bf16
    kept: List[str] = field(default_factory=list)  # parameter names still fp32


def _compute_weights(model: nn.Module) -> List[nn.Parameter]:
    """The parameters consumed by bf16 matmuls: nn.Linear weights but the router gate's, and the
    routed experts' 3-D weights."""
    from torch import nn

    from moe.experts import GroupedExperts
    from moe.router import Router

    fp32_gates = {id(m.gate.weight) for m in model.modules() if isinstance(m, Router)}
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in fp32_gates:
            out.append(module.weight)
        elif isinstance(module, GroupedExperts):
            out.extend([module.w1, module.w2, module.w3])
    return out


def to_bf16_compute(model: nn.Module) -> MasterReport:
    """Make the compute weights bf16 in place (same ``Parameter`` objects, so modules and compiled
    blocks keep them); their fp32 values at this moment become the masters, exactly."""
    import torch

    with torch.no_grad():
        chosen = {id(p) for p in _compute_weights(model)}
        report = MasterReport()
        for name, p in model.named_parameters():
            if id(p) in chosen and p.dtype == torch.float32:
                report.masters[p] = p.detach().clone()
                p.data = p.data.to(torch.bfloat16)
                report.converted.append(name)
            else:
                report.kept.append(name)
        return report


def effective_precision(cfg) -> str:
    """``trainer.precision=auto`` means bf16 under master weights on every device (on CPU it
    would mean fp32, and bf16 weights cannot run without bf16 autocast)."""
    if mode(cfg.optim.master_weights) == "true" and cfg.trainer.precision == "auto":
        return "bf16"
    return cfg.trainer.precision


def master_weights_errors(cfg, world_size: int, n_micro: int) -> List[str]:
    m = mode(cfg.optim.master_weights)
    from train.config import SWITCH

    if m not in SWITCH:
        return [f"optim.master_weights={cfg.optim.master_weights!r} must be auto, true or false"]
    if m != "true":
        return []
    t, errors = cfg.trainer, []
    if t.precision not in ("auto", "bf16", "fp8"):
        errors.append(f"optim.master_weights=true keeps fp32 masters of bf16 compute weights: it needs "
                      f"trainer.precision=bf16, fp8 or auto, not {t.precision!r}; set optim.master_weights=false")
    if cfg.parallel.engine != "fsdp2":
        errors.append(f"optim.master_weights=true runs on parallel.engine=fsdp2 only (got "
                      f"{cfg.parallel.engine!r}); set optim.master_weights=false")
    if world_size > 1:
        errors.append(f"optim.master_weights=true runs at world size 1 only (plain parameters, no FSDP2/EP "
                      f"DTensors); this run has {world_size} ranks: set optim.master_weights=false")
    if t.device in ("neuron", "xla"):
        errors.append(f"optim.master_weights=true runs on trainer.device=cpu|cuda (got {t.device!r}); "
                      "set optim.master_weights=false")
    if n_micro > 1:
        errors.append(f"optim.master_weights=true takes one micro-batch per step (bf16 gradients would be "
                      f"accumulated in bf16); trainer.micro_batch_size={t.micro_batch_size} gives {n_micro}: "
                      f"set trainer.micro_batch_size=0 (the whole global batch per forward)")
    return errors
