"""The run report's figures: one function per PNG, matplotlib (Agg), each tolerant of missing
data (it then draws a figure that says what is missing, so the report never has a hole)."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cost.goodput import BADPUT  # noqa: E402
from health.exit_codes import ExitCode  # noqa: E402

_FIGSIZE = (8.0, 4.2)
_E = ExitCode
_EXIT_COLORS = {_E.OK: "tab:green", _E.PREEMPTED: "tab:orange", _E.UNHEALTHY: "tab:purple", _E.BUDGET_EXHAUSTED: "tab:red",
                _E.CRASH: "black", _E.CONFIG_ERROR: "tab:gray", None: "tab:blue"}
_EXIT_NAMES = {_E.OK: "done", _E.PREEMPTED: "preempted", _E.UNHEALTHY: "unhealthy", _E.BUDGET_EXHAUSTED: "budget",
               _E.CRASH: "crash", _E.CONFIG_ERROR: "config", None: "killed / running"}
_LOAD_RE = re.compile(r"^moe/L(\d+)/load_e(\d+)$")
_IMB_RE = re.compile(r"^moe/L(\d+)/imbalance$")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def placeholder(path: str, title: str, message: str) -> str:
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, color="0.3")
    return _save(fig, path)


def _series(rows: Sequence[Dict[str, Any]], key: str):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts])


def loss(rows: Sequence[Dict[str, Any]], path: str) -> str:
    x, y = _series(rows, "loss")
    if not x:
        return placeholder(path, "Loss", "no 'loss' in metrics.jsonl")
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    ax.plot(x, y, label="train loss", lw=1.2)
    vx, vy = _series(rows, "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", label="val loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def throughput(rows: Sequence[Dict[str, Any]], path: str) -> str:
    x, y = _series(rows, "tok_s")
    if not x:
        return placeholder(path, "Throughput", "no 'tok_s' in metrics.jsonl")
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    ax.plot(x, y, color="tab:blue", lw=1.2, label="tokens/s (all devices)")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s", color="tab:blue")
    ax.grid(alpha=0.3)
    mx, my = _series(rows, "mfu")
    if mx:
        ax2 = ax.twinx()
        ax2.plot(mx, [100 * v for v in my], color="tab:red", lw=1.0, label="MFU")
        ax2.set_ylabel("MFU (%)", color="tab:red")
        ax.set_title("Throughput and MFU")
    else:
        ax.set_title("Throughput (MFU n/a: device peak unknown, e.g. CPU)")
    return _save(fig, path)


def spend(rows: Sequence[Dict[str, Any]], history: Sequence[Dict[str, Any]], path: str,
          budget_usd: float = 0.0, alerts: Sequence[float] = ()) -> str:
    pts = sorted((r["time"], r["spent_usd"]) for r in rows
                 if r.get("time") is not None and r.get("spent_usd") is not None)
    t0 = _t0(history, pts)
    if not pts and not history:
        return placeholder(path, "Spend", "no 'spent_usd' in metrics.jsonl and no attempt history")
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    if pts:
        ax.plot([(t - t0) / 3600 for t, _ in pts], [s for _, s in pts], ".-", ms=3,
                label="spent (log steps)")
    # the attempt history: spend at each attempt's start (billed gap included) and at its last
    # sign of life; the segment between attempts is the gap (flat when it is not billed)
    cum, line, ends = 0.0, [], []
    for r in history:
        if r.get("start") is None or r.get("last_alive") is None:
            cum += float(r.get("spent_usd", 0.0))
            continue
        line.append(((r["start"] - t0) / 3600, cum + float(r.get("gap_usd", 0.0))))
        cum += float(r.get("spent_usd", 0.0))
        line.append(((r["last_alive"] - t0) / 3600, cum))
        ends.append(line[-1])
    if line:
        ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="tab:purple", lw=1,
                label="attempt history (starts, gaps, ends)")
        ax.plot([e[0] for e in ends], [e[1] for e in ends], "s", color="tab:purple",
                label="end of an attempt (last heartbeat)")
    if budget_usd > 0:
        ax.axhline(budget_usd, color="tab:red", ls="--", lw=1, label=f"budget ${budget_usd:.2f}")
    for a in alerts:
        ax.axhline(a, color="tab:orange", ls=":", lw=1)
    ax.set_xlabel("hours since the first attempt started")
    ax.set_ylabel("$ spent (all attempts)")
    ax.set_title("Spend over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _t0(history: Sequence[Dict[str, Any]], pts) -> float:
    starts = [r["start"] for r in history if r.get("start") is not None]
    if starts:
        return min(starts)
    return pts[0][0] if pts else 0.0


def goodput(summary: Optional[Dict[str, Any]], path: str) -> str:
    if not summary or summary.get("paid_s", 0) <= 0:
        return placeholder(path, "Goodput", "no goodput ledger: neither heartbeat.json nor the newest checkpoint's "
                           "trainer_state.json has a 'goodput' entry")
    cats = ["productive"] + list(BADPUT)
    hours = [summary["seconds"][c] / 3600 for c in cats]
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    badput_colors = ["tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:red", "tab:gray", "tab:olive"]
    colors = ["tab:green"] + [badput_colors[i % len(badput_colors)] for i in range(len(BADPUT))]
    bars = ax.barh(cats[::-1], hours[::-1], color=colors[::-1])
    for bar, c in zip(bars, cats[::-1]):
        frac = summary["fraction"][c]
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {frac * 100:.1f}%",
                va="center", fontsize=8)
    ettr = summary.get("ettr")
    ax.set_title(f"Goodput: ETTR {ettr * 100:.1f}% of {summary['paid_s'] / 3600:.2f} paid hours"
                 if ettr is not None else "Goodput")
    ax.set_xlabel("hours")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def attempts(history: Sequence[Dict[str, Any]], path: str) -> str:
    recs = [r for r in history if r.get("start") is not None]
    if not recs:
        return placeholder(path, "Attempts", "no attempt history (heartbeat.json or checkpoint cost state)")
    t0 = min(r["start"] for r in recs)
    fig, ax = plt.subplots(figsize=(_FIGSIZE[0], 1.2 + 0.5 * len(recs)))
    for i, r in enumerate(recs):
        s = (r["start"] - t0) / 3600
        e = (r.get("last_alive", r["start"]) - t0) / 3600
        code = r.get("exit_code")
        ax.broken_barh([(s, max(e - s, 1e-6))], (i - 0.35, 0.7), color=_EXIT_COLORS.get(code, "0.5"))
        if r.get("gap_raw_s"):
            g = r["gap_raw_s"] / 3600
            ax.broken_barh([(s - g, g)], (i - 0.2, 0.4), facecolor="none", edgecolor="0.4", hatch="//")
            ax.text(s - g / 2, i + 0.3, f"gap {_dur(r['gap_raw_s'])}, {_dur(r.get('gap_s', 0))} billed",
                    ha="center", fontsize=7)
        label = (f"steps {r.get('resumed_from_step', '?')}-{r.get('last_step', '?')}, "
                 f"{_EXIT_NAMES.get(code, f'exit {code}')}")
        ax.text(e, i, f" {label}", va="center", fontsize=8)
    ax.set_yticks(range(len(recs)), [f"attempt {r['attempt']}" for r in recs])
    ax.invert_yaxis()
    ax.set_xlabel("hours since the first attempt started")
    ax.set_title("Attempts (bars: paid attempt time; hatched: gaps)")
    ax.margins(x=0.25)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def expert_load_matrix(rows: Sequence[Dict[str, Any]]):
    """(kind, matrix, layer labels, column labels) from JSONL rows, or None without MoE keys.

    kind ``load``: per-expert counts ``moe/L<i>/load_e<j>`` at the newest step that has them,
    each layer divided by its mean (1.0 = balanced). kind ``imbalance``: ``moe/L<i>/imbalance``
    (max/mean) per layer over log steps.
    """
    for r in reversed(rows):
        cells = {(int(m.group(1)), int(m.group(2))): v for k, v in r.items()
                 if (m := _LOAD_RE.match(k)) and v is not None}
        if cells:
            layers = sorted({li for li, _ in cells})
            n_e = max(e for _, e in cells) + 1
            mat = np.full((len(layers), n_e), np.nan)
            for (li, e), v in cells.items():
                mat[layers.index(li), e] = v
            mat = mat / np.nanmean(mat, axis=1, keepdims=True).clip(min=1e-9)
            return "load", mat, [f"L{li}" for li in layers], list(range(n_e)), r["step"]
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := _IMB_RE.match(k))})
    if not layers:
        return None
    with_moe = [r for r in rows if any(f"moe/L{li}/imbalance" in r for li in layers)]
    mat = np.array([[np.nan if r.get(f"moe/L{li}/imbalance") is None else r[f"moe/L{li}/imbalance"]
                     for r in with_moe] for li in layers], dtype=float)
    steps = [r["step"] for r in with_moe]
    return "imbalance", mat, [f"L{li}" for li in layers], steps, steps[-1]


def expert_load(rows: Sequence[Dict[str, Any]], path: str) -> str:
    found = expert_load_matrix(rows)
    if found is None:
        return placeholder(path, "Expert load", "no moe/L<i>/* keys in metrics.jsonl: a dense model "
                           "(or MoE statistics were not logged)")
    kind, mat, ylabels, cols, step = found
    fig, ax = plt.subplots(figsize=(_FIGSIZE[0], 1.5 + 0.35 * len(ylabels)))
    if kind == "load":
        im = ax.imshow(mat, aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, np.nanmax(mat)))
        ax.set_xlabel("expert")
        ax.set_title(f"Expert load / layer mean at step {step} (1.0 = balanced)")
        fig.colorbar(im, ax=ax, label="load / mean")
    else:
        im = ax.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
        ticks = np.linspace(0, len(cols) - 1, min(len(cols), 8)).astype(int)
        ax.set_xticks(ticks, [str(cols[t]) for t in ticks])
        ax.set_xlabel("step")
        ax.set_title("Expert imbalance per layer (max/mean tokens per expert)")
        fig.colorbar(im, ax=ax, label="max / mean")
    ax.set_yticks(range(len(ylabels)), ylabels)
    return _save(fig, path)


PLOTS: List[str] = ["loss", "throughput", "spend", "goodput", "attempts", "expert_load"]
