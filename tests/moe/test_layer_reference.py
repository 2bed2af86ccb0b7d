"""MoELayer against Hugging Face transformers' DeepseekV3MoE and Qwen3MoeSparseMoeBlock (fp32,
same weights, forward and gradients), plus capacity-limited dispatch."""

import math

import pytest
import torch

from moe.config import MoEConfig
from moe.layer import MoELayer, capacity, capacity_keep_mask

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual, expected, msg=None):
    # fp32 tight: 1e-5 of the tensor's scale absorbs summation-order differences only.
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=msg)


def _eager(cfg):
    # Pin HF's experts to its eager per-expert loop: the plain reference.
    cfg._experts_implementation = "eager"
    return cfg


def _init_ours(layer: MoELayer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _load_hf_experts(hf_experts, layer: MoELayer) -> None:
    # HF 5.x: gate_up_proj [E, 2F, D] = [gate; up] (y = x @ W.T), down_proj [E, D, F].
    # Ours: w1 [E, D, F] gate, w3 [E, D, F] up, w2 [E, F, D] down (y = x @ w).
    ex = layer.experts
    with torch.no_grad():
        hf_experts.gate_up_proj.copy_(torch.cat([ex.w1.transpose(1, 2), ex.w3.transpose(1, 2)], dim=1))
        hf_experts.down_proj.copy_(ex.w2.transpose(1, 2))


def _hf_experts_grads(hf_experts, F):
    g = hf_experts.gate_up_proj.grad
    return {"experts.w1": g[:, :F].transpose(1, 2), "experts.w3": g[:, F:].transpose(1, 2),
            "experts.w2": hf_experts.down_proj.grad.transpose(1, 2)}


def _run(module_out, x, g):
    y = module_out[0] if isinstance(module_out, tuple) else module_out
    (y * g).sum().backward()
    return y


DEEPSEEK_CASES = [
    # (D, F, E, K, n_group, topk_group, n_shared, scale, norm, impl, B, T, seed)
    (16, 8, 8, 2, 2, 1, 1, 2.5, True, "grouped_mm", 2, 5, 0),
    (32, 16, 16, 4, 4, 2, 2, 1.7, True, "loop", 3, 4, 1),
    (16, 10, 8, 3, 4, 2, 1, 1.0, False, "auto", 1, 7, 2),  # F*4 bytes % 16 != 0: auto -> loop
    (24, 8, 12, 2, 3, 3, 1, 2.0, True, "grouped_mm", 2, 6, 3),
    (16, 8, 8, 8, 1, 1, 1, 1.0, True, "grouped_mm", 1, 1, 4),  # every expert, one token
]


@pytest.mark.parametrize("D,F,E,K,ng,tg,ns,scale,norm,impl,B,T,seed", DEEPSEEK_CASES)
def test_matches_hf_deepseek_v3(D, F, E, K, ng, tg, ns, scale, norm, impl, B, T, seed):
    hf_cfg = _eager(DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
        n_group=ng, topk_group=tg, n_shared_experts=ns, routed_scaling_factor=scale,
        norm_topk_prob=norm, hidden_act="silu"))
    hf = DeepseekV3MoE(hf_cfg)
    cfg = MoEConfig(n_experts=E, top_k=K, expert_dim=F, n_shared_experts=ns, score_func="sigmoid",
                    norm_topk_prob=norm, route_scale=scale, n_groups=ng, topk_groups=tg,
                    experts_impl=impl)
    ours = MoELayer(D, cfg)
    _init_ours(ours, seed)
    g = torch.Generator().manual_seed(100 + seed)
    bias = torch.randn(E, generator=g) * 0.5  # non-zero: must change selection, not weights
    with torch.no_grad():
        ours.router.expert_bias.copy_(bias)
        hf.gate.weight.copy_(ours.router.gate.weight)
        hf.gate.e_score_correction_bias.copy_(bias)
        _load_hf_experts(hf.experts, ours)
        hf.shared_experts.gate_proj.weight.copy_(ours.shared.w1.weight)
        hf.shared_experts.up_proj.weight.copy_(ours.shared.w3.weight)
        hf.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)

    x = torch.randn(B, T, D, generator=g)
    gy = torch.randn(B, T, D, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = _run(ours(x1), x1, gy)
    y_hf = _run(hf(x2), x2, gy)
    _close(y_ours, y_hf)
    _close(x1.grad, x2.grad)
    hf_grads = _hf_experts_grads(hf.experts, F)
    hf_grads["router.gate.weight"] = hf.gate.weight.grad
    hf_grads["shared.w1.weight"] = hf.shared_experts.gate_proj.weight.grad
    hf_grads["shared.w3.weight"] = hf.shared_experts.up_proj.weight.grad
    hf_grads["shared.w2.weight"] = hf.shared_experts.down_proj.weight.grad
    ours_grads = dict(ours.named_parameters())
    for name, ref in hf_grads.items():
        _close(ours_grads[name].grad, ref, msg=name)


QWEN_CASES = [
    # (D, F, E, K, norm, impl, B, T, seed)
    (16, 8, 8, 2, True, "grouped_mm", 2, 5, 0),
    (16, 8, 8, 2, False, "grouped_mm", 2, 5, 1),
    (32, 12, 6, 3, True, "loop", 3, 3, 2),
    (18, 6, 4, 1, False, "auto", 1, 9, 3),  # unaligned dims: auto -> loop
    (16, 16, 16, 4, False, "grouped_mm", 1, 1, 4),
]


@pytest.mark.parametrize("D,F,E,K,norm,impl,B,T,seed", QWEN_CASES)
def test_matches_hf_qwen3_moe(D, F, E, K, norm, impl, B, T, seed):
    hf_cfg = _eager(Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                   num_experts_per_tok=K, norm_topk_prob=norm, hidden_act="silu"))
    hf = Qwen3MoeSparseMoeBlock(hf_cfg)
    cfg = MoEConfig(n_experts=E, top_k=K, expert_dim=F, score_func="softmax", norm_topk_prob=norm,
                    experts_impl=impl)
    ours = MoELayer(D, cfg)
    assert ours.shared is None
    _init_ours(ours, seed)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.gate.weight)
        _load_hf_experts(hf.experts, ours)
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(B, T, D, generator=g)
    gy = torch.randn(B, T, D, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = _run(ours(x1), x1, gy)
    y_hf = _run(hf(x2), x2, gy)
    _close(y_ours, y_hf)
    _close(x1.grad, x2.grad)
    hf_grads = _hf_experts_grads(hf.experts, F)
    hf_grads["router.gate.weight"] = hf.gate.weight.grad
    ours_grads = dict(ours.named_parameters())
    for name, ref in hf_grads.items():
        _close(ours_grads[name].grad, ref, msg=name)


# ---- capacity-limited mode -------------------------------------------------------------------

def test_capacity_formula():
    assert capacity(10, 2, 4, 1.0) == 5
    assert capacity(10, 2, 4, 1.25) == math.ceil(6.25)
    assert capacity(3, 1, 8, 1.0) == 1


def test_keep_mask_position_keeps_earliest():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    w = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    keep = capacity_keep_mask(ids, w, 4, cap=2, drop_policy="position")
    # expert 0 gets tokens 0,1,2,3 -> keeps tokens 0 and 1; expert 1 gets 0,2 -> both fit.
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_keep_mask_probs_keeps_highest_weight():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    w = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    keep = capacity_keep_mask(ids, w, 4, cap=2, drop_policy="probs")
    # expert 0 weights 0.1, 0.8, 0.7, 0.4 -> keeps tokens 1 (0.8) and 2 (0.7).
    assert keep.tolist() == [[False, True], [True, True], [True, True], [True, False]]


def test_keep_mask_random_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    T, K, E, cap = 40, 3, 5, 7
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    for policy in ("probs", "position"):
        keep = capacity_keep_mask(ids, w, E, cap, policy)
        for e in range(E):
            pos = [(t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
            if policy == "probs":
                pos.sort(key=lambda tk: -w[tk].item())
            kept = set(pos[:cap])
            for tk in pos:
                assert keep[tk].item() == (tk in kept), (policy, e, tk)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_layer_drops_contribute_nothing(impl, policy):
    torch.manual_seed(0)
    D, E, K, B, T = 16, 4, 2, 2, 6
    cfg = MoEConfig(n_experts=E, top_k=K, expert_dim=8, capacity_factor=0.5, drop_policy=policy,
                    experts_impl=impl)
    layer = MoELayer(D, cfg)
    _init_ours(layer, 0)
    x = torch.randn(B, T, D, requires_grad=True)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    # Reference: route, keep by the policy, sum kept experts' outputs per token.
    x_TD = x.detach().reshape(-1, D)
    r = layer.router(x_TD, seq_len=T)
    cap = capacity(B * T, K, E, 0.5)
    keep = capacity_keep_mask(r.topk_ids_TK, r.topk_weights_TK, E, cap, policy)
    assert (~keep).sum() > 0  # this setting drops something
    ex = layer.experts
    ref = torch.zeros_like(x_TD)
    for t in range(B * T):
        for k in range(K):
            if keep[t, k]:
                e = r.topk_ids_TK[t, k]
                h = torch.nn.functional.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
                ref[t] += r.topk_weights_TK[t, k] * (h @ ex.w2[e])
    torch.testing.assert_close(y.detach().reshape(-1, D), ref.detach(), **TOL)
    assert layer.dropped_tokens.item() == (~keep).sum().item()
    # A token with every assignment dropped gets no output and no gradient.
    all_dropped = (~keep).all(dim=1)
    if all_dropped.any():
        assert (x.grad.reshape(-1, D)[all_dropped] == 0).all()


def test_dropless_by_default_and_y_sum_backward_through_layer():
    torch.manual_seed(1)
    for impl in ("loop", "grouped_mm"):
        layer = MoELayer(16, MoEConfig(n_experts=4, top_k=2, expert_dim=8, n_shared_experts=1,
                                       experts_impl=impl))
        x = torch.randn(2, 3, 16, requires_grad=True)
        y, aux = layer(x)
        y.sum().backward()  # the zero-stride gradient case, through the whole layer
        assert torch.isfinite(x.grad).all() and layer.experts.w1.grad is not None
        assert layer.dropped_tokens.item() == 0
        assert aux.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_compiles(dtype):
    # bf16: the grouped path traces with fullgraph (no host sync, no data-dependent branch).
    # fp32: grouped_mm's meta kernel is bf16-only, so auto takes the loop (graph breaks allowed).
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=16, n_shared_experts=1, capacity_factor=1.0,
                    aux_loss_coef=0.01, seq_aux_loss_coef=0.01, z_loss_coef=1e-3,
                    score_func="sigmoid", n_groups=2, topk_groups=1)
    layer = MoELayer(16, cfg).to(dtype)
    x = torch.randn(2, 8, 16, dtype=dtype, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=(dtype == torch.bfloat16), backend="aot_eager")
    y, aux = compiled(x)
    (y.float().sum() + aux).backward()
    y0, aux0 = layer(x)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(aux, aux0)
