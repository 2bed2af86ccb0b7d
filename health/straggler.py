"""Straggler detection from per-rank step times (pure), plus the one collective that gathers them.

Score of a rank in a window = its median step time / the median of all ranks' medians. A rank is
named only when it is consistently slow: score > ``threshold`` in at least ``k`` of the last ``m``
windows. One slow window (a checkpoint, a GC pause) names nobody.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


def straggler_scores(times_per_rank: list[list[float]]) -> list[float]:
    medians = [statistics.median(t) if t else float("nan") for t in times_per_rank]
    finite = [m for m in medians if m == m]
    ref = statistics.median(finite) if finite else float("nan")
    if not finite or ref <= 0:
        return [1.0 for _ in medians]
    return [m / ref if m == m else float("nan") for m in medians]


@dataclass
class Straggler:
    rank: int
    host: str
    score: float  # this window's score
    windows_slow: int  # windows out of the last m in which it was over the threshold
    windows: int

    def message(self) -> str:
        return (f"straggler: rank {self.rank} on {self.host} is {self.score:.2f}x the median step time "
                f"(slow in {self.windows_slow} of the last {self.windows} windows)")


class StragglerDetector:
    def __init__(self, threshold: float = 1.2, k: int = 3, m: int = 5, hosts: list[str] | None = None):
        if not 1 <= k <= m:
            raise ValueError(f"straggler k={k} must be in [1, m={m}]")
        self.threshold, self.k, self.m = threshold, k, m
        self.hosts = hosts
        self._history: deque[list[bool]] = deque(maxlen=m)
        self.last_scores: list[float] = []

    def update(self, times_per_rank: list[list[float]]) -> Straggler | None:
        """Feed one window (rank -> that rank's step times); returns the slowest consistent straggler."""
        scores = straggler_scores(times_per_rank)
        self.last_scores = scores
        self._history.append([s > self.threshold for s in scores])
        best = None
        for r, s in enumerate(scores):
            slow = sum(1 for w in self._history if r < len(w) and w[r])
            if slow >= self.k and (best is None or s > best.score):
                host = self.hosts[r] if self.hosts and r < len(self.hosts) else "?"
                best = Straggler(r, host, s, slow, len(self._history))
        return best


def gather_step_times(times: list[float], group=None) -> list[list[float]]:
    """all_gather this rank's last N step times (N equal on every rank) -> [rank][i]. One small
    float64 tensor per rank on the given group (use the gloo control group: host tensors)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [list(times)]
    t = torch.tensor(list(times), dtype=torch.float64)
    n = torch.tensor([t.numel()], dtype=torch.int64)
    world = dist.get_world_size(group)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    width = int(max(s.item() for s in sizes))
    padded = torch.full((width,), float("nan"), dtype=torch.float64)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [[v for v in o.tolist() if v == v] for o in out]


def gather_hosts(group=None) -> list[str]:
    """Every rank's hostname, indexed by rank (once at start-up)."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [socket.gethostname()]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, socket.gethostname(), group=group)
    return out
