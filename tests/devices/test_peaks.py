"""devices/peaks.py: the peak table, name detection and the CPU rule (0 = unknown)."""

import pytest
import torch

from devices.peaks import PEAK_BF16_TFLOPS, detect_accelerator, normalize_accelerator, peak_flops


@pytest.mark.parametrize(
    "cuda_name, key, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM", 989),
        ("NVIDIA H100 PCIe", "H100-PCIe", 756),
        ("NVIDIA H100 NVL", "H100-NVL", 835),
        ("NVIDIA H200", "H200", 989),
        ("NVIDIA GH200 480GB", "GH200", 989),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA A10G", "A10G", 125),
        ("NVIDIA L4", "L4", 121),
        ("NVIDIA L40S", "L40S", 362),
        ("NVIDIA B200", "B200", 2250),
    ],
)
def test_device_names_map_to_table(cuda_name, key, tflops):
    assert normalize_accelerator(cuda_name) == key
    assert peak_flops(cuda_name) == pytest.approx(tflops * 1e12)


def test_aliases_and_trainium():
    assert peak_flops("trn1") == pytest.approx(190e12)
    assert peak_flops("Trainium2") == pytest.approx(667e12)
    assert peak_flops("h100") == pytest.approx(989e12)


def test_every_entry_has_a_source():
    for name, (tflops, source) in PEAK_BF16_TFLOPS.items():
        assert tflops >= 0 and source, name


def test_cpu_is_unknown_unless_overridden():
    assert detect_accelerator("cpu") == "cpu"
    assert detect_accelerator(torch.device("cpu")) == "cpu"
    assert peak_flops("cpu") == 0.0
    assert peak_flops("cpu", override_tflops=2.5) == pytest.approx(2.5e12)
    assert peak_flops("some future chip") == 0.0


def test_override_wins_over_table():
    assert peak_flops("H100-SXM", override_tflops=800) == pytest.approx(800e12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detect_real_gpu():
    name = detect_accelerator("cuda")
    assert peak_flops(name) > 0, f"{torch.cuda.get_device_name()} is missing from the table"


def test_resolve_peak_from_cluster_config():
    from cost.config import ClusterConfig
    from devices.peaks import resolve_peak

    def fields(c):  # resolve_peak takes the two cluster fields it reads
        return c.accelerator, c.peak_tflops_override

    assert resolve_peak(*fields(ClusterConfig()), "cpu") == ("cpu", 0.0)
    assert resolve_peak(*fields(ClusterConfig(accelerator="Trainium2")), "cpu") == ("Trainium2", 667e12)
    name, peak = resolve_peak(*fields(ClusterConfig(accelerator="auto", peak_tflops_override=1.0)), "cpu")
    assert (name, peak) == ("cpu", 1e12)
