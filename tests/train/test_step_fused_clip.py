"""Gradient clipping folded into fused AdamW equals clip_grad_norm_ followed by AdamW."""

import copy

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from devices.runtime import Runtime
from train.optim import can_fold_clip
from train.step import StepInputs, train_step


def _model():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, ffn_dim=64, max_seq_len=32)
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    m = Transformer(cfg)
    m.init_weights(0, device=torch.device("cpu"))
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 64, (2, 17), generator=g)
    return t[:, :-1], t[:, 1:]


@pytest.mark.parametrize("clip", [1e-3, 1e6])  # clipping active / inactive
def test_folded_clip_matches_explicit_clip(clip):
    fused_model = _model()
    ref_model = copy.deepcopy(fused_model)
    # eps=1 makes the update scale-dependent (m / (sqrt(v) + 1) ~ the gradient), so a clip that
    # was ignored would show up in the parameters.
    fused_opt = torch.optim.AdamW(fused_model.parameters(), lr=1e-2, eps=1.0, fused=True)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, eps=1.0, foreach=False)
    unclipped = copy.deepcopy(fused_model)
    unclipped_opt = torch.optim.AdamW(unclipped.parameters(), lr=1e-2, eps=1.0, fused=True)
    rt = Runtime(torch.device("cpu"), None)
    assert can_fold_clip(fused_opt, list(fused_model.parameters()))
    assert not can_fold_clip(ref_opt, list(ref_model.parameters()))
    for _ in range(2):
        out = train_step(fused_model, fused_opt, StepInputs(iter([_batch()]), 1), rt, clip, 0.0)
        train_step(unclipped, unclipped_opt, StepInputs(iter([_batch()]), 1), rt, 0.0, 0.0)
        assert not hasattr(fused_opt, "grad_scale")  # disarmed after the step
        # Reference: torch's own clip then a plain AdamW step.
        ref_model.train()
        x, y = _batch()
        logits, aux = ref_model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(out.grad_norm, ref_norm, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(fused_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    moved = max((p - q).abs().max().item() for p, q in zip(fused_model.parameters(), unclipped.parameters()))
    if clip < 1:  # the clip really changed the update
        assert out.grad_norm.item() > clip and moved > 1e-4
    else:
        assert moved == 0.0
