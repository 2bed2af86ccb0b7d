"""Device, precision and model construction for a run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch



@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full fp32

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_runtime(device: str, precision: str, local_rank: int = 0) -> Runtime:
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
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None)
