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
    xla: Any = None  # devices.xla.XlaRuntime for trainer.device=neuron|xla, else None

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
        """XLA: cut the traced graph here and run it (devices/xla.py says where). Elsewhere nothing."""
        if self.xla is not None:
            self.xla.sync()

    def peak_flops(self, accelerator: str = "auto", peak_tflops_override: float = 0.0) -> float | None:
        """XLA: the peak per process (devices/xla.py); None elsewhere (looked up from the device).
        The arguments are ``cluster.accelerator`` and ``cluster.peak_tflops_override``."""
        if self.xla is None:
            return None
        return self.xla.peak_flops(accelerator, peak_tflops_override)


def resolve_runtime(device: str, precision: str, local_rank: int = 0) -> Runtime:
    if device in ("neuron", "xla"):
        from devices.xla import XlaRuntime  # the only import of torch_xla, and only for these devices

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

