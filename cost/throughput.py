"""Tokens/s, MFU and ETA from step times: arithmetic on numbers the trainer measured.

MFU = (tokens/s per device x model FLOPs per token) / device dense bf16 peak. ``flops_per_token``
is the model's own training count (forward + backward, active parameters for MoE, attention with
its real window) from ``model.flops.flops_per_token``; a peak of 0 means the device is unknown and
MFU is ``None`` (printed ``n/a``), never a made-up number.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Deque, Dict, Iterable, Optional


def tokens_per_s(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def mfu(tok_s_per_device: float, flops_per_token: float, peak_flops: float) -> Optional[float]:
    """Model FLOPs utilisation as a fraction (0.41 = 41%); None when the peak is unknown."""
    if peak_flops <= 0 or flops_per_token <= 0:
        return None
    return tok_s_per_device * flops_per_token / peak_flops


def eta_s(remaining_steps: int, step_times_s: Iterable[float]) -> Optional[float]:
    """Seconds left, from the median recent step time (robust to a slow checkpoint step)."""
    times = list(step_times_s)
    if remaining_steps <= 0:
        return 0.0
    if not times:
        return None
    return remaining_steps * statistics.median(times)


def throughput(
    tokens: float,
    seconds: float,
    n_devices: int,
    flops_per_token: float,
    peak_flops: Optional[float] = None,
    *,
    device: Any = None,
    peak_override_tflops: float = 0.0,
    remaining_steps: Optional[int] = None,
    seconds_per_step: Optional[float] = None,
) -> Dict[str, Optional[float]]:
    """Metric-line fields for ``tokens`` trained in ``seconds`` on ``n_devices``.

    Returns ``tok_s``, ``tok_s_gpu``, ``mfu`` (fraction or None) and, when ``remaining_steps`` and
    ``seconds_per_step`` are given, ``eta_s``. The peak is ``peak_flops`` (FLOP/s per device) if
    given, else looked up for ``device`` (``peak_override_tflops`` > 0 wins over the table).
    """
    if peak_flops is None:
        from devices.peaks import detect_accelerator, peak_flops as table_peak

        peak_flops = table_peak(detect_accelerator(device), peak_override_tflops)
    tok_s = tokens_per_s(tokens, seconds)
    per_dev = tok_s / max(1, n_devices)
    out: Dict[str, Optional[float]] = {
        "tok_s": tok_s,
        "tok_s_gpu": per_dev,
        "mfu": mfu(per_dev, flops_per_token, peak_flops),
    }
    if remaining_steps is not None and seconds_per_step is not None:
        out["eta_s"] = max(0, remaining_steps) * seconds_per_step
    return out


class ThroughputWindow:
    """Rolling window of (tokens, seconds) per step, for a trainer that times every step.

    Rates are over the window (tokens summed / seconds summed), so a log line reports the recent
    rate rather than a cumulative mean dragged down by warm-up and compile steps.
    """

    def __init__(self, n_devices: int, flops_per_token: float, peak_flops: float, window: int = 20):
        self.n_devices = max(1, int(n_devices))
        self.flops_per_token = float(flops_per_token)
        self.peak_flops = float(peak_flops)
        self._tokens: Deque[float] = deque(maxlen=window)
        self._seconds: Deque[float] = deque(maxlen=window)

    def update(self, tokens: float, seconds: float) -> None:
        self._tokens.append(float(tokens))
        self._seconds.append(float(seconds))

    def rates(self) -> Dict[str, Optional[float]]:
        return throughput(
            sum(self._tokens), sum(self._seconds), self.n_devices, self.flops_per_token,
            self.peak_flops,
        )

    def eta_s(self, remaining_steps: int) -> Optional[float]:
        return eta_s(remaining_steps, self._seconds)
