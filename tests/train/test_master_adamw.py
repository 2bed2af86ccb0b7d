"""optim.master_weights: bf16 compute weights with fp32 masters (train/master_weights.py,
train/master_adamw.py) against today's fp32 parameters + AdamW, on the real tiny MoE model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpointing.state import AppState
from devices.runtime import Runtime
from model.config import ModelConfig
from model.transformer import Transformer
from moe.config import ConfigError
from train.config import TrainConfig
from train.master_adamw import MasterAdamW, adamw_update_
from train.master_weights import effective_precision, to_bf16_compute
from train.optim import build_optimizer, can_fold_clip, fold_clip, param_groups, unfold_clip
from train.step import StepInputs, train_step
from train.validate import validate_train_config

BF16 = Runtime(torch.device("cpu"), torch.bfloat16)
LR, WD, CLIP = 3e-3, 0.1, 1.0


def _model(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, ffn_dim=64, max_seq_len=32)
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_dim = 4, 2, 32
    cfg.moe.n_shared_experts, cfg.moe.first_k_dense = 1, 1
    m = Transformer(cfg)
    m.init_weights(seed, device=torch.device("cpu"))
    return m


def _batch(i: int):
    t = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(100 + i))
    return t[:, :-1], t[:, 1:]


def _optim_cfg(master: bool):
    cfg = TrainConfig().optim
    cfg.lr, cfg.weight_decay, cfg.master_weights, cfg.fused = LR, WD, master, "false"
    return cfg


def _steps(model, opt, first: int, n: int) -> list[float]:
    return [train_step(model, opt, StepInputs(iter([_batch(i)]), 1), BF16, CLIP, 0.0).loss.item()
            for i in range(first, first + n)]


def _fp32_values(model, opt) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 value: the master where there is one."""
    return {n: opt.state[p].get("master", p).detach().clone() for n, p in model.named_parameters()}


def test_which_parameters_become_bf16():
    report = to_bf16_compute(_model())
    conv, kept = set(report.converted), set(report.kept)
    for name in ["output.weight", "layers.0.ffn.w1.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
                 "layers.1.ffn.experts.w3", "layers.1.ffn.shared.w2.weight"]:
        assert name in conv, (name, sorted(conv))
    assert any(".attention." in n for n in conv)
    for name in ["tok_embeddings.weight", "norm.weight", "layers.1.ffn.router.gate.weight"]:
        assert name in kept, (name, sorted(kept))
    model = _model()
    to_bf16_compute(model)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if n in conv else torch.float32), n
        assert p.ndim >= 2 or p.dtype == torch.float32, n  # norms and biases stay fp32
    assert model.get_submodule("layers.1.ffn.router").expert_bias.dtype == torch.float32


def test_masters_are_the_fp32_values_at_conversion():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = to_bf16_compute(model)
    named = dict(model.named_parameters())
    for n in report.converted:
        assert torch.equal(report.masters[named[n]], before[n])  # exact, not re-widened
        assert torch.equal(named[n], before[n].to(torch.bfloat16))


def test_one_tensor_update_equals_adamw_on_the_master():
    """Weight decay, bias correction and the folded clip: the master moves as torch.optim.AdamW
    moves an fp32 parameter whose gradient is the bf16 one times the clip coefficient."""
    master = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.Parameter(master.clone())
    p16 = torch.nn.Parameter(master.to(torch.bfloat16))
    opt = MasterAdamW([{"params": [p16], "weight_decay": WD}], {p16: master.clone()}, lr=LR, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW([ref], lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=False)
    assert can_fold_clip(opt, [p16])
    for i in range(4):
        g16 = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 + i)).to(torch.bfloat16)
        norm = torch.tensor(3.0 + i)
        coef = (CLIP / (norm + 1e-6)).clamp(max=1.0)
        p16.grad, ref.grad = g16, g16.float() * coef
        fold_clip(opt, norm, CLIP)
        opt.step()
        unfold_clip(opt)
        ref_opt.step()
        torch.testing.assert_close(opt.state[p16]["master"], ref.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p16.detach(), opt.state[p16]["master"].to(torch.bfloat16))
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p16][k], ref_opt.state[ref][k], rtol=1e-6, atol=1e-9)
    assert opt.state[p16]["step"].item() == 4


