"""`moeforge <command>` dispatches to the existing entry points (moeforge/cli.py)."""

from __future__ import annotations

import subprocess
import sys

from moeforge.cli import COMMANDS, main
from tests.train.runner import REPO, env


def test_every_command_resolves_to_a_main():
    import importlib

    for name, (module, convention, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
        assert convention in ("argv", "sys.argv"), name


def test_unknown_command_and_usage(capsys):
    assert main(["tran"]) == 2
    assert "unknown command 'tran'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_subcommands_reach_their_parsers():
    """Each argparse-based command answers --help under its own name; train shows Hydra's config."""
    for cmd in ("launch", "ckpt", "report", "health", "prepare"):
        p = subprocess.run([sys.executable, "-m", "moeforge", cmd, "--help"], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (cmd, p.stdout[-500:], p.stderr[-1000:])
    p = subprocess.run([sys.executable, "-m", "moeforge", "train", "trainer.max_steps=7", "--cfg", "job"], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "max_steps: 7" in p.stdout, p.stderr[-2000:]


def test_python_m_moeforge_ignores_the_working_directory(tmp_path):
    """A checkout without an install: `python -m moeforge` from a directory with a clashing
    train.py still runs ours (moeforge/__main__.py drops the working directory)."""
    (tmp_path / "train.py").write_text("raise SystemExit('user train.py imported')\n")
    (tmp_path / "model.py").write_text("raise SystemExit('user model.py imported')\n")
    e = env()
    e["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, "-m", "moeforge", "train", "--cfg", "job"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "model:" in p.stdout, p.stdout[-500:] + p.stderr[-2000:]
