"""fp8 training (``trainer.precision=fp8``): which modules compute in fp8, and the surgery that
makes them.

- Dense ``nn.Linear`` layers go through torchao's float8 training (``convert_to_float8_training``:
  each becomes a ``Float8Linear`` with the same parameter names, so checkpoints and the
  optimizer do not change). ``trainer.fp8.recipe``: ``tensorwise`` (one scale per tensor, the
  fastest; its weights can be all-gathered in fp8 under FSDP2) or ``rowwise`` (one scale per row,
  more accurate, slower; no fp8 all-gather).
- Routed experts (``trainer.fp8.experts``) go through torchao's rowwise fp8 grouped GEMM
  (``moe/fp8_experts.py``) on SM90+; on SM89 they stay in bf16 (the kernel is SM90+).
- Everything runs inside bf16 autocast; master weights stay fp32.

The filter (:func:`keep_reason`) keeps in bf16, in this order:

1. the output head (``output``): its logits feed the loss, where fp8 error costs most;
2. the MoE router (``*.router.*``): tiny (E outputs) and it decides the routing;
3. linears with a dimension not divisible by 16 (the fp8 GEMM's hardware requirement);
4. small linears, where the casts cost more than the fp8 GEMM saves: torchao's own thresholds,
   measured on an H100 (torchao/float8 README; ``_auto_filter_for_recipe`` in 0.18.0):
   tensorwise keeps K <= 4096 and N <= 1024; rowwise keeps N <= 2048, K <= 1024, or
   (N <= 4096 and K <= 2048). (N = out_features, K = in_features.)

torchao is imported only inside :func:`convert_to_fp8` (the optional extra ``fp8``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # torch is imported where it is used: train.config imports Fp8Config, and a
    from torch import nn  # config-only command (launch --dry-run, --cfg job) need not pay for torch

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (SM89) and Hopper (SM90) onwards
GROUPED_MIN_CAPABILITY = (9, 0)  # torch._scaled_grouped_mm and torchao's Triton kernels
INSTALL_HINT = "pip install -e '.[fp8]' (torchao==0.18.0, needs torch >= 2.11)"


@dataclass
class Fp8Config:
    """``trainer.fp8``: read only when ``trainer.precision=fp8`` (docs/configs.md)."""

    recipe: str = "tensorwise"  # tensorwise | rowwise: scaling of the dense linears
    experts: bool = True  # routed experts through the fp8 grouped GEMM (SM90+; bf16 otherwise)


@dataclass
class Fp8Report:
    """What :func:`convert_to_fp8` did: module FQN -> what it became or why it was kept."""

    converted: List[str] = field(default_factory=list)  # Float8Linear now
    kept: Dict[str, str] = field(default_factory=dict)  # still bf16, with the reason
    experts_fp8: List[str] = field(default_factory=list)  # GroupedExperts on the fp8 grouped GEMM
    experts_kept: Dict[str, str] = field(default_factory=dict)
    torchao: str = ""  # torchao's version

    def summary(self) -> str:
        return (f"fp8 (torchao {self.torchao}): {len(self.converted)} linears converted, {len(self.kept)} kept in bf16, "
                f"{len(self.experts_fp8)} expert groups on the fp8 grouped GEMM"
                + (f", {len(self.experts_kept)} kept ({next(iter(self.experts_kept.values()))})"
                   if self.experts_kept else ""))


def fp8_errors(precision: str, cfg: Fp8Config, capability: Optional[Tuple[int, int]], compile: bool,
               torchao_installed: bool) -> List[str]:
    """Config errors of ``trainer.precision=fp8`` (none for other precisions). ``capability``:
    the CUDA device's (major, minor), None when training would not run on a CUDA GPU. The keys'
    own errors come first, the machine's requirement last."""
    if precision != "fp8":
        return []
    errors = []
    if cfg.recipe not in RECIPES:
        errors.append(f"trainer.fp8.recipe={cfg.recipe!r} must be one of {RECIPES}")
    if not compile:
        errors.append("trainer.precision=fp8 needs trainer.compile=true (uncompiled, the fp8 casts and "
                      "scales cost more than the fp8 GEMMs save)")
    if not torchao_installed:
        errors.append(f"trainer.precision=fp8 needs torchao, which is not installed: {INSTALL_HINT}")
    if capability is None:
        errors.append("trainer.precision=fp8 needs a CUDA GPU with compute capability >= 8.9 "
                      "(Ada/Hopper fp8 tensor cores); none is in use here: use trainer.precision=bf16 or fp32")
    elif tuple(capability) < MIN_CAPABILITY:
        errors.append(f"trainer.precision=fp8 needs a CUDA GPU with compute capability >= 8.9 "
                      f"(Ada/Hopper fp8 tensor cores); this GPU is {capability[0]}.{capability[1]}: "
                      "use trainer.precision=bf16")
    return errors


