"""A committed checkpoint's model weights loaded into a model that may be sharded (FSDP2 / EP):
DCP reads each rank's shards only; the optimizer state is not touched. Used for a distillation
teacher given as one of our runs (``distill.teacher=RUN_OR_STEP_DIR``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from checkpointing import _dcp
from checkpointing.errors import CheckpointError
from checkpointing.storage import Storage

# State-dict prefixes the trainer / tests put the model under (AppState: {"app": {"model": ...}}).
MODEL_PREFIXES = ("app.model.", "model.", "")


def load_weights_into(model: torch.nn.Module, path: str, storage_options: Optional[Dict[str, Any]] = None,
                      step: Optional[int] = None) -> str:
    """Fill ``model``'s parameters and persistent buffers from the newest committed step under
    ``path`` (a run directory) or the step directory ``path``; returns the step directory. Every rank
    of the model's process group must call it."""
    from checkpointing.export import resolve_step_dir

    st = Storage(path, storage_options)
    step_dir = resolve_step_dir(path, st, step)
    md = _dcp.read_metadata(st.native(step_dir), st.is_local, st.storage_options)
    keys = set(md.state_dict_metadata)
    state = model.state_dict()
    probe = next(iter(state))
    prefix = next((p for p in MODEL_PREFIXES if p + probe in keys), None)
    if prefix is None:
        raise CheckpointError(f"{step_dir}: no model weights found (looked for "
                              f"{', '.join(repr(p + probe) for p in MODEL_PREFIXES)})")
    missing = [k for k in state if prefix + k not in keys]
    if missing:
        raise CheckpointError(f"{step_dir}: the checkpoint lacks {len(missing)} tensor(s) of this model, "
                              f"e.g. {missing[:3]}: does the model config match the run's?")
    for k, t in state.items():
        size = tuple(md.state_dict_metadata[prefix + k].size)
        if size != tuple(t.shape):
            raise CheckpointError(f"{step_dir}: {prefix + k} is {size} in the checkpoint, {tuple(t.shape)} here")
    nested: Dict[str, Any] = dict(state)
    for part in reversed([p for p in prefix.split(".") if p]):
        nested = {part: nested}
    _dcp.load(nested, _dcp.make_reader(st.native(step_dir), st.is_local, st.storage_options))
    return step_dir
