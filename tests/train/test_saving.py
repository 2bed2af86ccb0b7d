"""What a slow save costs the loop, through the user command on CPU: only its snapshot.

The storage is made slow for real (``checkpoint.fault_inject_write_delay_s``: every shard write
starts that much later), so a loop that waited for the write would show it in the step times.
Asserted from what the run leaves behind: the JSONL rows (``ckpt/stall_s``, step times), the
goodput line (``checkpoint`` vs ``other``), the log (the if_busy policy said once; the emergency
save reusing the save still writing) and the committed step directories.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.train.runner import REPO, env, read_jsonl, train_cmd

BASE = ["trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0",
        "optim.warmup_steps=2", "checkpoint.keep_last=20"]
TOKENS_PER_STEP = 4 * 64


def _run(tmp_path: Path, name: str, *overrides: str, timeout: float = 240) -> tuple[int, str, Path]:
    p = subprocess.run(train_cmd(*BASE, f"output_dir={tmp_path}", f"run_name={name}", *overrides), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, tmp_path / name


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("step_*/COMMITTED"))


def _goodput(out: str) -> dict[str, float]:
    """Percent of paid time per category from the final goodput line (absent = 0)."""
    line = [ln for ln in out.splitlines() if "goodput after attempt" in ln][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+) \d+:\d\d:\d\d \(([\d.]+)%\)", line)}


def test_slow_save_costs_the_loop_only_its_snapshot_and_is_booked_as_checkpoint(tmp_path):
    delay = 4.0
    rc, out, run_dir = _run(tmp_path, "slow", "trainer.max_steps=12", "checkpoint.every_steps=4",
                            "checkpoint.async_mode=process", "checkpoint.staging=device",
                            f"checkpoint.fault_inject_write_delay_s={delay}", "health.fault_inject_slow_s=0.1")
    assert rc == 0, out[-3000:]
    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    # The save step pays for the snapshot only, not for the (4 s slower) write.
    assert 0 < rows[4]["ckpt/stall_s"] < 1.5, rows[4]
    # Steps while the save of step 4 writes in the writer process: not held up by it.
    for step in range(5, 12):
        step_s = TOKENS_PER_STEP / rows[step]["tok_s"]
        assert step_s < 1.5, (step, step_s, rows[step])
        assert rows[step].get("ckpt/stall_s", 0.0) < 1.5, rows[step]
    # The save due at step 8 came while step 4's was writing: skipped, said once with both figures.
    said = [ln for ln in out.splitlines() if "longer than the interval" in ln]
    assert len(said) == 1 and "checkpoint due at step 8" in said[0], said
    assert re.search(r"writing for [\d.]+ s", said[0]) and "checkpoint.every_steps=4 = " in said[0]
    assert rows[12]["ckpt/skipped"] == 1
    assert 4 in _committed(run_dir) and 12 in _committed(run_dir) and 8 not in _committed(run_dir)
    # Every second of the wait for the writes is booked as checkpoint; little is left unexplained.
    pct = _goodput(out)
    assert pct.get("checkpoint", 0.0) > 0, pct
    assert pct.get("other", 0.0) < 10.0, pct
    hb = json.loads((run_dir / "heartbeat.json").read_text()) if (run_dir / "heartbeat.json").exists() else None
    if hb is not None:  # the ledger holds at least what the rows reported as stall
        stall = sum(r.get("ckpt/stall_s", 0.0) for r in rows.values())
        assert hb["goodput"]["seconds"]["checkpoint"] >= stall - 1e-6


def test_if_busy_defer_saves_at_the_first_step_after_the_write_commits(tmp_path):
    # Steps of 0.5 s plus compute (0.51 s on a quiet machine, ~0.7 s beside a busy test suite) and a
    # write of ~3.3 s: the save of step 4 is still writing when step 8's comes due (4 steps, at most
    # 3.4 s) and commits before step 12 (7 steps, at least 3.6 s), so the deferred save lands on step
    # 9, 10 or 11. (A 1.5 s write with 0.25 s steps and saves every 3 sat at the edge: a quiet machine
    # committed it within step 9, a regular save step.)
    rc, out, run_dir = _run(tmp_path, "defer", "trainer.max_steps=16", "checkpoint.every_steps=4",
                            "checkpoint.async_mode=thread", "checkpoint.if_busy=defer",
                            "checkpoint.fault_inject_write_delay_s=3.2", "health.fault_inject_slow_s=0.5",
                            "checkpoint.write_bandwidth_gbps=0.000001", "health.preemption_deadline_s=30")
    assert rc == 0, out[-3000:]
    # An emergency save that cannot meet the deadline is said at the start (after step 1), not at a notice.
    lines = out.splitlines()
    late = next(i for i, ln in enumerate(lines) if ln.startswith("step=2 "))
    assert any("does NOT fit health.preemption_deadline_s=30" in ln for ln in lines[:late]), out[-3000:]
    assert len([ln for ln in out.splitlines() if "longer than the interval" in ln]) == 1, out[-3000:]
    assert "deferred to the first step after it commits by checkpoint.if_busy=defer" in out
    steps = _committed(run_dir)
    assert 4 in steps and 16 in steps, steps
    assert any(s % 4 and s != 16 for s in steps), f"no deferred save was committed: {steps}"


def test_emergency_save_reuses_the_save_still_writing(tmp_path):
    """SIGTERM while the save of step 3 is writing: that save becomes the emergency checkpoint
    (no second write, no wait for it before deciding to stop); exit 75 with it committed."""
    run_dir = tmp_path / "sig"
    cmd = train_cmd(*BASE, f"output_dir={tmp_path}", "run_name=sig", "trainer.max_steps=200",
                    "checkpoint.every_steps=3", "checkpoint.async_mode=thread",
                    "checkpoint.fault_inject_write_delay_s=4", "health.fault_inject_slow_s=0.1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        t_end = time.monotonic() + 180
        for line in proc.stdout:  # bounded by the deadline below and by the process's exit
            lines.append(line)
            if line.startswith("step=5 "):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < t_end, "no step=5 line in time"
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 75, out[-3000:]
    assert "reusing the save of step 3, still writing at the notice" in out, out[-3000:]
    m = re.search(r"emergency checkpoint at step 3 committed ([\d.]+) s after the notice .*snapshot [\d.]+ s, "
                  r"host copy [\d.]+ s, write [\d.]+ s, committed [\d.]+ s after save\(\)", out)
    assert m, out[-3000:]
    assert _committed(run_dir) == [3]
    assert not list(run_dir.glob("step_00000000[4-9]")), "a second checkpoint was written"
