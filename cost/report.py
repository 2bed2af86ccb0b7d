"""`python -m cost.report RUN_DIR`: RUN_DIR/report/report.html and its PNGs.

Reads what a run leaves behind, every piece optional: ``metrics.jsonl`` (the last row per step
wins: a resumed run re-logs the steps after its checkpoint), ``heartbeat.json`` (the attempt
history and the goodput ledger), the newest committed checkpoint's ``trainer_state.json`` (under
the run directory, or ``--checkpoint-dir``) and ``config.yaml`` (budget, prices, max_steps).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Tuple

from cost.heartbeat import read_heartbeat
from cost.meter import history_totals, newest_state, state_history, usd_per_mtok
from cost.goodput import hms, summarize
from cost.projection import project, restart_stats, what_if

log = logging.getLogger("moeforge")


# -- inputs ---------------------------------------------------------------------------------------


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSONL file in file order; a torn last line (killed writer) is skipped."""
    rows: List[Dict[str, Any]] = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d is not JSON (a killed writer's last line?); skipped", path, n)
    return rows


def last_per_step(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per step, the last one logged (the attempt that finished that step), by step."""
    by_step: Dict[int, Dict[str, Any]] = {}
    for r in rows:
        if r.get("step") is not None:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def newest_trainer_state(ckpt_dir: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """trainer_state.json of the newest committed ``step_*`` directory under ``ckpt_dir``."""
    from checkpointing.layout import COMMIT_MARKER, TRAINER_STATE_FILE, parse_step

    if not os.path.isdir(ckpt_dir):
        return None, None
    steps = sorted((s, n) for n in os.listdir(ckpt_dir) if (s := parse_step(n)) is not None
                   and os.path.exists(os.path.join(ckpt_dir, n, COMMIT_MARKER)))
    for _, name in reversed(steps):
        path = os.path.join(ckpt_dir, name, TRAINER_STATE_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), path
        except (OSError, ValueError) as e:
            log.warning("skipping %s: %s", path, e)
    return None, None


def read_config(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


# -- numbers --------------------------------------------------------------------------------------


def _g(d: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def compute(run_dir: str, ckpt_dir: Optional[str] = None) -> Dict[str, Any]:
    """Everything the report shows, as plain data (tested on its own)."""
    cfg = read_config(run_dir)
    raw = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    rows = last_per_step(raw)
    hb = read_heartbeat(run_dir)
    ts, ts_path = newest_trainer_state(ckpt_dir or run_dir)
    cost_state = newest_state((ts or {}).get("cost"), (hb or {}).get("cost"))
    from_hb = hb is not None and cost_state is hb.get("cost")
    history = state_history(cost_state) if cost_state else []
    totals = history_totals(history) if history else None
    ledger = ((hb or {}).get("goodput") if from_hb else (ts or {}).get("goodput")) or None
    paid_s = totals["paid_s"] if totals else None
    gp = summarize(ledger["seconds"], paid_s) if ledger and paid_s else None

    last = rows[-1] if rows else {}
    spent = totals["spent_usd"] if totals else last.get("spent_usd")
    tokens = last.get("tokens") or (ts or {}).get("tokens")
    budget = float(_g(cfg, "cost.budget_usd", 0.0) or 0.0)
    max_steps = int(last.get("max_steps") or _g(cfg, "trainer.max_steps", 0) or 0)
    tokens_per_step = (_g(cfg, "trainer.global_batch_size", 0) or 0) * (_g(cfg, "trainer.seq_len", 0) or 0)
    out: Dict[str, Any] = {
        "run_dir": run_dir, "rows": rows, "raw_rows": raw, "history": history, "heartbeat": hb,
        "trainer_state_path": ts_path, "cost_source": "heartbeat" if from_hb else (
            "checkpoint" if cost_state else None), "goodput": gp, "spent_usd": spent,
        "paid_s": paid_s, "tokens": tokens, "usd_per_mtok": usd_per_mtok(spent, tokens) if spent and tokens else None,
        "budget_usd": budget, "alert_usd": list(_g(cfg, "cost.alert_usd", []) or []),
        "usd_per_hour": (history[-1].get("usd_per_hour") if history else None),
        "step": last.get("step"), "max_steps": max_steps, "projection": None, "what_if": None,
        "restarts": None,
    }
    rates = [r["tok_s"] for r in rows[-10:] if r.get("tok_s")]
    if rates and tokens_per_step and out["usd_per_hour"] is not None and spent is not None:
        step_time = tokens_per_step / statistics.median(rates)
        ettr = gp["ettr"] if gp else None
        proj = project(step=int(last["step"]), max_steps=max_steps, step_time_s=step_time,
                       tokens_per_step=tokens_per_step, usd_per_hour=float(out["usd_per_hour"]),
                       spent_usd=spent, paid_s=paid_s or 0.0, ettr=ettr, tokens_done=tokens or 0,
                       target_tokens=float(_g(cfg, "cost.target_tokens", 0) or 0))
        out["projection"] = proj.as_dict() | {"step_time_s": step_time}
        # cluster.nodes when set (checked against the launch); 0 = the launched count the meter billed
        nodes = int(_g(cfg, "cluster.nodes", 0) or (history[-1].get("nodes") if history else None) or 1)
        od = float(_g(cfg, "cluster.price_on_demand_per_hour", 0.0) or 0.0) * nodes
        sp = float(_g(cfg, "cluster.price_spot_per_hour", 0.0) or 0.0) * nodes
        rs = restart_stats(history, gp["seconds"] if gp else {}, paid_s or 0.0)
        out["restarts"] = rs
        if od > 0 or sp > 0:
            out["what_if"] = what_if(proj.remaining_train_s, base_ettr=rs["base_ettr"],
                                     on_demand_usd_per_hour=od, spot_usd_per_hour=sp,
                                     interruptions_per_hour=rs["interruptions_per_hour"],
                                     restart_cost_s=rs["restart_cost_s"])
    return out


# -- HTML -----------------------------------------------------------------------------------------


def _usd(v: Optional[float]) -> str:
    return "n/a" if v is None else f"${v:,.2f}"


def _hours(s: Optional[float]) -> str:
    if s is None:
        return "n/a (never finishes)"
    return f"{s / 3600:,.2f} h" if s >= 36000 else hms(s)


def cost_table(d: Dict[str, Any]) -> List[Tuple[str, str]]:
    p, w, rs = d["projection"], d["what_if"], d["restarts"]
    gp = d["goodput"]
    rows = [
        ("spent (all attempts, gaps included)", _usd(d["spent_usd"])),
        ("paid time", _hours(d["paid_s"])),
        ("rate of the latest attempt", "n/a" if d["usd_per_hour"] is None else f"${d['usd_per_hour']:,.2f}/h"),
        ("tokens trained", "n/a" if not d["tokens"] else f"{d['tokens']:,.0f}"),
        ("$ per million tokens", "n/a" if d["usd_per_mtok"] is None else f"${d['usd_per_mtok']:,.4f}"),
        ("ETTR (productive / paid)", "n/a" if not gp or gp["ettr"] is None else f"{gp['ettr'] * 100:.1f}%"),
        ("attempts", str(len(d["history"])) if d["history"] else "n/a"),
        ("budget (cost.budget_usd)", _usd(d["budget_usd"]) if d["budget_usd"] > 0 else "none"),
    ]
    if rs:
        rows.append(("interruptions (per paid hour)",
                     f"{rs['interruptions']} ({rs['interruptions_per_hour']:.3f}/h)"))
    if p:
        rows += [
            ("step time (median of recent log steps)", f"{p['step_time_s']:.3f} s"),
            ("projection: steps left", f"{p['remaining_steps']:,}"),
            ("projection: time left (at this ETTR)", _hours(p["remaining_wall_s"])),
            ("projection: $ left", _usd(p["remaining_usd"])),
            ("projection: total $", _usd(p["total_usd"])),
        ]
    if w:
        for name in ("on_demand", "spot"):
            v = w[name]
            rows.append((f"what-if {name.replace('_', '-')} (same throughput, "
                         f"{v['interruptions_per_hour']:.3f} interruptions/h, ${v['usd_per_hour']:,.2f}/h)",
                         f"{_hours(v['wall_s'])}, {_usd(v['usd'])} left"))
    return rows


def _exit_text(r: Dict[str, Any]) -> str:
    if r.get("exit_code") is None:
        return "none recorded (killed, or still running)"
    return f"{r['exit_code']} {r.get('exit_reason') or ''}".strip()


def render_html(d: Dict[str, Any], images: Dict[str, str]) -> str:
    e = html.escape
    name = os.path.basename(os.path.abspath(d["run_dir"]))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moeforge report: {e(name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Run report: {e(name)}</h1>",
             f"<p>Run directory <code>{e(os.path.abspath(d['run_dir']))}</code>; cost totals from the "
             f"{e(d['cost_source'] or 'metric lines only')}"
             + (f", checkpoint state <code>{e(d['trainer_state_path'])}</code>" if d["trainer_state_path"] else "")
             + ".</p>", "<h2>Cost</h2><table>"]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in cost_table(d)]
    parts.append("</table>")
    titles = {"loss": "Loss and validation loss", "throughput": "Tokens/s and MFU",
              "spend": "Spend over time", "goodput": "Goodput breakdown",
              "attempts": "Attempts and restarts", "expert_load": "Expert load per layer"}
    for key, fname in images.items():
        parts.append(f"<h2>{e(titles.get(key, key))}</h2><img src='{e(fname)}' alt='{e(key)}'>")
    if d["history"]:
        parts.append("<h2>Attempt history</h2><table><tr><th>attempt</th><th>paid</th><th>gap (billed)"
                     "</th><th>$/h</th><th>$</th><th>steps</th><th>exit</th></tr>")
        for r in d["history"]:
            parts.append(
                f"<tr><td>{r.get('attempt')}</td><td>{_hours(r.get('paid_s', 0.0))}</td>"
                f"<td>{r.get('gap_raw_s', 0.0) / 60:.1f} min ({r.get('gap_s', 0.0) / 60:.1f} min)</td>"
                f"<td>{r.get('usd_per_hour', 0.0):,.2f}</td><td>{_usd(r.get('spent_usd'))}</td>"
                f"<td>{e(str(r.get('resumed_from_step')))} - {e(str(r.get('last_step')))}</td>"
                f"<td>{e(_exit_text(r))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(run_dir: str, out_dir: Optional[str] = None, ckpt_dir: Optional[str] = None) -> str:
    """Writes report.html and one PNG per plot; returns the HTML path."""
    from cost import report_plots as rp

    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    d = compute(run_dir, ckpt_dir)
    p = lambda key: os.path.join(out_dir, f"{key}.png")  # noqa: E731
    rp.loss(d["rows"], p("loss"))
    rp.throughput(d["rows"], p("throughput"))
    rp.spend(d["raw_rows"], d["history"], p("spend"), d["budget_usd"], d["alert_usd"])
    rp.goodput(d["goodput"], p("goodput"))
    rp.attempts(d["history"], p("attempts"))
    rp.expert_load(d["rows"], p("expert_load"))
    images = {key: f"{key}.png" for key in rp.PLOTS}
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(d, images))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cost.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="where the step_* directories are (default: RUN_DIR)")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"no run directory at {args.run_dir}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(build_report(args.run_dir, args.out, args.checkpoint_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
