"""health/exit_record.py: the exit code survives torchrun (which itself exits 1 for any failure)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from health.exit_record import (clear_exit_records, read_exit_records, resolve_exit_code, write_exit_record)

REPO = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_EC2_METADATA_DISABLED="true")


def test_records_combine_most_permanent_first(tmp_path):
    d = str(tmp_path)
    assert resolve_exit_code(d, 1)[0] == 1  # no record: the launcher's rc
    write_exit_record(d, 0, 75, "SIGTERM")
    write_exit_record(d, 1, 75, "SIGTERM")
    assert resolve_exit_code(d, 1) == (75, "rank 0: SIGTERM")
    write_exit_record(d, 3, 76, "xid 79")
    assert resolve_exit_code(d, 1)[0] == 76
    (tmp_path / "exit_code.rank9.json").write_text("{torn")
    assert len(read_exit_records(d)) == 3
    clear_exit_records(d, rank=3)
    assert resolve_exit_code(d, 1)[0] == 75
    clear_exit_records(d)
    assert read_exit_records(d) == [] and not list(tmp_path.glob("*.json"))


def test_exit_code_survives_torchrun_and_preflight_gathers_every_rank(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
    s.close()
    run = [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1", "--master-port", port,
           "--nproc-per-node", "2", "-m", "health", "preflight", "--expected-gpus", "8",
           "--record-dir", str(tmp_path), "--timeout-s", "60", "--json", str(tmp_path / "pf.json")]
    p = subprocess.run(run, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]  # torchrun's own code: the reason is lost...
    assert "exitcode  : 76" in p.stderr
    q = subprocess.run([sys.executable, "-m", "health", "exit-code", "--dir", str(tmp_path), "--rc",
                        str(p.returncode)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and q.stdout.strip() == "76", q.stderr  # ...and recovered here
    assert "gpu_count=0" in q.stderr
    checks = json.loads((tmp_path / "pf.json").read_text())["checks"]
    assert {c["rank"] for c in checks} == {0, 1}  # rank 0's table has every rank's rows
    ar = [c for c in checks if c["name"] == "allreduce_busbw"]
    assert len(ar) == 2 and all(c["value"] > 0 and c["status"] == "ok" for c in ar)  # gloo: no floor
