"""Device, precision and model construction for a run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full fp32
    xla: Any = None  # train.xla.XlaRuntime for trainer.device=neuron|xla, else None

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def init_device(self) -> torch.device:
        """Where the weights are materialised and initialised. XLA devices have no random generator:
        they initialise on CPU (bit-identical to a CPU run) and the trainer moves the model."""
        return torch.device("cpu") if self.xla is not None else self.device

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        """XLA: cut the traced graph here and run it (train/xla.py says where). Elsewhere nothing."""
        if self.xla is not None:
            self.xla.sync()

    def peak_flops(self, cluster) -> float | None:
        """XLA: the peak per process (train/xla.py); None elsewhere (looked up from the device)."""
        return self.xla.peak_flops(cluster) if self.xla is not None else None


def resolve_runtime(device: str, precision: str, local_rank: int = 0) -> Runtime:
    if device in ("neuron", "xla"):
        from train.xla import XlaRuntime  # the only import of torch_xla, and only for these devices

        xla = XlaRuntime(device)
        precision = xla.default_precision() if precision == "auto" else precision
        return Runtime(xla.device, torch.bfloat16 if precision == "bf16" else None, xla)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if precision == "auto":
        # bf16 autocast on GPU; fp32 on CPU keeps the embedded default exact and portable
        # (bf16 is fast only on CPUs with AMX).
        precision = "bf16" if dev.type == "cuda" else "fp32"
    # fp8: bf16 autocast around the fp8 modules (model/fp8.py); the rest of the step is bf16's.
    return Runtime(dev, torch.bfloat16 if precision in ("bf16", "fp8") else None)


def convert_precision(model: torch.nn.Module, trainer_cfg: Any, device: torch.device, world_size: int):
    """``trainer.precision=fp8``: the fp8 surgery (model/fp8.py) on the meta-built model, before
    ``parallelize``; returns its report (None for other precisions). FSDP2 all-gathers the fp8
    weights in fp8 where torchao supports it (tensorwise, more than one rank)."""
    if trainer_cfg.precision != "fp8":
        return None
    from model.fp8 import convert_to_fp8
    from model.torch_compat import cuda_capability

    capability = cuda_capability(device) if device.type == "cuda" else None
    return convert_to_fp8(model, trainer_cfg.fp8, capability=capability,
                          fsdp_float8_all_gather=world_size > 1)