def _small(recipe: str, n_out: int, k_in: int) -> bool:
    if recipe == "tensorwise":
        return k_in <= 4096 and n_out <= 1024
    return n_out <= 2048 or k_in <= 1024 or (n_out <= 4096 and k_in <= 2048)


def keep_reason(fqn: str, module: nn.Module, recipe: str) -> Optional[str]:
    """Why the linear ``fqn`` stays in bf16, or None when it goes to fp8 (the module docstring's
    filter). Pure: reads only the name, the type and the weight's shape."""
    from torch import nn

    if not isinstance(module, nn.Linear):
        return "not a linear"
    if fqn == "output" or fqn.endswith(".output"):
        return "output head"
    if ".router." in f".{fqn}.":
        return "router"
    n_out, k_in = module.weight.shape
    if n_out % 16 or k_in % 16:
        return f"dims {n_out}x{k_in} not divisible by 16"
    if _small(recipe, n_out, k_in):
        return f"small for {recipe} ({n_out}x{k_in}: casts cost more than fp8 saves)"
    return None


def convert_to_fp8(model: nn.Module, cfg: Fp8Config, capability: Optional[Tuple[int, int]] = None,
                   fsdp_float8_all_gather: bool = False, emulate: bool = False) -> Fp8Report:
    """Swap the dense linears that pass :func:`keep_reason` for torchao ``Float8Linear`` and put
    the routed experts on the fp8 grouped GEMM (when ``cfg.experts`` and ``capability`` >= 9.0),
    in place; returns what was converted and what was kept. Call it on the model before
    ``parallelize`` (compile and FSDP then see the fp8 modules), meta device included.

    ``fsdp_float8_all_gather``: FSDP2 all-gathers the converted weights in fp8 (tensorwise only;
    torchao supports it for no other recipe). ``emulate``: torchao's emulation (fp8 casts, matmul
    in high precision), for CPU tests only."""
    from torch import nn
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from compat.torch_compat import grouped_mm
    from moe.experts import GroupedExperts
    from moe.fp8_experts import torchao_fp8_grouped_mm

    import torchao

    report = Fp8Report(torchao=torchao.__version__)
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = keep_reason(fqn, module, cfg.recipe)
            if reason is None:
                report.converted.append(fqn)
            else:
                report.kept[fqn] = reason
        elif isinstance(module, GroupedExperts):
            if not cfg.experts:
                report.experts_kept[fqn] = "trainer.fp8.experts=false"
            elif not emulate and (capability is None or tuple(capability) < GROUPED_MIN_CAPABILITY):
                report.experts_kept[fqn] = "the fp8 grouped GEMM needs compute capability >= 9.0"
            elif module.d_model % 16 or module.expert_dim % 16:
                report.experts_kept[fqn] = f"dims {module.d_model}x{module.expert_dim} not divisible by 16"
            else:
                module.fp8_mm = grouped_mm if emulate else torchao_fp8_grouped_mm()
                report.experts_fp8.append(fqn)
    chosen = set(report.converted)
    config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    if emulate or (fsdp_float8_all_gather and cfg.recipe == "tensorwise"):
        import dataclasses

        config = dataclasses.replace(config, emulate=emulate,
                                     enable_fsdp_float8_all_gather=fsdp_float8_all_gather and cfg.recipe == "tensorwise")
    if chosen:
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in chosen, config=config)
    return report
