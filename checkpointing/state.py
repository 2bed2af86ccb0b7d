"""The DCP Stateful the trainer puts in the dict it hands to ``CheckpointManager`` (one class for
model and optimizer), and this rank's RNG streams.

``get_state_dict``/``set_state_dict`` give fully-qualified-name keyed state for plain modules and
FSDP2-sharded ones alike (DTensor shards), which is what lets DCP reshard across world sizes.
Optimizer state is keyed by parameter FQN (not by position), so it survives resharding too.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["AppState", "RNGState"]


class AppState(Stateful):
    """Model and optimizer under one key (``{"model": ..., "optim": ...}``), the DCP tutorial shape.

    The trainer saves ``{"app": AppState(model, optimizer)}``: DCP keys ``app.model.<fqn>`` and
    ``app.optim.state.<fqn>...`` (``checkpointing.export`` reads the model back by that prefix)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 options: Optional[StateDictOptions] = None):
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> Dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        if getattr(self.optimizer, "holds_masters", False):
            masters_into_model(model_sd, optim_sd)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        model_sd, optim_sd = state_dict["model"], state_dict["optim"]
        if getattr(self.optimizer, "holds_masters", False):
            model_sd, optim_sd = masters_out_of_model(model_sd, optim_sd, self.model)
        impl = [{k: g[k] for k in _IMPL_FLAGS if k in g} for g in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=self.options)
        # How this run's optimizer computes (fused on CUDA, foreach on CPU) is this run's choice,
        # not training state: a checkpoint written elsewhere must not switch the kernel.
        for group, flags in zip(self.optimizer.param_groups, impl):
            group.update(flags)


def masters_into_model(model_sd: Dict[str, Any], optim_sd: Dict[str, Any]) -> None:
    """optim.master_weights: the fp32 masters (optimizer state ``master``) are saved as the model's
    weights and the bf16 copies are not saved, so the checkpoint has the keys and dtypes of one
    written without master weights: either mode resumes the other's exactly, and
    ``checkpointing.export``/HF export read fp32 weights. The optimizer's own state dicts are
    copied, never edited."""
    for fqn, state in list(optim_sd["state"].items()):
        if "master" in state:
            model_sd[fqn] = state["master"]
            optim_sd["state"][fqn] = {k: v for k, v in state.items() if k != "master"}


def masters_out_of_model(model_sd: Dict[str, Any], optim_sd: Dict[str, Any], model: nn.Module):
    """The inverse on load: each bf16 parameter's loaded fp32 weight becomes its master, and the
    parameter is loaded with that master rounded (what it held when saved)."""
    model_sd, optim_sd = dict(model_sd), {**optim_sd, "state": dict(optim_sd["state"])}
    for name, p in model.named_parameters():
        fqn = _state_dict_fqn(name)
        if p.dtype == torch.float32 or fqn not in model_sd:
            continue
        master = model_sd[fqn].detach().to(torch.float32)
        model_sd[fqn] = master.to(p.dtype)
        optim_sd["state"][fqn] = {**optim_sd["state"].get(fqn, {}), "master": master}
    return model_sd, optim_sd


class RNGState(Stateful):
    """This rank's RNG streams as tensors (torch CPU, CUDA when present, Python ``random``).

    Keys carry the rank, because each rank has its own streams; a checkpoint loaded at another
    world size has other keys, so leave this out of the state when the world size changed (the
    data order does not depend on it: batches are a function of seed and sample index)."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def _key(self) -> str:
        return f"rank{self.rank}"

    def state_dict(self) -> Dict[str, Any]:
        streams: Dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            streams["torch_cuda"] = torch.cuda.get_rng_state()
        version, internal, gauss = random.getstate()
        streams["python"] = torch.tensor([version, *internal], dtype=torch.int64)
        streams["python_gauss"] = torch.tensor(
            [0.0 if gauss is None else gauss, 0.0 if gauss is None else 1.0], dtype=torch.float64)
        return {self._key(): streams}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        streams = state_dict[self._key()]
        torch.set_rng_state(streams["torch_cpu"])
        if "torch_cuda" in streams and torch.cuda.is_available():
            torch.cuda.set_rng_state(streams["torch_cuda"])
        py = [int(x) for x in streams["python"].tolist()]
        gauss_val, has_gauss = streams["python_gauss"].tolist()
        random.setstate((py[0], tuple(py[1:]), gauss_val if has_gauss else None))


_IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")

# Wrapper segments that get_state_dict leaves out of a parameter's FQN (compiled blocks,
# activation checkpointing).
_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")


def _state_dict_fqn(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)
