"""`python -m bench table`: our metric lines beside the peer's JSON, figures as PERFORMANCE.md states them."""

import json
import subprocess
import sys

import pytest

from bench.table import markdown, peer_figures, run_figures, side_by_side
from tests.train.runner import REPO


def _peer(batch=8, seq=2048, steps=(0.25, 0.26, 0.24)):
    return {"model": "llama_1b", "batch": batch, "seq": seq,
            "variants": {"peer_compiled": {"step_s_median": sorted(steps)[len(steps) // 2], "step_s_min": min(steps),
                                           "step_s_max": max(steps), "step_s_all": list(steps), "peak_mem_gib": 39.6}}}


def _rows(tok_by_step, mem=36.4):
    return [{"step": s, "loss": 3.0, "tok_s": t, "mfu": t / 150_000, "mem_gib": mem} for s, t in tok_by_step]


def test_peer_tok_s_is_tokens_per_median_step():
    p = peer_figures(_peer(), "peer_compiled")
    assert p["tok_s"] == pytest.approx(8 * 2048 / 0.25)
    assert p["tok_s_min"] == pytest.approx(8 * 2048 / 0.26) and p["tok_s_max"] == pytest.approx(8 * 2048 / 0.24)
    assert p["steps_timed"] == 3


def test_ours_is_the_median_from_the_step_on_and_the_ratio_divides_by_the_peer():
    # step 5 and 10 include compilation: they must not count
    rows = _rows([(5, 4_000), (10, 50_000), (15, 76_000), (20, 78_000), (25, 77_000), (30, 90_000)])
    r = run_figures(rows, 15, "m.jsonl")
    assert (r["tok_s"], r["tok_s_min"], r["tok_s_max"], r["lines"]) == (77_500, 76_000, 90_000, 4)
    table = side_by_side(peer_figures(_peer(), "peer_compiled"), [("bf16", r)])
    assert table["runs"]["bf16"]["ratio"] == pytest.approx(77_500 / (8 * 2048 / 0.25))
    text = markdown(table)
    assert "| bf16 | 77.5k (76.0-90.0k) |" in text and "1.183x" in text and "peer (peer_compiled, 3 timed steps) 65.5k" in text


def test_a_run_without_lines_past_the_step_names_the_file_and_the_fix():
    with pytest.raises(ValueError, match=r"m\.jsonl: no metric line with tok_s at step >= 60 \(last step logged: 50\); "
                                         r"lower --from-step"):
        run_figures(_rows([(45, 1.0), (50, 1.0)]), 60, "m.jsonl")


def test_an_unknown_peer_variant_lists_the_ones_there():
    with pytest.raises(ValueError, match=r"no variant 'peer_eager' \(it has \['peer_compiled'\]\)"):
        peer_figures(_peer(), "peer_eager")


def test_command_prints_the_table_and_writes_json(tmp_path):
    peer = tmp_path / "compare.json"
    peer.write_text(json.dumps(_peer()))
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in _rows([(10, 1.0), (15, 70_000), (20, 72_000)])) + "\n"
                 + json.dumps({"event": "resume", "step": 3}) + "\n")
    out = subprocess.run([sys.executable, "-m", "bench", "table", "--peer", str(peer), "--run", f"bf16={m}",
                          "--out", str(tmp_path), "--name", "t"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| bf16 | 71.0k (70.0-72.0k) |" in out.stdout
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["runs"]["bf16"]["lines"] == 2


def test_command_fails_with_exit_2_and_one_line_for_a_missing_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "table", "--peer", str(tmp_path / "none.json"),
                          "--run", "bf16=x.jsonl"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("bench table: ") and "none.json" in out.stderr and "Traceback" not in out.stderr
