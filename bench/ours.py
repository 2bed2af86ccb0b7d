"""Our training step as the single-process benchmarks time it, built through the trainer's pieces:
meta build -> ``parallelize`` (compile flag) -> ``init_weights`` -> ``build_optimizer`` ->
``train_step``, the same sequence as ``bench/train_bench.py`` at world size 1. ``--tiny`` presets
(a few layers, d_model 128, vocab 512) let the suites run end to end on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import preset
from model.config import ModelConfig
from devices.runtime import Runtime, resolve_runtime

# Same layer pattern as the full presets (dense first layer then MoE; 5 local : 1 global),
# shrunk so a whole compare run takes seconds on a CPU.
TINY = {
    "llama_1b": {"vocab_size": 512, "d_model": 128, "n_layers": 2, "ffn_dim": 384,
                 "attention": {"n_heads": 4, "n_kv_heads": 1}},
    "dsv3_mini": {"vocab_size": 512, "d_model": 128, "n_layers": 3, "ffn_dim": 384,
                  "attention": {"n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                "qk_rope_head_dim": 8, "v_head_dim": 16},
                  "moe": {"n_experts": 8, "top_k": 2, "expert_dim": 64}},
    "gemma3_swa_1b": {"vocab_size": 512, "d_model": 128, "n_layers": 6, "ffn_dim": 384,
                      "attention": {"head_dim": 32, "window": 16}},
}
TINY_SEQ, TINY_BATCH = 64, 2
GRAD_CLIP = 1.0  # train_step's clipping; the peer clips at the same norm


def model_config(name: str, tiny: bool) -> ModelConfig:
    if not tiny:
        return preset(name)
    if name not in TINY:
        raise SystemExit(f"--tiny knows {', '.join(TINY)}; got --model {name}")
    return preset(name, **TINY[name])


def bench_runtime() -> Runtime:
    """bf16 autocast with fp32 master parameters on one GPU; fp32 on CPU (as the trainer's auto)."""
    return resolve_runtime("auto", "auto", 0)


def make_batch(cfg: ModelConfig, batch: int, seq: int, device: torch.device, seed: int = 0):
    """Random tokens from a fixed CPU generator (the same batch for every variant); targets are
    the inputs shifted by one."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


@dataclass
class OursStep:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], object]  # one full training step; returns train.step.StepResult
    compiled: bool = False  # blocks compiled (parallelize's result): the loss is compiled too


def build_ours(cfg: ModelConfig, runtime: Runtime, batch, compile: bool, lr: float = 3e-4) -> OursStep:
    from parallelism.parallelize import parallelize
    from parallelism.process_group import DistContext
    from parallelism.config import ParallelConfig
    from train.config import OptimConfig
    from train.optim import build_optimizer
    from train.step import StepInputs, train_step
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    parallel = parallelize(model, ParallelConfig(), DistContext(), runtime.device_type, param_dtype=None,
                           activation_checkpointing=False, compile=compile)
    model.init_weights(0, device=runtime.device)
    opt = build_optimizer(model, OptimConfig(lr=lr), runtime.device_type)

    def step():
        return train_step(model, opt, StepInputs(iter([batch]), 1), runtime, GRAD_CLIP, cfg.moe.bias_update_rate, None,
                          compiled_loss=parallel.blocks_compiled)

    return OursStep(model, opt, step, parallel.blocks_compiled)