def test_training_matches_fp32_params_under_bf16_autocast():
    """Same seed and batches: master weights vs fp32 parameters + AdamW under bf16 autocast. The
    forward sees the same bf16 weights (the fp32 weights' bf16 cast) and the gradients are the
    same bf16 values, and the update does AdamW's operations in AdamW's order: on CPU the two
    runs are bit-identical (losses and every fp32 value)."""
    ref = _model()
    ref_opt = build_optimizer(ref, _optim_cfg(False), "cpu", master_weights=False)
    model = copy.deepcopy(ref)
    opt = build_optimizer(model, _optim_cfg(True), "cpu", master_weights=True)
    assert isinstance(opt, MasterAdamW)
    ref_losses, losses = _steps(ref, ref_opt, 0, 6), _steps(model, opt, 0, 6)
    assert losses == ref_losses
    values = _fp32_values(model, opt)
    for n, p in ref.named_parameters():
        assert torch.equal(values[n], p.detach()), n


def _save(tmp, model, opt):
    dcp.save({"app": AppState(model, opt)}, checkpoint_id=str(tmp))


def _load(tmp, model, opt):
    dcp.load({"app": AppState(model, opt)}, checkpoint_id=str(tmp))


def test_save_resume_round_trip_is_bitwise(tmp_path):
    straight = _model()
    opt = build_optimizer(straight, _optim_cfg(True), "cpu", master_weights=True)
    _steps(straight, opt, 0, 3)
    saved = _model()
    saved_opt = build_optimizer(saved, _optim_cfg(True), "cpu", master_weights=True)
    _steps(saved, saved_opt, 0, 3)
    _save(tmp_path, saved, saved_opt)
    resumed = _model(seed=7)  # fresh objects, other weights: everything must come from the checkpoint
    resumed_opt = build_optimizer(resumed, _optim_cfg(True), "cpu", master_weights=True)
    _load(tmp_path, resumed, resumed_opt)
    for (n, p), (_, q) in zip(saved.named_parameters(), resumed.named_parameters()):
        assert q.dtype == p.dtype and torch.equal(p, q), n
        for k, v in saved_opt.state[p].items():
            assert resumed_opt.state[q][k].dtype == v.dtype and torch.equal(resumed_opt.state[q][k], v), (n, k)
    assert _steps(straight, opt, 3, 3) == _steps(resumed, resumed_opt, 3, 3)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(opt.state[p].get("master", p), resumed_opt.state[q].get("master", q)), n


def test_checkpoint_holds_fp32_masters_under_the_model_keys(tmp_path):
    model = _model()
    opt = build_optimizer(model, _optim_cfg(True), "cpu", master_weights=True)
    _steps(model, opt, 0, 1)
    sd = AppState(model, opt).state_dict()
    assert all(v.dtype == torch.float32 for v in sd["model"].values() if v.is_floating_point())
    assert not any("master" in s for s in sd["optim"]["state"].values())
    assert torch.equal(sd["model"]["output.weight"], opt.state[model.output.weight]["master"])
    assert "master" in opt.state[model.output.weight]  # the optimizer's own state is untouched


