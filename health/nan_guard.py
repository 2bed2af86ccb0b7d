"""Non-finite guard (pure policy): skip a step whose loss or grad norm is NaN/Inf, a bounded number
of times in a row; then roll back to the last committed checkpoint, or stop. And never checkpoint a
non-finite state.

Verdicts of ``check``:
    ok        finite: apply the optimizer step
    skip      non-finite: zero the grads and do not step (the data cursor still advances)
    rollback  more than ``max_skips`` consecutive non-finite steps: reload the last committed checkpoint
    stop      same, with on_exhausted="stop", or once ``max_rollbacks`` rollbacks of this process
              have not cured it: save nothing, exit 1 (a divergence that survives rollbacks needs
              a person, not an endless reload loop)
All ranks must agree (the grad norm is global after clipping; the loss should be all-reduced, or
the verdict combined with an all-reduce MAX before acting).
"""

from __future__ import annotations

import math

VERDICTS = ("ok", "skip", "rollback", "stop")


def _finite(x) -> bool:
    if x is None:
        return True
    if hasattr(x, "detach"):
        import torch

        return bool(torch.isfinite(x.detach()).all().item())
    return math.isfinite(float(x))


class NonFiniteGuard:
    def __init__(self, max_skips: int = 3, on_exhausted: str = "rollback", max_rollbacks: int = 3):
        if on_exhausted not in ("rollback", "stop"):
            raise ValueError(f"health.nan_on_exhausted={on_exhausted!r} must be 'rollback' or 'stop'")
        if max_skips < 0:
            raise ValueError(f"health.nan_max_skips={max_skips} must be >= 0")
        if max_rollbacks < 0:
            raise ValueError(f"health.nan_max_rollbacks={max_rollbacks} must be >= 0")
        self.max_skips = max_skips
        self.on_exhausted = on_exhausted
        self.max_rollbacks = max_rollbacks
        # Rollbacks by this process. Not in state_dict: a rollback reloads the guard's state from
        # the checkpoint, and this count must survive that.
        self.rollbacks = 0
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss, grad_norm=None) -> str:
        if _finite(loss) and _finite(grad_norm):
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        if self.consecutive <= self.max_skips:
            self.total_skipped += 1
            return "skip"
        if self.on_exhausted == "rollback":
            if self.rollbacks >= self.max_rollbacks:
                return "stop"
            self.rollbacks += 1
        return self.on_exhausted

    def reset(self) -> None:
        """After a rollback: count afresh."""
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, d: dict) -> None:
        self.consecutive = int(d.get("consecutive", 0))
        self.total_skipped = int(d.get("total_skipped", 0))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this rank's shard


def first_non_finite(model, optimizer=None) -> str | None:
    """Name of the first parameter or optimizer-state tensor (this rank's shard) that holds NaN/Inf.

    One host sync per device, not one per tensor: this runs in the step that takes a checkpoint,
    and hundreds of syncs would be most of that step's checkpoint cost."""
    import torch

    names, checks = {}, {}  # device -> [(label, 0-d bool tensor)]

    def add(label, t):
        if t.is_floating_point():
            checks.setdefault(t.device, []).append((label, torch.isfinite(t).all()))

    for name, p in model.named_parameters():
        names[id(p)] = name
        add(f"parameter {name}", _local(p.detach()))
    if optimizer is not None:
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    add(f"optimizer state {k} of {names.get(id(p), '?')}", _local(v.detach()))
    for found in checks.values():
        if not bool(torch.stack([ok for _, ok in found]).all()):
            return next(label for label, ok in found if not bool(ok))
    return None


def state_is_finite(model, optimizer=None) -> bool:
    """True when every local parameter and optimizer-state tensor is finite. Checks this rank's
    shards only: combine across ranks (all-reduce MAX of 'bad') before deciding to save."""
    return first_non_finite(model, optimizer) is None
