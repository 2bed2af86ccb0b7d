"""Versions recorded in checkpoints and logs."""

from __future__ import annotations

import platform

import torch

MOEFORGE_VERSION = "0.1.0"


def versions() -> dict:
    v = {"moeforge": MOEFORGE_VERSION, "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - NCCL absent on some builds
            pass
    return v
