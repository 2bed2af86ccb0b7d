"""`python -m cost.report` on synthetic run directories: two attempts (the first killed after
its checkpoint), a dense run, and an empty directory."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'moeforge[report]'")

from cost.budget import Budget  # noqa: E402
from cost.heartbeat import Heartbeat  # noqa: E402
from cost.goodput import GoodputLedger, resume_accounting  # noqa: E402
from cost.meter import CostMeter  # noqa: E402
from cost.report import build_report, compute, last_per_step  # noqa: E402
from cost.report_plots import PLOTS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = """run_name: synth
trainer: {max_steps: 100, global_batch_size: 4, seq_len: 64}
cluster: {nodes: 2, price_on_demand_per_hour: 36.0, price_spot_per_hour: 18.0, lifecycle: on_demand}
cost: {budget_usd: 4.0, alert_usd: [1.0], target_tokens: 0}
"""


def _attempt(run_dir, start, first_step, last_step, *, moe, ckpt_at=(), exit_code=None, prev=None):
    """Drives the cost API the way the trainer does, with a fake clock: 5 s startup, 1 s steps."""
    meter = CostMeter(72.0, start_time=start)  # $0.02/s
    ledger = GoodputLedger()
    hb = Heartbeat(run_dir, every_s=0.0)
    resume_accounting(meter, ledger, prev, _read_hb(run_dir), resumed_step=first_step)
    budget = Budget(4.0, [1.0])
    now = start + 5.0
    ledger.add("startup", 5.0)
    rows = []
    for step in range(first_step + 1, last_step + 1):
        now += 1.0
        ledger.add_step(1.0, 0.1)
        meter.note_progress(step, 1.0)
        row = {"step": step, "time": now, "loss": 5.0 / (1 + step / 20), "tok_s": 256.0,
               "mfu": None, "tokens": step * 256, "max_steps": 100, **meter.metrics(step * 256, now)}
        if step % 10 == 0:
            row["val_loss"] = row["loss"] + 0.1
        if moe:
            for layer in (1, 2):
                row[f"moe/L{layer}/imbalance"] = 1.0 + 0.5 * layer / (1 + step / 10)
                for e in range(8):
                    row[f"moe/L{layer}/load_e{e}"] = 100.0 + 10 * layer * (e - 3.5)
        rows.append(row)
        budget.check(meter.spent_usd(now), None, step)
        if step in ckpt_at:
            ledger.add("checkpoint", 2.0)
            now += 2.0
            meter.note_progress(step, 1.0, commit_step=step)
            d = os.path.join(run_dir, f"step_{step:09d}")
            os.makedirs(d)
            ts = {"step": step, "tokens": step * 256, "cost": meter.state_dict(now),
                  "goodput": ledger.state_dict(), "budget": budget.state_dict()}
            with open(os.path.join(d, "trainer_state.json"), "w") as f:
                json.dump(ts, f)
            open(os.path.join(d, "COMMITTED"), "w").close()
            prev_ts = ts
        hb.maybe_write(meter, ledger, now=now, step=step)
    if exit_code is not None:
        meter.end_attempt(exit_code, "done", now=now)
        hb.maybe_write(meter, ledger, now=now, force=True, step=last_step)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return locals().get("prev_ts"), meter, ledger


def _read_hb(run_dir):
    from cost.heartbeat import read_heartbeat

    return read_heartbeat(run_dir)


@pytest.fixture
def two_attempts(tmp_path):
    run = tmp_path / "synth"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    ts, _, _ = _attempt(str(run), T0, 0, 40, moe=True, ckpt_at=(20,))  # killed after step 40
    _, meter, ledger = _attempt(str(run), T0 + 200.0, 20, 60, moe=True, ckpt_at=(60,), exit_code=0,
                                prev=ts)
    return run, meter, ledger


def _check_report(html_path):
    from matplotlib.image import imread

    out = os.path.dirname(html_path)
    text = open(html_path).read()
    for key in PLOTS:
        assert f"src='{key}.png'" in text, key
        png = os.path.join(out, f"{key}.png")
        with open(png, "rb") as f:
            assert f.read(8) == PNG_MAGIC, png
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, png
    return text


def test_two_attempt_report(two_attempts):
    run, meter, ledger = two_attempts
    d = compute(str(run))
    assert d["cost_source"] == "heartbeat" and [r["attempt"] for r in d["history"]] == [1, 2]
    assert [r["step"] for r in d["rows"]] == list(range(1, 61))  # re-logged steps deduplicated
    assert len(d["raw_rows"]) == 80
    # attempt 1: 5 + 40 + 2 = 47 s; gap 200 - 47 = 153 s billed; attempt 2: 5 + 40 + 2 = 47 s
    assert d["paid_s"] == pytest.approx(247.0)
    assert d["spent_usd"] == pytest.approx(247 * 0.02)
    assert d["goodput"]["seconds"]["lost_work"] == pytest.approx(20.0)
    assert d["goodput"]["seconds"]["downtime"] == pytest.approx(153.0)
    # productive: 40 x 0.9 s per attempt, minus the 20 redone 1 s steps of attempt 1
    assert d["goodput"]["ettr"] == pytest.approx((36 - 20 + 36) / 247)
    assert d["projection"]["remaining_steps"] == 40
    assert d["what_if"]["spot"]["usd_per_hour"] == 36.0  # 2 nodes x $18
    text = _check_report(build_report(str(run)))
    assert "Attempt history" in text and "$4.94" in text and "what-if spot" in text


def test_report_cli_and_last_row_per_step(two_attempts):
    run, _, _ = two_attempts
    p = subprocess.run([sys.executable, "-m", "cost.report", str(run)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(run / "report" / "report.html")
    rows = last_per_step([{"step": 2, "loss": 1.0}, {"step": 1, "loss": 9.0}, {"step": 2, "loss": 0.5}])
    assert rows == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 0.5}]


def test_dense_run_without_heartbeat_uses_checkpoint(tmp_path):
    run = tmp_path / "dense"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    _attempt(str(run), T0, 0, 30, moe=False, ckpt_at=(20,))
    os.remove(run / "heartbeat.json")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "lo')  # torn last line of a killed writer
    d = compute(str(run))
    assert d["cost_source"] == "checkpoint" and d["paid_s"] == pytest.approx(27.0)
    _check_report(build_report(str(run)))


def test_empty_run_dir_still_renders(tmp_path):
    text = _check_report(build_report(str(tmp_path)))
    assert re.search(r"spent.*n/a", text)


def test_missing_run_dir_exits_2(tmp_path):
    from cost.report import main

    assert main([str(tmp_path / "nope")]) == 2