@pytest.mark.parametrize("direction", ["fp32_to_master", "master_to_fp32"])
def test_resume_across_modes_is_exact(tmp_path, direction):
    """A checkpoint has the same keys either way: an fp32 run's weights become the masters, and a
    master run's masters become an fp32 run's weights."""
    src_master = direction == "master_to_fp32"
    src = _model()
    src_opt = build_optimizer(src, _optim_cfg(src_master), "cpu", master_weights=src_master)
    _steps(src, src_opt, 0, 2)
    _save(tmp_path, src, src_opt)
    dst = _model(seed=7)
    dst_opt = build_optimizer(dst, _optim_cfg(not src_master), "cpu", master_weights=not src_master)
    if src_master:
        _steps(dst, dst_opt, 0, 1)  # AdamW state exists before loading (as after a guard rollback)
    _load(tmp_path, dst, dst_opt)
    src_values, dst_values = _fp32_values(src, src_opt), _fp32_values(dst, dst_opt)
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(src_values[n], dst_values[n]), n
        low = torch.bfloat16 if torch.bfloat16 in (p.dtype, q.dtype) else torch.float32
        assert torch.equal(p.detach().to(low), q.detach().to(low)), n  # the bf16 weight is the master rounded
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(src_opt.state[p][k], dst_opt.state[q][k].float()), (n, k)
        assert src_opt.state[p]["step"].item() == dst_opt.state[q]["step"].item()
    _steps(dst, dst_opt, 2, 1)  # and it trains on


def test_state_without_masters_is_refused():
    model = _model()
    opt = build_optimizer(model, _optim_cfg(True), "cpu", master_weights=True)
    sd = opt.state_dict()
    for state in sd["state"].values():
        state.pop("master", None)
    with pytest.raises(ValueError, match="optim.master_weights"):
        opt.load_state_dict(sd)


def test_update_function_handles_fp32_params_without_master():
    p = torch.ones(3)
    m, v = torch.zeros(3), torch.zeros(3)
    one = torch.tensor(1.0)
    # Step 1 with lr 0.1: -lr / (1 - beta1) and sqrt(1 - beta2) as the bias corrections.
    adamw_update_([p], [torch.full((3,), 0.5)], [m], [v], [], one, torch.tensor(-0.1 / 0.1),
                  torch.tensor(0.05 ** 0.5), one, 0.9, 0.95, 1e-8)
    torch.testing.assert_close(p, torch.full((3,), 0.9), rtol=0, atol=1e-6)  # Adam's first step moves by lr


