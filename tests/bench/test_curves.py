"""``python -m bench curves``: curves read from metrics.jsonl, each run of a model compared with the
first on their common steps over the last N steps, JSON and plot written."""

from __future__ import annotations

import json

import pytest

from bench.curves import compare, main


def write_run(path, losses, tok=1000.0):
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")  # not a metric row: skipped
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": 5 * (i + 1), "loss": loss, "tok_s": tok * (0.1 if i == 0 else 1), "mfu": 0.4})
                    + "\n")


def test_compare_window_and_relative_difference():
    ref = {5: 4.0, 10: 2.0, 15: 2.0, 20: 2.0}
    other = {5: 8.0, 10: 2.0, 15: 2.2, 20: 2.2, 25: 1.0}
    c = compare(ref, other, last=10)
    assert c["window"] == [15, 20] and c["points_in_window"] == 2  # steps > 20 - 10 of the common ones
    assert c["rel_diff_of_means"] == pytest.approx(0.1)
    assert c["max_abs_rel_in_window"] == pytest.approx(0.1)
    assert c["rel_by_step"][5] == pytest.approx(1.0)


def test_curves_suite_writes_json_and_plot(tmp_path, capsys):
    write_run(tmp_path / "a.jsonl", [5.0, 3.0, 2.0, 2.0])
    write_run(tmp_path / "b.jsonl", [5.0, 3.0, 2.02, 2.02], tok=1200.0)
    main(["--run", f"m/bf16={tmp_path / 'a.jsonl'}", "--run", f"m/fp8={tmp_path / 'b.jsonl'}",
          "--last", "10", "--out", str(tmp_path), "--name", "c"])
    s = json.loads((tmp_path / "c.json").read_text())
    run = s["models"]["m"]["runs"]["fp8"]
    assert run["steps"] == [5, 10, 15, 20] and run["tok_s_median"] == 1200.0  # the first (compile) row left out
    assert s["models"]["m"]["comparisons"]["fp8 vs bf16"]["rel_diff_of_means"] == pytest.approx(0.01)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "fp8 vs bf16: mean loss over steps 15-20" in capsys.readouterr().out


def test_a_bad_run_spec_names_the_format(tmp_path):
    with pytest.raises(SystemExit):
        main(["--run", "no-model-label", "--out", str(tmp_path)])
