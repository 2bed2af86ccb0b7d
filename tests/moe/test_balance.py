"""Aux-loss-free bias balancing, statistics, and the bias acting only on selection."""

import torch
from torch import nn

from moe.balance import moe_layers, routing_stats, update_expert_bias
from moe.config import MoEConfig
from moe.layer import MoELayer


def _skewed_setup(seed=0, score_func="sigmoid"):
    torch.manual_seed(seed)
    D, E = 16, 8
    cfg = MoEConfig(n_experts=E, top_k=2, expert_dim=8, score_func=score_func, n_groups=2, topk_groups=2)
    layer = MoELayer(D, cfg)
    # Inputs share a strong common direction that two experts' gate rows point along.
    direction = torch.randn(D)
    direction /= direction.norm()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.3)
        layer.router.gate.weight[0] += 1.5 * direction
        layer.router.gate.weight[5] += 1.2 * direction
    x = torch.randn(4, 64, D) * 0.5 + 2.0 * direction
    return layer, x


def _imbalance(load):
    load = load.double()
    return (load.max() / load.mean()).item()


def test_bias_updates_balance_a_skewed_load():
    # Softmax scores are ~1/E, so the same bias step is relatively larger: a smaller rate
    # (at 0.02 the sign update settles into a limit cycle at imbalance ~2.3).
    for score_func, rate in (("sigmoid", 0.02), ("softmax", 0.005)):
        layer, x = _skewed_setup(score_func=score_func)
        history = []
        for step in range(60):
            with torch.no_grad():
                for micro in x.chunk(2):  # two micro-batches per optimizer step
                    layer(micro)
            history.append(_imbalance(layer.tokens_per_expert))
            update_expert_bias(layer, rate=rate)
            assert layer.tokens_per_expert.sum() == 0  # counts zeroed after each update
        assert history[0] > 2.5, history[0]  # the input really is skewed
        # It falls over steps, not by luck at the end: each window of 10 steps is better.
        w = [sum(history[i:i + 10]) / 10 for i in range(0, 60, 10)]
        assert w[-1] < 1.6, (score_func, w)
        assert w[-1] <= w[2] < w[0], (score_func, w)


def test_update_rule_sign_and_reduce_fn():
    layer = MoELayer(8, MoEConfig(n_experts=4, top_k=1, expert_dim=4))
    layer.tokens_per_expert.copy_(torch.tensor([6, 2, 0, 4]))  # mean 3
    calls = []

    def reduce_fn(t):  # stands in for an all-reduce over 2 identical ranks
        calls.append(t.shape)
        t.mul_(2)

    update_expert_bias(layer, rate=0.1, reduce_fn=reduce_fn)
    assert calls == [(4,)]  # one collective for all layers
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    assert layer.last_tokens_per_expert.tolist() == [12, 4, 0, 8]
    assert layer.tokens_per_expert.sum() == 0
    assert layer.router.expert_bias.dtype == torch.float32
    assert "router.expert_bias" in layer.state_dict()  # persistent: checkpointed
    assert "tokens_per_expert" not in layer.state_dict()  # statistics: not
    layer.to(torch.bfloat16)  # a wholesale cast leaves the int64 counts exact
    assert layer.tokens_per_expert.dtype == torch.int64


def test_output_depends_on_bias_only_through_selection():
    torch.manual_seed(3)
    cfg = MoEConfig(n_experts=6, top_k=2, expert_dim=8, score_func="sigmoid", norm_topk_prob=False,
                    n_shared_experts=1)
    layer = MoELayer(16, cfg)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y0, _ = layer(x)
        layer.router.expert_bias.add_(0.7)  # same shift for all: selection unchanged
        y_shift, _ = layer(x)
        torch.testing.assert_close(y_shift, y0, rtol=0, atol=0)
        # A bias that forces experts 2 and 4 for every token: weights stay the unbiased sigmoid.
        layer.router.expert_bias.copy_(torch.tensor([0, 0, 10.0, 0, 10.0, 0]))
        y_forced, _ = layer(x)
        x_TD = x.reshape(-1, 16)
        scores = torch.sigmoid(x_TD @ layer.router.gate.weight.T)
        ex = layer.experts

        def expert(e):
            return (torch.nn.functional.silu(x_TD @ ex.w1[e]) * (x_TD @ ex.w3[e])) @ ex.w2[e]

        ref = scores[:, 2:3] * expert(2) + scores[:, 4:5] * expert(4) + layer.shared(x_TD)
        torch.testing.assert_close(y_forced.reshape(-1, 16), ref, rtol=1e-5, atol=1e-6)


class _Toy(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"ffn": MoELayer(8, cfg)}),
                                     nn.ModuleDict({"ffn": nn.Linear(8, 8)}),
                                     nn.ModuleDict({"ffn": MoELayer(8, cfg)})])

    def forward(self, x):
        aux = x.new_zeros(())
        for blk in self.layers:
            out = blk["ffn"](x)
            if isinstance(out, tuple):
                out, a = out
                aux = aux + a
            x = x + out
        return x, aux


def test_routing_stats_keys_values_and_accumulation():
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=4, top_k=2, expert_dim=4, aux_loss_coef=0.01, z_loss_coef=0.001,
                    capacity_factor=0.5)
    model = _Toy(cfg)
    assert [n for n, _ in moe_layers(model)] == ["layers.0.ffn", "layers.2.ffn"]
    x = torch.randn(2, 6, 8)
    model(x)
    model(x)  # two micro-batches accumulate
    first = moe_layers(model)[0][1]
    assert first.tokens_per_expert.sum().item() == 2 * 2 * 6 * 2
    stats = routing_stats(model)
    for tag in ("L0", "L2"):
        for k in ("tokens_min", "tokens_max", "imbalance", "dropped", "dropped_frac", "bias_norm",
                  "aux_loss", "seq_aux_loss", "z_loss"):
            assert isinstance(stats[f"moe/{tag}/{k}"], float), k
    assert stats["moe/L0/tokens_max"] == first.tokens_per_expert.max().item()
    assert stats["moe/L0/imbalance"] >= 1.0
    assert stats["moe/L0/dropped"] > 0  # capacity 0.5 must drop
    assert stats["moe/L0/aux_loss"] > 0 and stats["moe/L0/seq_aux_loss"] == 0.0
    # After the bias update the stats report the snapshot the update took.
    update_expert_bias(model, rate=0.0)
    after = routing_stats(model)
    assert after["moe/L0/tokens_max"] == stats["moe/L0/tokens_max"]
    assert after["moe/L0/bias_norm"] == 0.0  # rate 0: no change
    assert after["moe/L0/dropped"] == 0.0  # reset by the previous read


def test_evaluation_does_not_feed_the_bias_update():
    import torch

    from moe.config import MoEConfig
    from moe.layer import MoELayer

    layer = MoELayer(16, MoEConfig(n_experts=4, top_k=2, expert_dim=8))
    x = torch.randn(2, 5, 16)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert int(layer.tokens_per_expert.sum()) == 0
    layer.train()
    layer(x)
    assert int(layer.tokens_per_expert.sum()) == 2 * 5 * 2
