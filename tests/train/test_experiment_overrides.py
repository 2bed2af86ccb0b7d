"""Every value an experiment file sets reaches the resolved config (the root's own values must not
win over it: Hydra applies the defaults list in order, so the root's ``_self_`` comes first)."""

import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "experiment")) if f.endswith(".yaml"))


def _leaves(d, prefix=""):
    for k, v in d.items():
        if k == "defaults":
            continue
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_values_win(name):
    with open(os.path.join(REPO, "configs", "experiment", f"{name}.yaml")) as f:
        exp = yaml.safe_load(f)
    out = subprocess.run([sys.executable, "-m", "train", f"experiment={name}", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    for key, want in _leaves(exp):
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == want, f"experiment={name}: {key} resolved to {node!r}, the experiment says {want!r}"
