"""Where a checkpoint keeps the model's tensors, checked against a model before anything is read:
the key prefix (the trainer's ``AppState`` nests the model under ``app.model.``), every tensor
present, every shape equal. Used by export (``load_model_weights``) and by loading weights into a
live model (``load_weights_into``, a distillation teacher)."""

from __future__ import annotations

from typing import Mapping, Tuple

from checkpointing.errors import CheckpointError

# State-dict prefixes the trainer / tests put the model under (AppState: {"app": {"model": ...}}).
MODEL_PREFIXES = ("app.model.", "model.", "")


def model_prefix(step_dir: str, md, shapes: Mapping[str, Tuple[int, ...]]) -> str:
    """The prefix under which DCP metadata ``md`` holds the tensors named in ``shapes`` (our FQN ->
    shape); raises a CheckpointError naming the first problem: no model, missing tensors (a config
    that is not the run's), or a shape that differs."""
    keys = md.state_dict_metadata
    probe = next(iter(shapes))
    prefix = next((p for p in MODEL_PREFIXES if p + probe in keys), None)
    if prefix is None:
        raise CheckpointError(f"{step_dir}: no model weights found (looked for "
                              f"{', '.join(repr(p + probe) for p in MODEL_PREFIXES)})")
    missing = [k for k in shapes if prefix + k not in keys]
    if missing:
        raise CheckpointError(f"{step_dir}: the checkpoint lacks {len(missing)} tensor(s) this model "
                              f"config has, e.g. {missing[:3]}: does the model config match the run's?")
    for k, shape in shapes.items():
        size = tuple(keys[prefix + k].size)
        if size != tuple(shape):
            raise CheckpointError(f"{step_dir}: {prefix + k} is {size} in the checkpoint but "
                                  f"{tuple(shape)} in the model config")
    return prefix
