"""The commands in docs/configs.md, docs/data.md, docs/distributed.md and docs/distillation.md, as written.

Commands that can run on this CPU run for real, in a scratch directory holding README.md and
docs/ (their inputs). Commands for GPUs or several nodes (torchrun, srun) are composed and
validated at the world size they would have, which is as far as a CPU machine can take them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.runner import REPO, env
from train.validate import validate_train_config

DOCS = ["configs.md", "data.md", "distributed.md", "distillation.md"]


def commands(doc: str) -> list[str]:
    text = (REPO / "docs" / doc).read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip():
                out.append(" ".join(cmd.split()))
    return out


ALL = [(doc, cmd) for doc in DOCS for cmd in commands(doc)]


def test_docs_have_commands():
    assert {d for d, _ in ALL} == set(DOCS)


def _world_and_overrides(args: list[str]) -> tuple[int, list[str]]:
    """World size and Hydra overrides of a torchrun/srun command line."""
    nodes = procs = 1
    overrides, i = [], 0
    while i < len(args):
        a = args[i]
        if a in ("--nnodes", "--nodes"):
            nodes = int(args[i + 1]); i += 2; continue
        if a in ("--nproc-per-node", "--ntasks-per-node"):
            procs = int(args[i + 1]); i += 2; continue
        if "=" in a and not a.startswith("-"):
            overrides.append(a)
        i += 1
    return nodes * procs, overrides


# (doc, command) -> the scratch directory it ran in, successfully, earlier in this session
_RAN: dict[tuple[str, str], Path] = {}


def _first(doc: str, first: str, tmp_path: Path, timeout: float) -> None:
    """Run the command a later one needs, in ``tmp_path``. The earlier test of that same command
    already ran it in a scratch directory of its own: copy what it left (the teacher run, the
    shards) rather than train the teacher a second time."""
    done = _RAN.get((doc, first))
    if done is not None:
        shutil.copytree(done, tmp_path, dirs_exist_ok=True)
        return
    subprocess.run([sys.executable, *shlex.split(first)[1:]], cwd=tmp_path, env=env(), check=True,
                   capture_output=True, timeout=timeout)


@pytest.mark.parametrize("doc,cmd", ALL, ids=[f"{d}:{c[:50]}" for d, c in ALL])
def test_doc_command(doc, cmd, tmp_path):
    args = shlex.split(cmd)
    if args[0] in ("torchrun", "srun"):
        from hydra import compose, initialize_config_dir

        from train.cli import CONFIG_DIR, to_typed

        world, overrides = _world_and_overrides(args)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = to_typed(compose("train", overrides=overrides))
        validate_train_config(cfg, world_size=world)
        return
    assert args[0] == "python", cmd
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    if "distill.teacher=" in cmd:  # the distillation.md pair: train the teacher first, as the doc does
        _first(doc, next(c for d, c in ALL if d == doc and "run_name=teacher" in c), tmp_path, 600)
    if "data=shards" in cmd:  # the data.md pair: prepare first, as the doc does
        _first(doc, next(c for d, c in ALL if d == doc and "train.prepare" in c), tmp_path, 300)
    p = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])
    _RAN[(doc, cmd)] = tmp_path

