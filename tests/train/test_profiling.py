"""trainer.profile_start/profile_steps: the user command profiles a window of its own steps."""

from __future__ import annotations

import gzip
import json

from tests.train.runner import FAST, run_train


def test_user_command_profiles_the_requested_steps(tmp_path):
    p = run_train(*FAST, "trainer.max_steps=6", "trainer.eval_every=0", "trainer.profile_start=3",
                  "trainer.profile_steps=2", f"output_dir={tmp_path}", "run_name=prof", "checkpoint.save_final=false")
    out = tmp_path / "prof" / "profile"
    top = (out / "top_ops_rank0.txt").read_text()
    assert top.startswith("steps 3-4: ")  # exactly the window asked for
    assert "ms/step" in top and "name (CPU self time)" in top
    rows = top.splitlines()[2:]
    assert len(rows) >= 5 and any("aten::" in r for r in rows)
    with gzip.open(out / "trace_rank0.json.gz", "rt") as f:
        trace = json.load(f)
    assert trace["traceEvents"]  # a chrome trace Perfetto opens
    assert "profile: steps 3-4" in p.stderr + p.stdout


def test_a_run_ending_inside_the_window_still_writes_it(tmp_path):
    run_train(*FAST, "trainer.max_steps=3", "trainer.eval_every=0", "trainer.profile_start=2",
              "trainer.profile_steps=5", f"output_dir={tmp_path}", "run_name=short", "checkpoint.save_final=false")
    top = (tmp_path / "short" / "profile" / "top_ops_rank0.txt").read_text()
    assert top.startswith("steps 2-3: ")


def test_profile_keys_do_not_rename_the_run(tmp_path):
    """Profiling a run is how you look at it, not what it trains: same derived run name."""
    from omegaconf import OmegaConf

    from train.config import TrainConfig
    from train.run_dir import run_name

    base = OmegaConf.structured(TrainConfig)
    prof = OmegaConf.merge(base, {"trainer": {"profile_start": 5, "profile_steps": 2}})
    assert run_name(OmegaConf.to_object(base)) == run_name(OmegaConf.to_object(prof))
