"""checkpointing/model_keys.py against real DCP checkpoints: the prefix found, and each way a
checkpoint can fail to hold a model's tensors named in the error."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpointing.errors import CheckpointError
from checkpointing.model_keys import model_prefix

MODEL = {"embed.weight": torch.zeros(8, 4), "layers.0.w.weight": torch.zeros(4, 4)}


def _metadata(tmp_path, state):
    dcp.save(state, checkpoint_id=str(tmp_path))
    return dcp.FileSystemReader(str(tmp_path)).read_metadata()


def _shapes(tensors):
    return {k: t.shape for k, t in tensors.items()}


@pytest.mark.parametrize("nest, prefix", [(lambda m: {"app": {"model": m}}, "app.model."),
                                          (lambda m: {"model": m}, "model."), (lambda m: m, "")])
def test_the_prefix_is_found_under_each_layout(tmp_path, nest, prefix):
    md = _metadata(tmp_path, nest(dict(MODEL)))
    assert model_prefix("d", md, _shapes(MODEL)) == prefix


def test_no_model_missing_tensors_and_other_shapes_are_named(tmp_path):
    md = _metadata(tmp_path / "a", {"app": {"optim": {"x": torch.zeros(2)}}})
    with pytest.raises(CheckpointError, match="no model weights found"):
        model_prefix("d", md, _shapes(MODEL))
    md = _metadata(tmp_path / "b", {"app": {"model": {"embed.weight": torch.zeros(8, 4)}}})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*layers.0.w.weight.*match the run's"):
        model_prefix("d", md, _shapes(MODEL))
    md = _metadata(tmp_path / "c", {"app": {"model": {**MODEL, "layers.0.w.weight": torch.zeros(4, 8)}}})
    with pytest.raises(CheckpointError, match=r"app.model.layers.0.w.weight is \(4, 8\) in the checkpoint but \(4, 4\)"):
        model_prefix("d", md, _shapes(MODEL))
