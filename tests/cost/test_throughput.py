"""cost/throughput.py: tokens/s, MFU and ETA by hand, and their fields on a metric line."""

import pytest

from cost.throughput import ThroughputWindow, eta_s, mfu, throughput
from train.metrics import format_metric_line, parse_metric_line


def test_throughput_math():
    # 8 devices, 80k tokens in 2 s -> 40k tok/s, 5k per device; 6e9 FLOPs/token on a 1e15 peak
    r = throughput(80_000, 2.0, 8, 6e9, 1e15)
    assert r == {"tok_s": 40_000, "tok_s_gpu": 5_000, "mfu": pytest.approx(0.03)}
    # the trainer's call: peak from the device table, ETA from the mean step time of the window
    r = throughput(tokens=80_000, seconds=2.0, n_devices=8, flops_per_token=6e9, device="cpu",
                   peak_override_tflops=0.0, remaining_steps=30, seconds_per_step=0.5)
    assert r["mfu"] is None and r["eta_s"] == 15.0
    r = throughput(tokens=80_000, seconds=2.0, n_devices=8, flops_per_token=6e9, device="cpu",
                   peak_override_tflops=1000.0)
    assert r["mfu"] == pytest.approx(0.03) and "eta_s" not in r
    assert mfu(5_000, 6e9, 0.0) is None
    assert eta_s(10, [1.0, 1.0, 9.0]) == 10.0 and eta_s(0, []) == 0.0 and eta_s(5, []) is None
    w = ThroughputWindow(n_devices=2, flops_per_token=1e9, peak_flops=1e12, window=2)
    for tokens, sec in [(100, 100.0), (1000, 1.0), (1000, 1.0)]:
        w.update(tokens, sec)
    assert w.rates()["tok_s"] == 1000 and w.rates()["mfu"] == pytest.approx(0.5)
    assert w.eta_s(3) == 3.0
    # the whole chain feeds a valid line
    line = format_metric_line({"step": 1, "loss": 2.0, "lr": 1e-3, **r, "mem_gib": 1.0})
    assert parse_metric_line(line)["tok_s_gpu"] == 5000
