"""W&B offline: logged values and the run id read back from the .wandb file; resume keeps the id."""

import glob
import io
import os

import pytest

pytest.importorskip("wandb", reason="wandb not installed (pip install 'moeforge[test]')")

from train.config import LoggingConfig  # noqa: E402
from train.metrics import MetricsLogger, wandb_mode  # noqa: E402

from tests.train import wandb_reader  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    return tmp_path


def _wandb_files(run_dir, run_id):
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", f"run-{run_id}.wandb")))


def test_mode_rules():
    assert wandb_mode(LoggingConfig(), {}) == "offline"
    assert wandb_mode(LoggingConfig(), {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode(LoggingConfig(), {"WANDB_BASE_URL": "http://wandb.local"}) == "online"
    assert wandb_mode(LoggingConfig(), {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(LoggingConfig(wandb_mode="disabled"), {"WANDB_API_KEY": "k"}) == "disabled"
    with pytest.raises(ValueError, match="logging.wandb_mode"):
        wandb_mode(LoggingConfig(wandb_mode="cloud"), {})


def test_offline_values_read_back_and_resume_keeps_id(offline):
    run_dir = str(offline / "run")
    cfg = LoggingConfig(wandb=True, jsonl=False, progress="off")
    config = {"run_name": "wb", "checkpoint": {"storage_options": {"secret": "hunter2"}}}
    lg = MetricsLogger(run_dir, 0, cfg, config, stream=io.StringIO())
    run_id = lg.wandb_run_id
    assert run_id
    for step, loss in [(10, 4.5), (20, 4.0)]:
        lg.log(step, {"loss": loss, "lr": 3e-4, "tok_s": 1000.0, "mfu": None,
                      "moe/L1/imbalance": 1.5})
    lg.close()

    (path,) = _wandb_files(run_dir, run_id)
    wandb_reader.wait_until_complete(path)
    run = wandb_reader.read_run(path)
    assert run.run_id == run_id
    config_items = {u.key: u.value_json for u in run.config.update}
    assert "hunter2" not in str(config_items) and "<redacted>" in config_items["checkpoint"]
    rows = wandb_reader.read_history(path)
    assert [r["step"] for r in rows] == [10, 20]
    assert [r["loss"] for r in rows] == [4.5, 4.0]
    assert rows[0]["moe/L1/imbalance"] == 1.5 and rows[0]["lr"] == pytest.approx(3e-4)
    assert "mfu" not in rows[0]  # unknown values are not logged as 0

    # second attempt, resumed from a checkpoint at step 10: same id, step 20 logged again
    lg = MetricsLogger(run_dir, 0, cfg, config, resume_wandb_id=run_id, stream=io.StringIO())
    assert lg.wandb_run_id == run_id
    lg.log(20, {"loss": 3.9, "lr": 3e-4})
    lg.close()
    files = _wandb_files(run_dir, run_id)
    assert len(files) == 2
    later = [p for p in files if p != path][0]
    wandb_reader.wait_until_complete(later)
    rows = wandb_reader.read_history(later)
    assert [(r["step"], r["loss"]) for r in rows] == [(20, 3.9)]


def test_missing_wandb_gives_a_clear_error(offline, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="logging.wandb=true but wandb is not installed"):
        MetricsLogger(str(offline / "x"), 0, LoggingConfig(wandb=True), stream=io.StringIO())