def _cfg(**over) -> TrainConfig:
    cfg = TrainConfig()
    cfg.optim.master_weights = True
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("over, world, match", [
    ({"trainer__precision": "fp32"}, 1, "trainer.precision=bf16"),
    ({"parallel__engine": "deepspeed"}, 1, "parallel.engine=fsdp2"),
    ({}, 2, "world size 1"),
    ({"trainer__micro_batch_size": 4}, 1, "trainer.micro_batch_size=4"),
])
def test_validation_names_the_key_and_the_fix(over, world, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_train_config(_cfg(**over), world_size=world)
    assert "optim.master_weights" in str(e.value)


def test_valid_defaults_and_auto_precision_means_bf16():
    cfg = _cfg()
    validate_train_config(cfg, world_size=1)
    assert effective_precision(cfg) == "bf16"
    cfg.optim.master_weights = False
    assert effective_precision(cfg) == "auto"
    assert param_groups  # the groups MasterAdamW takes are AdamW's (decay on matrices only)


def test_user_command_resumes_bitwise(tmp_path):
    """``python -m train optim.master_weights=true``: 6 steps straight vs the same run resumed
    from its step-2 checkpoint (the later ones removed): same losses, same checkpointed weights."""
    import shutil

    from tests.dist.train_launch import checkpoint_tensors
    from tests.train.runner import FAST, last_per_step, read_jsonl, run_train

    common = [*FAST, "optim.master_weights=true", "trainer.max_steps=6", "checkpoint.every_steps=2",
              "checkpoint.keep_last=10", "run_name=mw", "trainer.eval_every=0"]
    run_train(*common, f"output_dir={tmp_path / 'a'}")
    straight, resumed = tmp_path / "a" / "mw", tmp_path / "b" / "mw"
    shutil.copytree(straight, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / f"step_{step:09d}")
    p = run_train(*common, f"output_dir={tmp_path / 'b'}")
    assert "resumed from step 2" in p.stdout and "device cpu bf16" in p.stdout
    assert "optim.master_weights=true: bf16 compute weights, fp32 masters" in p.stdout
    a = last_per_step(read_jsonl(straight / "metrics.jsonl"))
    b = last_per_step(read_jsonl(resumed / "metrics.jsonl"))
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    wa, wb = checkpoint_tensors(straight / "step_000000006"), checkpoint_tensors(resumed / "step_000000006")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert wa["app.model.output.weight"].dtype == torch.float32  # the masters, under the model's keys


def test_run_names_of_existing_runs_are_kept():
    """The new key is dropped from the run's identity while off (train/run_dir.py _OFF_WHEN)."""
    from train.run_dir import identity, run_name

    cfg = TrainConfig()
    assert "master_weights" not in identity(cfg)["optim"]
    on = _cfg()
    assert run_name(on) != run_name(cfg)
    as_string = TrainConfig()
    as_string.optim.master_weights = "True"  # how Hydra hands optim.master_weights=true to the key
    assert identity(as_string) == identity(on) and identity(on)["optim"]["master_weights"] is True
    off = TrainConfig()
    off.optim.master_weights = "false"
    assert run_name(off) == run_name(cfg)


def test_auto_is_on_only_for_a_one_gpu_bf16_run_with_one_micro_batch():
    """optim.master_weights=auto (the default): on where it was measured faster, off elsewhere;
    true and false are taken as said (Hydra hands true to a string key as "True")."""
    from train.master_weights import mode, use_master_weights

    cfg = TrainConfig()
    assert mode(cfg.optim.master_weights) == "auto"
    assert use_master_weights(cfg, 1, 1, "cuda", True)
    assert not use_master_weights(cfg, 1, 1, "cpu", False)  # CPU: fp32 unless asked
    assert not use_master_weights(cfg, 1, 1, "cuda", False)  # precision=fp32
    assert not use_master_weights(cfg, 2, 1, "cuda", True)  # FSDP2 DTensors
    assert not use_master_weights(cfg, 1, 2, "cuda", True)  # gradient accumulation
    cfg.distill.teacher = "/some/teacher"
    assert not use_master_weights(cfg, 1, 1, "cuda", True)
    for value, expect in ((True, True), ("True", True), ("true", True), (False, False), ("False", False)):
        cfg.optim.master_weights = value
        assert use_master_weights(cfg, 1, 1, "cpu", True) is expect, value
    validate_train_config(TrainConfig(), world_size=2)  # auto never refuses a run
    bad = TrainConfig()
    bad.optim.master_weights = "sometimes"
    with pytest.raises(ConfigError, match="optim.master_weights='sometimes' must be auto, true or false"):
        validate_train_config(bad, world_size=1)


def test_compiled_update_traces_once_and_matches_eager(monkeypatch):
    """The CUDA path's torch.compile'd update (here through aot_eager, which traces and
    functionalises it as inductor would, without codegen): one graph per group, no recompile as
    the LR and step change, and the eager path's losses."""
    import train.master_adamw as ma
    from compat.torch_compat import dynamo_reset

    dynamo_reset()
    monkeypatch.setattr(ma, "_compiled_update",
                        torch.compile(ma.adamw_update_, fullgraph=True, dynamic=False, backend="aot_eager"))
    eager, compiled = _model(), _model()
    eager_opt = build_optimizer(eager, _optim_cfg(True), "cpu", master_weights=True)
    opt = build_optimizer(compiled, _optim_cfg(True), "cpu", master_weights=True)
    opt.compiled = True
    losses = _steps(compiled, opt, 0, 1)
    with torch.compiler.set_stance("fail_on_recompile"):  # warmup moves the LR every step
        losses += _steps(compiled, opt, 1, 2)
    assert losses == _steps(eager, eager_opt, 0, 3)
    a, b = _fp32_values(eager, eager_opt), _fp32_values(compiled, opt)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7, msg=n)
