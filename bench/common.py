"""Shared benchmark plumbing: presets, CUDA-event timing with warm-up and medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from omegaconf import OmegaConf

from model.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name: str, **overrides) -> ModelConfig:
    base = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.merge(base, OmegaConf.load(os.path.join(REPO, "configs", "model", f"{name}.yaml")))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return OmegaConf.to_object(cfg)


def time_fn(fn: Callable[[], None], warmup: int = 3, iters: int = 10) -> list[float]:
    """Seconds per call, measured with CUDA events (host clock on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


def matmul_peak_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured bf16 matmul rate in this run: the practical ceiling MFU is compared against."""
    if not torch.cuda.is_available():
        return 0.0
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = median(time_fn(lambda: a @ b, warmup=5, iters=20))
    return 2 * n**3 / t / 1e12
