"""Router scoring, group-limited selection, gate weights, aux losses and config validation."""

import math

import pytest
import torch

from moe.config import ConfigError, MoEConfig, validate_moe_config
from moe.router import (Router, compute_scores, select_topk, seq_aux_loss, switch_aux_loss,
                        topk_gate_weights, z_loss)


def _sets(ids_TK):
    return [set(r) for r in ids_TK.tolist()]


def test_softmax_topk_matches_torch_topk_and_normalises():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g)
    scores = compute_scores(logits, "softmax")
    ids = select_topk(scores, 2)
    assert _sets(ids) == _sets(torch.topk(torch.softmax(logits, -1), 2).indices)
    w = topk_gate_weights(scores, ids, norm_topk_prob=True, route_scale=2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((7,), 2.5))
    w_raw = topk_gate_weights(scores, ids, norm_topk_prob=False, route_scale=1.0)
    torch.testing.assert_close(w_raw, scores.gather(1, ids))


def test_group_limited_hand_case():
    # 2 groups of 3. Token 0: group 0 top-2 sum 0.9+0.8 > group 1 top-2 0.95+0.1 -> group 0 only,
    # although expert 3 (0.95) is the single best score.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.95, 0.1, 0.05]])
    ids = select_topk(scores, 2, n_groups=2, topk_groups=1)
    assert _sets(ids) == [{0, 1}]
    ids_all = select_topk(scores, 2, n_groups=2, topk_groups=2)
    assert _sets(ids_all) == [{3, 0}]


def test_group_limited_picks_only_from_chosen_groups_random():
    g = torch.Generator().manual_seed(1)
    T, E, G, TG, K = 50, 16, 4, 2, 4
    scores = torch.rand(T, E, generator=g)
    ids = select_topk(scores, K, n_groups=G, topk_groups=TG)
    grp = scores.view(T, G, E // G).topk(2, -1).values.sum(-1).topk(TG, -1).indices
    for t in range(T):
        allowed = {int(gi) * (E // G) + j for gi in grp[t] for j in range(E // G)}
        assert set(ids[t].tolist()) <= allowed
        masked = torch.full((E,), -1.0)
        masked[list(allowed)] = scores[t, list(allowed)]
        assert set(ids[t].tolist()) == set(masked.topk(K).indices.tolist())


def test_bias_changes_selection_not_gate_values():
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=4, score_func="sigmoid", norm_topk_prob=False,
                    route_scale=1.0)
    r = Router(16, cfg)
    x = torch.randn(32, 16)
    out0 = r(x)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    out1 = r(x)
    # Selection follows the bias: experts 0 and 1 for every token ...
    assert _sets(out1.topk_ids_TK) == [{0, 1}] * 32
    assert _sets(out0.topk_ids_TK) != _sets(out1.topk_ids_TK)
    # ... but the gate values are the unbiased scores of the chosen experts.
    torch.testing.assert_close(out1.topk_weights_TK, out1.scores_TE.gather(1, out1.topk_ids_TK))
    torch.testing.assert_close(out1.scores_TE, out0.scores_TE)
    assert out1.topk_weights_TK.max() < 1.0  # a sigmoid, not sigmoid + 5


def test_sigmoid_norm_divides_by_sum_plus_eps():
    scores = torch.tensor([[0.2, 0.6, 0.1]])
    ids = torch.tensor([[1, 0]])
    w = topk_gate_weights(scores, ids, norm_topk_prob=True, route_scale=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]) * 2.0)


def test_router_output_dtypes_and_grad():
    cfg = MoEConfig(n_experts=4, top_k=2, expert_dim=4)
    r = Router(8, cfg)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = r(x)
    assert out.topk_weights_TK.dtype == torch.float32  # documented: fp32 gate values
    assert out.scores_TE.dtype == torch.float32
    assert out.topk_ids_TK.dtype == torch.int64 and out.topk_ids_TK.shape == (5, 2)
    out.topk_weights_TK.sum().backward()
    assert r.gate.weight.grad is not None


# ---- aux losses against hand-computed values ------------------------------------------------

def test_switch_aux_loss_hand():
    # T=2, E=2, K=1. Token 0 -> expert 0, token 1 -> expert 0: f = (1, 0).
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    ids = torch.tensor([[0], [0]])
    # P = (0.625, 0.375); loss = E * (1*0.625 + 0*0.375) = 1.25
    assert switch_aux_loss(scores, ids).item() == pytest.approx(1.25)
    # Perfect balance gives 1.
    balanced = switch_aux_loss(torch.full((4, 4), 0.25), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
    assert balanced.item() == pytest.approx(1.0)


def test_switch_aux_loss_normalises_sigmoid_scores():
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3]])  # rows normalise to (.75,.25), (.5,.5)
    ids = torch.tensor([[0], [0]])
    assert switch_aux_loss(scores, ids).item() == pytest.approx(1.25)


def test_seq_aux_loss_hand():
    # Two sequences of 2 tokens, E=2, K=1.
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5],     # seq 0: both to expert 0
                           [0.5, 0.5], [0.25, 0.75]])    # seq 1: one each
    ids = torch.tensor([[0], [0], [0], [1]])
    # seq 0: f = E/(K*T) * counts = 2/2 * (2, 0) = (2, 0); P = (0.625, 0.375) -> 1.25
    # seq 1: f = (1, 1); P = (0.375, 0.625) -> 1.0 ; mean = 1.125
    assert seq_aux_loss(scores, ids, seq_len=2).item() == pytest.approx(1.125)
    # As one sequence of 4: f = 2/4*(3,1) = (1.5, .5); P = (.5, .5) -> 1.0
    assert seq_aux_loss(scores, ids, seq_len=4).item() == pytest.approx(1.0)


def test_z_loss_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)


def test_router_aux_loss_is_weighted_sum_and_off_at_zero():
    torch.manual_seed(0)
    base = dict(n_experts=4, top_k=2, expert_dim=4, score_func="softmax")
    x = torch.randn(12, 8)
    r0 = Router(8, MoEConfig(**base))
    out0 = r0(x, seq_len=4)
    assert out0.aux_loss.item() == 0.0 and out0.aux_parts == {}
    cfg = MoEConfig(**base, aux_loss_coef=0.1, seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    r = Router(8, cfg)
    r.load_state_dict(r0.state_dict())
    out = r(x, seq_len=4)
    logits = x @ r.gate.weight.T
    exp = (0.1 * switch_aux_loss(out.scores_TE, out.topk_ids_TK)
           + 0.01 * seq_aux_loss(out.scores_TE, out.topk_ids_TK, 4) + 0.001 * z_loss(logits))
    torch.testing.assert_close(out.aux_loss, exp)
    out.aux_loss.backward()
    assert r.gate.weight.grad.abs().sum() > 0  # the losses train the gate


# ---- config validation names the field ------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(n_experts=4, top_k=5), "moe.top_k"),
    (dict(n_experts=8, top_k=2, n_groups=3, topk_groups=1), "moe.n_groups"),
    (dict(n_experts=8, top_k=2, n_groups=2, topk_groups=3), "moe.topk_groups"),
    (dict(n_experts=8, top_k=2, score_func="relu"), "moe.score_func"),
    (dict(n_experts=8, top_k=2, drop_policy="random"), "moe.drop_policy"),
    (dict(n_experts=8, top_k=2, experts_impl="triton"), "moe.experts_impl"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_moe_config(MoEConfig(**kwargs))
