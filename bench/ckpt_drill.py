"""The user command with periodic saves and a spot notice mid-run: what checkpointing costs the loop.

    python -m bench ckpt_drill --notice-at 350 --out DIR -- experiment=gpu_dsv3_mini \\
        trainer.log_every=1 checkpoint.every_steps=100 checkpoint.keep_last=1 \\
        checkpoint.async_mode=process checkpoint.staging=device

Runs ``python -m train <overrides>`` with ``health.imds_endpoint`` pointed at the loopback IMDSv2
server (health/imds_loopback.py), arms a spot notice when the metric line of step
``--notice-at`` appears, and reads back what the run left: per save step, ``ckpt/stall_s`` (the
extra seconds of the step that took the snapshot) from the JSONL; the steps while a save was
writing against the median step; notice -> committed from the log, with its phases; the if_busy
warning; the exit code and the goodput line. Writes ``ckpt_drill.json`` and the log to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench ckpt_drill")
    ap.add_argument("--notice-at", type=int, required=True, help="arm the spot notice at this step's metric line")
    ap.add_argument("--timeout", type=float, default=1500.0)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("overrides", nargs="*", help="python -m train overrides (after --)")
    return ap.parse_args(argv)


def _override(overrides, key, default=None):
    for o in overrides:
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    return default


def summarize(rows: list, log: str, tokens_per_step: float) -> dict:
    """Pure: the figures from the JSONL rows (log_every=1) and the log text."""
    step_s = {r["step"]: tokens_per_step / r["tok_s"] for r in rows if r.get("tok_s")}
    saves = {r["step"]: r["ckpt/stall_s"] for r in rows if r.get("ckpt/stall_s") is not None}
    plain = [s for st, s in step_s.items() if st not in saves]
    med = statistics.median(plain) if plain else None
    out = {"median_step_s": med, "save_steps_stall_s": saves, "n_rows": len(rows)}
    m = re.search(r"emergency checkpoint at step (\d+) (committed|FAILED) ([\d.]+) s after the notice \(([^)]*)\); "
                  r"(.*?); health\.preemption_deadline_s", log)
    if m:
        out.update(emergency_step=int(m.group(1)), emergency_ok=m.group(2) == "committed",
                   notice_to_commit_s=float(m.group(3)), emergency_phases=m.group(5))
    out["reused_inflight"] = "reusing the save of step" in log
    out["busy_warnings"] = [ln.strip() for ln in log.splitlines() if "longer than the interval" in ln]
    out["committed_in_background"] = re.findall(r"checkpoint \S+ committed in the background .*", log)
    out["estimates"] = re.findall(r"emergency checkpoint estimate: .*", log)
    good = [ln for ln in log.splitlines() if "goodput after attempt" in ln]
    out["goodput"] = good[-1].split("goodput", 1)[1] if good else None
    return out


def main(argv=None) -> None:
    from health.imds_loopback import ImdsServer  # the loopback IMDSv2 server (tests use it too)

    args = _args(argv)
    os.makedirs(args.out, exist_ok=True)
    seq = int(_override(args.overrides, "trainer.seq_len", 0) or 0)
    with ImdsServer(life_cycle="spot") as srv:
        cmd = [sys.executable, "-m", "train", *args.overrides, f"health.imds_endpoint={srv.endpoint}"]
        log_path = os.path.join(args.out, "ckpt_drill.log")
        t0 = time.time()
        armed_at = None
        lines = []
        with open(log_path, "w") as log_f:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:  # ends when the run exits
                lines.append(line)
                log_f.write(line)
                log_f.flush()
                sys.stdout.write(line)
                if armed_at is None and line.startswith(f"step={args.notice_at} "):
                    srv.arm_spot_notice(in_s=120)
                    armed_at = time.time()
                if time.time() - t0 > args.timeout:
                    proc.kill()
                    break
            rc = proc.wait()
    text = "".join(lines)
    run_dir = re.search(r"run directory: (\S+)", text)
    rows = []
    if run_dir and os.path.exists(os.path.join(run_dir.group(1), "metrics.jsonl")):
        with open(os.path.join(run_dir.group(1), "metrics.jsonl")) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    gbs = [r for r in rows if r.get("tokens")]
    tokens_per_step = (gbs[0]["tokens"] / gbs[0]["step"]) if gbs else float(seq or 1)
    result = {"cmd": cmd, "exit_code": rc, "armed_at_step": args.notice_at if armed_at else None,
              **summarize(rows, text, tokens_per_step)}
    from bench.common import environment, write_json

    result["env"] = environment()
    write_json(args.out, "ckpt_drill", result)
    print(json.dumps({k: v for k, v in result.items() if k != "cmd"}, indent=1, default=str))


if __name__ == "__main__":
    main()
