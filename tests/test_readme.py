"""Every command README.md shows is run here, exactly as written (installs are run by .ci/run)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.train.runner import REPO, env, last_per_step, read_jsonl

README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()


def bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_exactly_two_setup_commands_and_ci_runs_the_same():
    blocks = bash_blocks()
    assert len(blocks) == 2, blocks
    setup, tests = blocks
    assert setup.endswith("python -m train")
    for part in ("pip install torch==2.13.0", "pip install -e '.[test]'"):
        assert part in setup and part in CI, part
    test_cmd = tests.split("&&")[-1].strip()
    assert test_cmd == "python -m pytest"
    assert re.search(r"^python -m pytest$", CI, re.M), "CI must run the README's test command"


def _python(cmd: str) -> list[str]:
    args = shlex.split(cmd)
    assert args[0] == "python"
    return [sys.executable, *args[1:]]


def test_the_main_command_trains_the_default(tmp_path):
    """`python -m train` as written: trains tiny on the embedded corpus, loss falls, says where."""
    cmd = bash_blocks()[0].split("&&")[-1].strip()
    p = subprocess.run(_python(cmd), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    assert f"run directory: {runs[0]}" in p.stdout or str(runs[0].name) in p.stdout
    rows = last_per_step(read_jsonl(runs[0] / "metrics.jsonl"))
    assert max(rows) == 200
    assert rows[200]["loss"] < rows[10]["loss"] - 1.0
    assert "val_loss" in rows[200]
    assert rows[200]["val_loss"] < rows[50]["val_loss"]  # trainer.eval_every=50: it generalizes, too
    assert any((runs[0] / f"step_{s:09d}" / "COMMITTED").exists() for s in (150, 200))


def test_inline_commands(tmp_path):
    (tmp_path / "README.md").write_text(README)  # input of the prepare example
    inline = re.findall(r"`(python -m train[^`]*)`", README)
    assert "python -m train --cfg job" in inline
    for cmd in inline:
        if cmd == "python -m train":
            continue  # the main command, run above
        args = _python(cmd)
        if "--multirun" in args:
            args.append(f"output_dir={tmp_path}")
        p = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])


def test_the_example_metric_line_parses():
    from train.metrics import parse_metric_line

    line = next(l for l in README.splitlines() if l.startswith("step="))
    m = parse_metric_line(line)
    assert m["step"] == 50 and "val_loss" in m and "eta_s" in m
