"""A committed checkpoint's model weights loaded into a model that may be sharded (FSDP2 / EP):
DCP reads each rank's shards only; the optimizer state is not touched. Used for a distillation
teacher given as one of our runs (``distill.teacher=RUN_OR_STEP_DIR``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from checkpointing import _dcp
from checkpointing.model_keys import model_prefix
from checkpointing.storage import Storage


def load_weights_into(model: torch.nn.Module, path: str, storage_options: Optional[Dict[str, Any]] = None,
                      step: Optional[int] = None) -> str:
    """Fill ``model``'s parameters and persistent buffers from the newest committed step under
    ``path`` (a run directory) or the step directory ``path``; returns the step directory. Every rank
    of the model's process group must call it."""
    from checkpointing.export import resolve_step_dir

    st = Storage(path, storage_options)
    step_dir = resolve_step_dir(path, st, step)
    md = _dcp.read_metadata(st.native(step_dir), st.is_local, st.storage_options)
    state = model.state_dict()
    prefix = model_prefix(step_dir, md, {k: t.shape for k, t in state.items()})
    nested: Dict[str, Any] = dict(state)
    for part in reversed([p for p in prefix.split(".") if p]):
        nested = {part: nested}
    _dcp.load(nested, _dcp.make_reader(st.native(step_dir), st.is_local, st.storage_options))
    return step_dir
