"""Side-by-side table: our user-command runs (their ``metrics.jsonl``) against the peer measured
in the same GPU call (``python -m bench compare``'s JSON), as docs/PERFORMANCE.md reports them.

    python -m bench table --peer DIR/compare_llama_1b_s2048.json --run bf16=A/metrics.jsonl \\
        --run fp8=B/metrics.jsonl [--from-step 15] [--variant peer_compiled] [--out DIR --name NAME]

Ours = the median (and range) of the metric line's ``tok_s`` over the logged steps at or after
``--from-step`` (the earlier lines include compilation); MFU is the median of the same lines; GiB
is the last line's ``mem_gib``. The peer = tokens per step / its median step time. Prints a
markdown table; with ``--out``, also writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Dict, List, Tuple

from bench.curves import read_metrics


def peer_figures(compare: Dict[str, Any], variant: str) -> Dict[str, Any]:
    """tok/s of one variant of a ``bench compare`` JSON, with the shape it ran."""
    variants = compare.get("variants", {})
    if variant not in variants:
        raise ValueError(f"the peer JSON has no variant {variant!r} (it has {sorted(variants)}): "
                         f"pass --variant with one of those")
    v = variants[variant]
    tokens = compare["batch"] * compare["seq"]
    return {"variant": variant, "model": compare["model"], "batch": compare["batch"], "seq": compare["seq"],
            "tok_s": tokens / v["step_s_median"], "tok_s_min": tokens / v["step_s_max"],
            "tok_s_max": tokens / v["step_s_min"], "steps_timed": len(v.get("step_s_all", [])),
            "peak_mem_gib": v.get("peak_mem_gib")}


def run_figures(rows: List[Dict[str, Any]], from_step: int, path: str) -> Dict[str, Any]:
    """Median tok/s (with range), median MFU and the last memory figure of one run's metric lines."""
    used = [r for r in rows if r["step"] >= from_step and "tok_s" in r]
    if not used:
        last = rows[-1]["step"] if rows else None
        raise ValueError(f"{path}: no metric line with tok_s at step >= {from_step} (last step logged: {last}); "
                         f"lower --from-step or run more steps")
    tok = [r["tok_s"] for r in used]
    return {"path": path, "lines": len(used), "first_step": used[0]["step"], "last_step": used[-1]["step"],
            "tok_s": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
            "mfu": statistics.median(r.get("mfu", 0.0) for r in used), "mem_gib": used[-1].get("mem_gib")}


def side_by_side(peer: Dict[str, Any], runs: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    return {"peer": peer, "runs": {label: dict(fig, ratio=fig["tok_s"] / peer["tok_s"]) for label, fig in runs}}


def markdown(table: Dict[str, Any]) -> str:
    p = table["peer"]
    lines = [f"{p['model']} b{p['batch']} x {p['seq']}: peer ({p['variant']}, {p['steps_timed']} timed steps) "
             f"{p['tok_s'] / 1e3:.1f}k tok/s ({p['tok_s_min'] / 1e3:.1f}-{p['tok_s_max'] / 1e3:.1f}k)",
             "| ours | tok/s (range) | MFU | GiB | ours / peer |", "|---|---|---|---|---|"]
    for label, r in table["runs"].items():
        mem = f"{r['mem_gib']:.1f}" if r["mem_gib"] is not None else "-"
        lines.append(f"| {label} | {r['tok_s'] / 1e3:.1f}k ({r['tok_s_min'] / 1e3:.1f}-{r['tok_s_max'] / 1e3:.1f}k) "
                     f"| {100 * r['mfu']:.1f}% | {mem} | {r['ratio']:.3f}x |")
    return "\n".join(lines)


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench table")
    ap.add_argument("--peer", required=True, help="a `python -m bench compare` JSON from the same GPU call")
    ap.add_argument("--run", action="append", required=True, help="label=path/to/metrics.jsonl")
    ap.add_argument("--from-step", type=int, default=15, help="median over the metric lines from this step on")
    ap.add_argument("--variant", default="peer_compiled", help="which variant of the peer JSON")
    ap.add_argument("--out", default="", help="also write <name>.json here")
    ap.add_argument("--name", default="side_by_side")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"--run {spec!r}: expected label=path/to/metrics.jsonl")
        runs.append((label, path))
    return args, runs


def main(argv=None) -> None:
    args, specs = _args(argv)
    try:
        with open(args.peer) as f:
            peer = peer_figures(json.load(f), args.variant)
        table = side_by_side(peer, [(label, run_figures(read_metrics(path), args.from_step, path))
                                    for label, path in specs])
    except (OSError, ValueError, KeyError) as e:
        print(f"bench table: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown(table))
    if args.out:
        from bench.common import write_json

        print(f"wrote {write_json(args.out, args.name, table)}")


if __name__ == "__main__":
    main()
