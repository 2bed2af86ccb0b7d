"""The engine seam (``train/engine.py``): both engines implement the ``Engine`` protocol, a real
FSDP2 engine steps and hands its checkpoint state over, and the trainer only calls the protocol
(it never asks which engine it has). The DeepSpeed engine runs for real in tests/dist/test_deepspeed.py."""

from __future__ import annotations

import ast
import inspect
import pathlib

import torch

from train.deepspeed_step import DeepSpeedEngine
from train.engine import ENGINES, Engine
from train.fsdp_engine import FSDP2Engine

PROTOCOL_METHODS = ("build", "step", "checkpoint_state")
PROTOCOL_ATTRS = ("model", "optimizer", "compiled_loss")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_both_engines_have_the_protocol_methods_and_signatures():
    for cls in (FSDP2Engine, DeepSpeedEngine):
        for name in PROTOCOL_METHODS:
            assert _params(getattr(cls, name)) == _params(getattr(Engine, name)), (cls.__name__, name)
        assert isinstance(inspect.getattr_static(cls, "build"), classmethod), cls.__name__
        init = inspect.getsource(cls)
        for attr in PROTOCOL_ATTRS:  # set on the instance (or a class default)
            assert f"self.{attr}" in init or hasattr(cls, attr), (cls.__name__, attr)
    assert {name: factory() for name, factory in ENGINES.items()} == {"fsdp2": FSDP2Engine,
                                                                      "deepspeed": DeepSpeedEngine}


def _cfg():
    from hydra import compose, initialize_config_dir

    from train.cli import CONFIG_DIR, to_typed

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_typed(compose("train", overrides=["model=tiny", "trainer.activation_checkpointing=true"]))


def test_fsdp2_engine_builds_steps_and_gives_its_checkpoint_state():
    from checkpointing.state import AppState
    from model.transformer import Transformer
    from parallelism.process_group import DistContext
    from devices.runtime import Runtime
    from train.engine import build_engine
    from train.step import StepInputs

    cfg = _cfg()
    with torch.device("meta"):
        model = Transformer(cfg.model)
    engine = build_engine(model, cfg, DistContext(), Runtime(torch.device("cpu"), None), micro=2, n_micro=2)
    assert isinstance(engine, FSDP2Engine) and isinstance(engine, Engine)
    assert engine.model is model and not engine.compiled_loss
    # What parallelize learned is in its result, not on the model.
    assert engine.parallel.checkpointed_blocks == tuple(range(cfg.model.n_layers))
    assert not engine.parallel.blocks_compiled and engine.parallel.meshes is not None
    assert not {"meshes", "blocks_compiled"} & set(vars(model))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 17), generator=g)
    batches = [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    waited = []
    result = engine.step(StepInputs(iter(batches), 2, before_optimizer_step=lambda: waited.append(1)))
    assert result.verdict == "ok" and waited == [1] and torch.isfinite(result.loss)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # A guard that says skip: no update, no staging wait.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = engine.step(StepInputs(iter(batches), 2, before_optimizer_step=lambda: waited.append(2),
                                    guard=lambda norm: "skip"))
    assert result.verdict == "skip" and waited == [1]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    state = engine.checkpoint_state()
    assert list(state) == ["app"] and isinstance(state["app"], AppState)  # DCP keys app.model.*, app.optim.*


def test_the_trainer_only_calls_the_engine_protocol():
    """No ``engine is None``, no step function swapped by engine kind, no isinstance on the engine,
    no engine name in the loop: every use of ``self.engine`` is a protocol member."""
    source = (pathlib.Path(__file__).parents[2] / "train" / "trainer.py").read_text()
    tree = ast.parse(source)
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "engine"}
    assert used and used <= set(PROTOCOL_METHODS + PROTOCOL_ATTRS), used
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in ENGINES, f"trainer.py names the engine {node.value!r}"
        if isinstance(node, ast.Name):
            assert node.id not in ("FSDP2Engine", "DeepSpeedEngine", "isinstance"), node.id
        if isinstance(node, ast.Compare) and any(isinstance(n, ast.Attribute) and n.attr == "engine"
                                                 for n in [node.left, *node.comparators]):
            raise AssertionError(f"trainer.py compares the engine (line {node.lineno})")
    assert "step_fn" not in source
