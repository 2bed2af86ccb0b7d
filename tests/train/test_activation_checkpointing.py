"""Activation checkpointing (``trainer.activation_checkpointing``, ``ac_policy``, ``ac_every``):
the same loss and gradients as without it, and the backward recomputes what each policy says --
counted by a dispatch mode: ``full`` re-runs the forward matmuls, ``selective`` re-runs none of
them (their outputs were kept), and ``ac_every=2`` wraps only half of the blocks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import ModelConfig
from model.transformer import Transformer
from parallelism.parallelize import apply_activation_checkpointing


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    OPS = tuple(getattr(torch.ops.aten, n) for n in ("mm", "addmm", "bmm", "_grouped_mm",
                                                      "_scaled_dot_product_flash_attention_for_cpu")
                if hasattr(torch.ops.aten, n))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _model() -> Transformer:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load("configs/model/tiny.yaml")))
    with torch.device("meta"):
        m = Transformer(cfg)
    m.init_weights(0, device="cpu")
    return m.train()


def _run(policy, every=1):
    """(loss, grads, matmuls run in the forward, matmuls run in the backward)."""
    m = _model()
    if policy:
        apply_activation_checkpointing(m, policy, every)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with _CountMatmuls() as fwd:
        logits, aux = m(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + aux
    with _CountMatmuls() as bwd:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), grads, fwd.n, bwd.n


def test_policies_keep_loss_and_grads_and_recompute_what_they_say():
    loss0, grads0, _, bwd0 = _run(None)
    results = {p: _run(p) for p in ("full", "selective")}
    for policy, (loss, grads, _, _) in results.items():
        torch.testing.assert_close(loss, loss0, msg=policy)
        assert grads.keys() == grads0.keys()
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{policy} {n}: {m}")
    full_bwd, sel_bwd = results["full"][3], results["selective"][3]
    assert sel_bwd == bwd0, "selective AC must not recompute any matmul"
    assert full_bwd > bwd0, "full AC recomputes the blocks' forward matmuls"
    # Every other block: about half of full's recomputed matmuls (the blocks differ in kind).
    _, _, _, every2_bwd = _run("full", every=2)
    assert bwd0 < every2_bwd < full_bwd


@pytest.mark.parametrize("override,message", [
    ("trainer.ac_policy=some", "trainer.ac_policy='some' must be one of ('full', 'selective')"),
    ("trainer.ac_every=0", "trainer.ac_every=0 must be >= 1"),
])
def test_bad_ac_config_names_the_key(override, message):
    import re

    from hydra import compose, initialize_config_dir

    from moe.config import ConfigError
    from train.cli import CONFIG_DIR, to_typed
    from train.validate import validate_train_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = to_typed(compose("train", overrides=[override]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg, world_size=1)


def test_bad_policy_and_every_name_the_key():
    m = _model()
    with pytest.raises(ValueError, match="trainer.ac_policy"):
        apply_activation_checkpointing(m, "some")
    with pytest.raises(ValueError, match="trainer.ac_every"):
        apply_activation_checkpointing(m, "full", 0)


def compiled_matches_eager(policy: str) -> None:
    """Checkpointed blocks compiled with fullgraph=True (run FIRST in a fresh process, so no lazy
    cache was filled by an eager call before) give the eager model's logits and gradients."""
    ref, m = _model(), _model()
    apply_activation_checkpointing(m, policy)
    for model in (ref, m):
        for block in model.layers.values():
            if block.is_moe:
                block.ffn.experts.impl = "padded"  # static shapes: the loop's .tolist() breaks graphs on CPU
    for block in m.layers.values():
        block.compile(backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (m, ref):
        logits, aux = model(tokens)
        (logits.float().logsumexp(-1).mean() + aux).backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for n, g in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][n], g, rtol=1e-4, atol=1e-5, msg=lambda msg: f"{n}: {msg}")


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointed_blocks_compile_without_graph_breaks(policy):
    """A graph break inside checkpoint's region (a lazily set module global, say) makes dynamo run
    the whole block uncompiled; fullgraph=True turns it into an error. In a fresh process."""
    import subprocess
    import sys

    code = f"from tests.train.test_activation_checkpointing import compiled_matches_eager as f; f({policy!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_returns_the_checkpointed_blocks_and_a_second_call_wraps_nothing_again():
    m = _model()
    assert apply_activation_checkpointing(m, "full", 2) == (0, 2)
    forwards = [vars(b).get("forward") for b in m.layers.values()]
    assert forwards[1] is None and forwards[3] is None and forwards[0] is not None
    assert apply_activation_checkpointing(m, "full", 2) == (0, 2)
    assert [vars(b).get("forward") for b in m.layers.values()] == forwards  # no checkpoint in a checkpoint
