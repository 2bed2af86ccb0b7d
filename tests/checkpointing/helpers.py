"""Shared bits of the checkpointing tests: a config stand-in, a tiny model, a few AdamW steps."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from checkpointing import AppState
from checkpointing.config import CheckpointConfig


def Cfg(**overrides: Any) -> CheckpointConfig:
    """The ``checkpoint`` section with keep_last=0 (keep everything) unless a test says otherwise."""
    return CheckpointConfig(**{"keep_last": 0, **overrides})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(self.emb(x))))


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def train_steps(model, opt, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 32, (4, 8), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def state_of(model, opt) -> Dict[str, Any]:
    return {"app": AppState(model, opt), "extra": {"rng": torch.get_rng_state()}}


def assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for (na, a), (nb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert na == nb and torch.equal(a, b), na
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)
