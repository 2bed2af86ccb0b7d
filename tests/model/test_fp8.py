"""model/fp8.py: which modules go to fp8 and which stay in bf16 (the documented filter), on the
real presets built on the meta device; an emulated fp8 model (torchao's emulation: fp8 casts,
matmuls in high precision) trains on a CPU with the parameter names unchanged; the config errors."""

from __future__ import annotations

import pytest
import torch

from bench.common import preset
from model.fp8 import Fp8Config, convert_to_fp8, fp8_errors, keep_reason
from model.transformer import Transformer

pytest.importorskip("torchao", reason="fp8 is the optional extra 'fp8' (torchao), in the test extra")


def meta_model(name: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(preset(name))


def suffixes(fqns) -> set:
    """``layers.3.attention.wq`` -> ``attention.wq`` (the same in every block)."""
    return {f.split(".", 2)[-1] if f.startswith("layers.") else f for f in fqns}


EXPECTED = {
    # (model, recipe): linears converted (per block), linears kept with their reason
    ("llama_1b", "tensorwise"): ({"attention.wq", "attention.wo", "ffn.w1", "ffn.w3", "ffn.w2"},
                                 {"attention.wk": "small", "attention.wv": "small", "output": "output head"}),
    ("llama_1b", "rowwise"): ({"ffn.w1", "ffn.w3"},
                              {"attention.wq": "small", "attention.wk": "small", "attention.wv": "small",
                               "attention.wo": "small", "ffn.w2": "small", "output": "output head"}),
    ("dsv3_mini", "tensorwise"): ({"attention.wq", "attention.wkv_b", "attention.wo", "ffn.w1", "ffn.w3", "ffn.w2",
                                   "ffn.shared.w1", "ffn.shared.w3", "ffn.shared.w2"},
                                  {"attention.wkv_a": "small", "ffn.router.gate": "router", "output": "output head"}),
}


@pytest.mark.parametrize("name,recipe", list(EXPECTED))
def test_filter_converts_the_large_linears_and_keeps_head_router_and_small_ones(name, recipe):
    from torchao.float8.float8_linear import Float8Linear

    model = meta_model(name)
    report = convert_to_fp8(model, Fp8Config(recipe=recipe), capability=(9, 0))
    converted, kept = EXPECTED[(name, recipe)]
    assert suffixes(report.converted) == converted
    assert {suffixes([k]).pop() for k in report.kept} == set(kept)
    for fqn, reason in report.kept.items():
        assert kept[suffixes([fqn]).pop()] in reason, (fqn, reason)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[f], Float8Linear) for f in report.converted)
    assert not any(isinstance(modules[f], Float8Linear) for f in report.kept)


def test_routed_experts_go_to_the_fp8_grouped_gemm_on_sm90_only():
    on_h100 = meta_model("dsv3_mini")
    r = convert_to_fp8(on_h100, Fp8Config(), capability=(9, 0))
    assert r.experts_fp8 == ["layers.1.ffn.experts", "layers.2.ffn.experts", "layers.3.ffn.experts"]
    assert all(on_h100.layers[str(i)].ffn.experts.fp8_mm is not None for i in (1, 2, 3))
    on_l4 = meta_model("dsv3_mini")
    r = convert_to_fp8(on_l4, Fp8Config(), capability=(8, 9))
    assert not r.experts_fp8 and all("9.0" in v for v in r.experts_kept.values()) and len(r.experts_kept) == 3
    assert on_l4.layers["1"].ffn.experts.fp8_mm is None
    off = convert_to_fp8(meta_model("dsv3_mini"), Fp8Config(experts=False), capability=(9, 0))
    assert not off.experts_fp8 and set(off.experts_kept.values()) == {"trainer.fp8.experts=false"}


def test_keep_reason_dims_not_divisible_by_16():
    assert "not divisible by 16" in keep_reason("layers.0.ffn.w1", torch.nn.Linear(4104, 8192, device="meta"), "tensorwise")
    assert keep_reason("layers.0.ffn.w1", torch.nn.Linear(4096, 8192, device="meta"), "tensorwise") is None


def small_dense():
    # Dims that pass the tensorwise filter (w1/w3: 2048x128) in a model small enough for a CPU.
    return preset("llama_1b", vocab_size=512, d_model=128, n_layers=2, ffn_dim=2048,
                  attention={"n_heads": 4, "n_kv_heads": 1})


def test_emulated_fp8_model_trains_with_unchanged_parameter_names():
    cfg = small_dense()
    ref = Transformer(cfg)
    ref.init_weights(0, device="cpu")
    model = Transformer(cfg)
    report = convert_to_fp8(model, Fp8Config(), emulate=True)
    assert suffixes(report.converted) == {"ffn.w1", "ffn.w3"}
    assert list(model.state_dict()) == list(ref.state_dict())
    model.init_weights(0, device="cpu")
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = m(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert torch.isfinite(losses[1]) and abs(losses[1].item() - losses[0].item()) < 0.02 * losses[0].item()
    g_ref, g = ref.layers["0"].ffn.w1.weight.grad, model.layers["0"].ffn.w1.weight.grad
    assert g.dtype == torch.float32 and torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), 0) > 0.98


@pytest.mark.parametrize("capability,compile,installed,recipe,message", [
    (None, True, True, "tensorwise", "trainer.precision=fp8 needs a CUDA GPU with compute capability >= 8.9"),
    ((8, 6), True, True, "tensorwise", "this GPU is 8.6"),
    ((9, 0), False, True, "rowwise", "trainer.precision=fp8 needs trainer.compile=true"),
    ((9, 0), True, False, "rowwise", "pip install -e '.[fp8]'"),
    ((9, 0), True, True, "mxfp8", "trainer.fp8.recipe='mxfp8' must be one of"),
])
def test_fp8_errors_name_the_key_and_the_requirement(capability, compile, installed, recipe, message):
    errors = fp8_errors("fp8", Fp8Config(recipe=recipe), capability, compile, installed)
    assert len(errors) == 1 and message in errors[0], errors


def test_fp8_errors_only_for_fp8():
    assert fp8_errors("bf16", Fp8Config(recipe="nonsense"), None, False, False) == []
    assert fp8_errors("fp8", Fp8Config(), (8, 9), True, True) == []


def test_emulated_fp8_linears_train_from_bf16_master_weights():
    """optim.master_weights with precision=fp8: the fp8 linears are converted to bf16 compute weights
    like any linear and quantize from them; a MasterAdamW step moves the fp32 masters."""
    from train.master_adamw import MasterAdamW
    from train.master_weights import to_bf16_compute
    from train.optim import param_groups

    cfg = small_dense()
    model = Transformer(cfg)
    convert_to_fp8(model, Fp8Config(), emulate=True)
    model.init_weights(0, device="cpu")
    report = to_bf16_compute(model)
    w1 = model.layers["0"].ffn.w1
    assert type(w1).__name__ == "Float8Linear" and w1.weight.dtype == torch.bfloat16
    assert "layers.0.ffn.w1.weight" in report.converted
    opt = MasterAdamW(param_groups(model, 0.1), report.masters, lr=1e-3)
    master_before = report.masters[w1.weight].clone()
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and w1.weight.grad.dtype == torch.bfloat16
    opt.step()
    master = opt.state[w1.weight]["master"]
    assert master.dtype == torch.float32 and not torch.equal(master, master_before)
    assert torch.equal(w1.weight.detach(), master.to(torch.bfloat16))
