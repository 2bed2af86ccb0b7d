"""Loss curves of runs that trained on the same seed and data (e.g. bf16 against fp8), from their
``metrics.jsonl``: one JSON with every curve and each pair's relative loss difference, and a plot.

    python -m bench curves --run dsv3_mini/bf16=A/metrics.jsonl --run dsv3_mini/fp8=B/metrics.jsonl \\
        [--last 100] --out DIR --name curves_fp8

Runs are ``model/label=path``; each label after the first of a model is compared with the first
(the reference) on the steps both logged: ``rel = (loss - ref) / ref`` per step, and over the
last ``--last`` steps the mean of each and the relative difference of the means. Throughput per
run: the median ``tok_s`` of the logged steps after the first (which includes compilation).
Writes ``<name>.json`` and, with matplotlib installed, ``<name>.png`` (one panel per model).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any, Dict, List, Tuple

from bench.common import write_json


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The metric rows (those with a step and a loss) of one run's metrics.jsonl."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "step" in row and "loss" in row:
                    rows.append(row)
    return rows


def compare(ref: Dict[int, float], other: Dict[int, float], last: int) -> Dict[str, Any]:
    """``other`` against ``ref`` on the steps both have; the window is the last ``last`` steps of
    the shorter run."""
    steps = sorted(set(ref) & set(other))
    if not steps:
        raise ValueError("the two runs logged no common step")
    end = steps[-1]
    window = [s for s in steps if s > end - last]
    rel = {s: (other[s] - ref[s]) / ref[s] for s in steps}
    m_ref = statistics.fmean(ref[s] for s in window)
    m_other = statistics.fmean(other[s] for s in window)
    return {"steps_compared": len(steps), "window": [window[0], window[-1]], "points_in_window": len(window),
            "mean_ref": m_ref, "mean_other": m_other, "rel_diff_of_means": (m_other - m_ref) / m_ref,
            "max_abs_rel_in_window": max(abs(rel[s]) for s in window), "rel_by_step": rel}


def summarise(runs: List[Tuple[str, str, str]], last: int) -> Dict[str, Any]:
    """``runs``: (model, label, path). Curves, throughput and each model's comparisons."""
    out: Dict[str, Any] = {"last": last, "models": {}}
    for model, label, path in runs:
        rows = read_metrics(path)
        tok = [r["tok_s"] for r in rows[1:] if "tok_s" in r]
        entry = out["models"].setdefault(model, {"runs": {}, "comparisons": {}})
        entry["runs"][label] = {
            "path": path, "steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
            "tok_s_median": statistics.median(tok) if tok else None,
            "mfu_median": statistics.median([r["mfu"] for r in rows[1:] if "mfu" in r] or [0.0]),
        }
    for model, entry in out["models"].items():
        labels = list(entry["runs"])
        ref = dict(zip(entry["runs"][labels[0]]["steps"], entry["runs"][labels[0]]["loss"]))
        for label in labels[1:]:
            other = dict(zip(entry["runs"][label]["steps"], entry["runs"][label]["loss"]))
            entry["comparisons"][f"{label} vs {labels[0]}"] = compare(ref, other, last)
    return out


def plot(summary: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(summary["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        entry = summary["models"][model]
        for label, run in entry["runs"].items():
            tok = f", {run['tok_s_median'] / 1e3:.1f}k tok/s" if run["tok_s_median"] else ""
            ax.plot(run["steps"], run["loss"], label=f"{label}{tok}", marker=".")
        notes = [f"{name}: {100 * c['rel_diff_of_means']:+.2f}% (steps {c['window'][0]}-{c['window'][1]})"
                 for name, c in entry["comparisons"].items()]
        ax.set_title(model + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench curves")
    ap.add_argument("--run", action="append", required=True, help="model/label=path/to/metrics.jsonl")
    ap.add_argument("--last", type=int, default=100, help="compare the means over the last N steps")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="curves")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run:
        key, sep, path = spec.partition("=")
        model, slash, label = key.partition("/")
        if not sep or not slash or not model or not label:
            ap.error(f"--run {spec!r}: expected model/label=path")
        runs.append((model, label, path))
    return args, runs


def main(argv=None) -> None:
    args, runs = _args(argv)
    summary = summarise(runs, args.last)
    path = write_json(args.out, args.name, summary)
    png = path[:-5] + ".png"
    drew = plot(summary, png)
    print(f"wrote {path}" + (f" and {png}" if drew else " (no matplotlib: no plot)"))
    for model, entry in summary["models"].items():
        for label, run in entry["runs"].items():
            tok = f"{run['tok_s_median']:,.0f} tok/s" if run["tok_s_median"] else "-"
            print(f"{model} {label}: {len(run['steps'])} points, final loss {run['loss'][-1]:.4f}, {tok}")
        for name, c in entry["comparisons"].items():
            print(f"{model} {name}: mean loss over steps {c['window'][0]}-{c['window'][1]} "
                  f"{c['mean_other']:.4f} vs {c['mean_ref']:.4f} ({100 * c['rel_diff_of_means']:+.2f}%), "
                  f"max |rel| per step {100 * c['max_abs_rel_in_window']:.2f}%")


if __name__ == "__main__":
    main()
