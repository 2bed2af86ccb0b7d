"""Run `python -m train` in a subprocess, as a user would, and read what it left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Small and fast, but the real tiny model on the real embedded corpus.
FAST = [
    "trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.log_every=1",
    "trainer.eval_every=5", "trainer.eval_batches=1", "optim.warmup_steps=2",
]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["WANDB_MODE"] = e.get("WANDB_MODE", "offline")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", *overrides]


def run_train(*overrides: str, timeout: float = 300, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(*overrides), cwd=REPO, env=env(**extra_env), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_per_step(rows: list[dict]) -> dict[int, dict]:
    """A resumed run re-logs steps the killed attempt logged after its last commit: keep the last."""
    out: dict[int, dict] = {}
    for r in rows:
        out[int(r["step"])] = r
    return out
