"""Through the real trainer: ``python -m train`` with ``resume=auto`` on a run whose newest committed
step holds a crafted file (a DCP ``.metadata``; a DeepSpeed ``*.pt``) with an ``os.system``
payload. The payload never runs; the run exits 1 naming the file and the refused global, without
falling back to the older good step or starting fresh, and writes no new step."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tests.checkpointing.test_safe_pickle import SystemPayload, craft_metadata
from tests.train.runner import FAST, run_train

TINY = [*FAST, "trainer.eval_every=0", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]


def _steps(run_dir):
    return sorted(d for d in os.listdir(run_dir) if d.startswith("step_"))


def _assert_stopped(p, where: str, run_dir, marker) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert f"{where} references posix.system" in out, out[-3000:]
    assert "fresh start" not in out and "resumed from" not in out
    assert _steps(run_dir) == ["step_000000001", "step_000000002"]  # nothing new written
    assert not marker.exists()


def test_crafted_metadata_stops_the_run(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    common = [*TINY, f"output_dir={tmp_path}", "run_name=r"]
    run_train(*common, "trainer.max_steps=2", timeout=180)
    step2 = tmp_path / "r" / "step_000000002"
    craft_metadata(step2, SystemPayload(marker))
    p = run_train(*common, "trainer.max_steps=4", timeout=180, check=False)
    _assert_stopped(p, f"{step2}/.metadata", tmp_path / "r", marker)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")
def test_crafted_deepspeed_file_stops_the_run(tmp_path):
    """The crafted file keeps meta.json's listing consistent (an attacker who can write the file
    can write meta.json too), so it is the content check that refuses it, not the size check."""
    marker = tmp_path / "PAYLOAD_RAN"
    common = [*TINY, "parallel=deepspeed", f"output_dir={tmp_path}", "run_name=r"]
    run_train(*common, "trainer.max_steps=2", timeout=240)
    step2 = tmp_path / "r" / "step_000000002"
    target = step2 / "deepspeed" / "mp_rank_00_model_states.pt"
    real = torch.load(target, map_location="cpu", weights_only=False)  # our own fresh file
    torch.save({**real, "client_state": SystemPayload(marker)}, target)
    meta_path = step2 / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["engine"]["files"]["deepspeed/mp_rank_00_model_states.pt"] = os.path.getsize(target)
    meta_path.write_text(json.dumps(meta))
    p = run_train(*common, "trainer.max_steps=4", timeout=240, check=False)
    _assert_stopped(p, str(target), tmp_path / "r", marker)
