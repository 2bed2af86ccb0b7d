"""Shared pieces of the multi-process tests: the tiny model, a global batch, a train step like
train.step.train_step (gradient accumulation aside), and full (unsharded) views of the state."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

SEED = 1234
GLOBAL_BATCH, SEQ = 4, 32
LR = 3e-3
CLIP = 1.0
BIAS_RATE = 0.001


def tiny_cfg(moe_override=None):
    from omegaconf import OmegaConf

    from model.config import ModelConfig

    base = OmegaConf.structured(ModelConfig)
    over = OmegaConf.create({"moe": dict(moe_override or {})})
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load("configs/model/tiny.yaml"), over))


def par(dp_replicate=1, dp_shard=-1, ep=1):
    from parallelism.config import ParallelConfig

    return ParallelConfig(dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep, backend="gloo", timeout_s=60)


def build(parallel_cfg=None, world=1, seed=SEED, moe_override=None, **kw):
    """Meta build -> parallelize -> init_weights: the order the trainer uses."""
    return build_parallel(parallel_cfg, world, seed, moe_override, **kw)[0]


def build_parallel(parallel_cfg=None, world=1, seed=SEED, moe_override=None, **kw):
    """``build``, also returning parallelize's ParallelizeResult (the meshes)."""
    from model.transformer import Transformer
    from parallelism.parallelize import parallelize

    cfg = tiny_cfg(moe_override)
    with torch.device("meta"):
        model = Transformer(cfg)
    result = parallelize(model, parallel_cfg or par(), SimpleNamespace(world_size=world), "cpu", **kw)
    model.init_weights(seed, device="cpu")
    return model, result


def optimizer(model):
    from train.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.1), lr=LR, foreach=True)


def batch(step, vocab=256):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, opt, inputs, targets, reduce_counts=None):
    from moe.balance import update_expert_bias
    from parallelism.parallelize import clip_grad_norm

    model.train()
    logits, aux = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))
    (loss + aux).backward()
    norm = clip_grad_norm(list(model.parameters()), CLIP, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_expert_bias(model, BIAS_RATE, reduce_fn=reduce_counts)
    return loss.detach(), norm


def full_params(model):
    """name -> full tensor (collective for DTensors: every rank must call it)."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    for mod_name, mod in model.named_modules():
        for n, b in mod.named_buffers(recurse=False):
            if n not in mod._non_persistent_buffers_set:  # rank-local statistics are not state
                out[f"{mod_name}.{n}" if mod_name else n] = b.detach().clone()
    return out


def reference_run(steps, moe_override=None):
    """Single process on the global batch: losses, grad norms, final params."""
    model = build(moe_override=moe_override)
    opt = optimizer(model)
    losses, norms = [], []
    for s in range(steps):
        loss, norm = train_step(model, opt, *batch(s))
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms, full_params(model), model, opt
