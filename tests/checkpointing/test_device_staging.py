"""checkpoint.staging=device: the save returns after a snapshot; parameters changed right after the
call do not leak into the checkpoint, which commits and loads back the values at save time."""

import pytest
import torch

from checkpointing.config import CheckpointConfig
from checkpointing.errors import ConfigError
from checkpointing.manager import CheckpointManager, validate_checkpoint_config
from checkpointing.state import AppState


def _cfg(root, async_mode="thread", staging="device"):
    return CheckpointConfig(root=str(root), every_steps=1, keep_last=2, keep_every=0, resume="auto",
                            async_mode=async_mode, staging=staging, save_final=True, storage_options={},
                            on_save_error="stop", upload_root="")


def _model_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(3, 16)).sum().backward()
    opt.step()
    return m, opt


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_snapshot_isolates_the_checkpoint_from_later_updates(tmp_path, mode):
    m, opt = _model_opt()
    at_save = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = CheckpointManager(_cfg(tmp_path, async_mode=mode), str(tmp_path), "run")
    res = mgr.save(1, {"app": AppState(m, opt)}, {"tokens": 0}, trainer_state={"step": 1})
    assert res.mode == mode  # process: our own writer process (a single process has no group)
    with torch.no_grad():  # the next optimizer step, before the write has finished
        for p in m.parameters():
            p.add_(1000.0)
    mgr.wait()
    done = mgr.wait_committed()
    assert done is not None and done.committed and done.error is None
    mgr.close()
    m2, opt2 = _model_opt()
    with torch.no_grad():
        for p in m2.parameters():
            p.zero_()
    mgr2 = CheckpointManager(_cfg(tmp_path), str(tmp_path), "run")
    meta = mgr2.load_latest({"app": AppState(m2, opt2)})
    assert meta is not None and meta["trainer_state"]["step"] == 1
    for k, v in m2.state_dict().items():
        torch.testing.assert_close(v, at_save[k], msg=k)


def test_device_staging_needs_an_async_mode(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.staging=device .*checkpoint.async_mode=process"):
        validate_checkpoint_config(_cfg(tmp_path, async_mode="off"))


def test_unknown_staging_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.staging='gpu'"):
        validate_checkpoint_config(_cfg(tmp_path, staging="gpu"))
