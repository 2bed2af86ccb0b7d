"""docs/resilience.md does not drift: its commands run, its tables match the code."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "resilience.md").read_text()
COMMANDS = list(dict.fromkeys(re.findall(r"`((?:python|torchrun) [^`]*-m health[^`]*)`", DOC)))


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_EC2_METADATA_DISABLED="true")


def test_doc_lists_its_commands():
    assert "python -m health preflight" in COMMANDS and "python -m health nvml" in COMMANDS
    assert any(c.startswith("torchrun") for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_doc_command_runs(cmd):
    args = shlex.split(cmd)
    if args[0] == "torchrun":  # as written, but 2 processes and a free port on a 2-core CI machine
        i = args.index("--nproc-per-node")
        args[i + 1] = "2"
        args = [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *args[1:]]
    else:
        args = [sys.executable, *args[1:]]
    p = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    if "--expected-gpus" in args:  # no GPU here: the node is (correctly) unfit for 8 GPUs
        if "torch.distributed.run" in args:  # torchrun exits 1 for any failed worker; the worker said 76
            assert p.returncode == 1 and "exitcode  : 76" in p.stderr, (cmd, p.stderr[-2000:])
        else:
            assert p.returncode == 76, (cmd, p.stdout[-2000:], p.stderr[-2000:])
        assert "UNHEALTHY hosts" in p.stderr and "gpu_count=0" in p.stderr
    else:
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])


def test_exit_code_table_matches_the_code():
    from health.exit_codes import ExitCode

    rows = dict(re.findall(r"^\|\s*(\d+) \| ([a-z ]+?) \|", DOC, re.M))
    assert {int(k) for k in rows} == {0, 1, 2, 75, 76, 77, 78} == {int(c) for c in ExitCode}
    assert (ExitCode.OK, ExitCode.CRASH, ExitCode.CONFIG_ERROR) == (0, 1, 2)
    assert (ExitCode.PREEMPTED, ExitCode.UNHEALTHY, ExitCode.BUDGET_EXHAUSTED) == (75, 76, 77)
    assert ExitCode.HANG == 78 and rows["78"] == "hang"


def test_every_health_knob_is_documented():
    from health.config import HealthConfig

    for f in dataclasses.fields(HealthConfig):
        assert f"`health.{f.name}`" in DOC, f"docs/resilience.md: add health.{f.name} to the knobs table"
