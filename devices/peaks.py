"""Dense bf16 peak throughput per accelerator, the denominator of MFU.

Figures are the vendor's *dense* (no 2:4 sparsity) BF16 tensor peak per device, in TFLOP/s.
Datasheets often print the sparse figure with an asterisk; it is exactly 2x the dense one and is
never what a training step can reach. Measured matmul peaks are lower (FACTS.md: 788 of 989 on an
H100 SXM); MFU is by convention against the datasheet, so the numbers stay comparable with
published MFU figures.

CPU: ``peak_flops("cpu")`` returns 0.0, meaning "unknown", and MFU prints as ``n/a``. A CPU's
bf16 peak depends on the SKU, core count, AMX/AVX-512 and clocks, none of which torch exposes;
a nominal figure would print a number that looks like a measurement and is not one. Set
``cluster.peak_tflops_override`` when you know your CPU's figure.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import torch

# name -> (dense bf16 TFLOP/s per device, source)
# Sources checked on 2026-11-22 unless marked "unverified".
PEAK_BF16_TFLOPS: Dict[str, Tuple[float, str]] = {
    # NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 BF16 TFLOPS "with sparsity" -> /2 dense.
    "H100-SXM": (989.0, "NVIDIA H100 datasheet, 1979 sparse / 2"),
    "H100-PCIe": (756.0, "NVIDIA H100 datasheet, 1513 sparse / 2"),
    # H100 NVL (PCIe, 94 GB): datasheet 1,671 sparse -> 835.5 dense. Unverified here.
    "H100-NVL": (835.0, "NVIDIA H100 NVL datasheet, 1671 sparse / 2 (unverified)"),
    # H200 and GH200 use the same Hopper SM array and clocks as H100 SXM for tensor math.
    "H200": (989.0, "NVIDIA H200 datasheet, 1979 sparse / 2"),
    "GH200": (989.0, "NVIDIA GH200 datasheet, Hopper GPU 1979 sparse / 2"),
    # A100 datasheet: 312 BF16 dense (624 sparse), the same for 40 GB and 80 GB.
    "A100": (312.0, "NVIDIA A100 datasheet, 312 dense / 624 sparse"),
    # A10 datasheet: 125 BF16 dense (250 sparse). The A10G (AWS g5) is an A10 variant; NVIDIA
    # publishes no A10G datasheet and third parties quote ~70 TFLOP/s for it. Unverified.
    "A10G": (125.0, "NVIDIA A10 datasheet 250 sparse / 2; A10G clocks may be lower (unverified)"),
    "A10": (125.0, "NVIDIA A10 datasheet, 250 sparse / 2"),
    # L4 datasheet: 242 BF16 TFLOPS with sparsity -> 121 dense.
    "L4": (121.0, "NVIDIA L4 datasheet, 242 sparse / 2"),
    # L40S datasheet: 362.05 BF16 dense, 733 sparse.
    "L40S": (362.0, "NVIDIA L40S datasheet, 362 dense / 733 sparse"),
    # B200 (HGX B200, per GPU): 2.25 PFLOPS dense FP16/BF16, 4.5 sparse. Unverified here.
    "B200": (2250.0, "NVIDIA HGX B200 spec, 4.5 PF sparse / 2 per GPU (unverified)"),
    # AWS Neuron docs, "Trainium architecture": 2 x NeuronCore-v2 per chip delivering 190
    # FP16/BF16/cFP8/TF32 TFLOPS (the Trn1 instance table: 3,040 for 16 chips). Newer pages of the
    # Trainium2 comparison table print 191 for Trainium; we keep the chip page's 190.
    "Trainium1": (190.0, "AWS Neuron docs, Trainium architecture: 190 BF16 TFLOPS per chip (2 NeuronCore-v2)"),
    # AWS Neuron docs, "Trainium2 architecture" (checked 2026-11-22): 8 x NeuronCore-v3 per chip
    # that "collectively deliver 667 BF16/FP16/TF32 TFLOPS" dense (2,563 sparse); the earlier beta
    # page said 655. Trn2 instance table: 10.7 PFLOPS for 16 chips.
    "Trainium2": (667.0, "AWS Neuron docs, Trainium2 architecture: 667 dense BF16 TFLOPS per chip (8 NeuronCore-v3)"),
    "cpu": (0.0, "unknown: depends on SKU/cores/AMX; set cluster.peak_tflops_override"),
}

# Substrings of torch.cuda.get_device_name() -> table key, first match wins (order matters:
# "H100 NVL" and "H100 PCIe" before plain "H100", "A100" before "A10", "L40S" before "L4").
_NAME_PATTERNS: Tuple[Tuple[str, str], ...] = (
    ("GH200", "GH200"),
    ("H200", "H200"),
    ("H100 NVL", "H100-NVL"),
    ("H100 PCIE", "H100-PCIe"),
    ("H100", "H100-SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("B200", "B200"),
    ("A100", "A100"),
    ("A10G", "A10G"),
    ("A10", "A10"),
    ("L40S", "L40S"),
    ("L4", "L4"),
)

# Aliases accepted in cluster.accelerator (lower-cased lookup).
_ALIASES: Dict[str, str] = {
    "h100": "H100-SXM",
    "h100-sxm": "H100-SXM",
    "h100_sxm": "H100-SXM",
    "h100-pcie": "H100-PCIe",
    "h100_pcie": "H100-PCIe",
    "h100-nvl": "H100-NVL",
    "trn1": "Trainium1",
    "trainium": "Trainium1",
    "trn2": "Trainium2",
}


# Physical NeuronCores per Trainium chip (same AWS pages as the peaks above). A torch-neuronx process
# drives one logical NeuronCore: on Trainium2 that is NEURON_LOGICAL_NC_CONFIG physical cores (2 by
# default: a trn2.48xlarge shows 64 logical cores), on Trainium1 always one.
NEURONCORES_PER_CHIP: Dict[str, int] = {"Trainium1": 2, "Trainium2": 8}
DEFAULT_LNC: Dict[str, int] = {"Trainium1": 1, "Trainium2": 2}


def neuroncore_peak_flops(name: str, lnc: int | None = None) -> float:
    """Dense bf16 peak of one logical NeuronCore in FLOP/s (0.0 when ``name`` is not a Trainium):
    the chip's peak over its physical cores, times ``lnc`` (None: the generation's default)."""
    key = normalize_accelerator(name)
    if key not in NEURONCORES_PER_CHIP:
        return 0.0
    per_core = PEAK_BF16_TFLOPS[key][0] / NEURONCORES_PER_CHIP[key]
    return per_core * (lnc or DEFAULT_LNC[key]) * 1e12


def normalize_accelerator(name: str) -> str:
    """Maps a config or device name to a table key; unknown names come back unchanged."""
    if name in PEAK_BF16_TFLOPS:
        return name
    low = name.strip().lower()
    if low in _ALIASES:
        return _ALIASES[low]
    for key in PEAK_BF16_TFLOPS:
        if key.lower() == low:
            return key
    upper = name.upper()
    for pattern, key in _NAME_PATTERNS:
        if pattern in upper:
            return key
    return name


def detect_accelerator(device: Any = None) -> str:
    """Table key of the accelerator behind ``device`` ("cpu" for anything that is not CUDA).

    An unrecognised CUDA device returns its raw ``get_device_name`` string, for which
    ``peak_flops`` gives 0 (unknown) unless an override is set.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None:
        if not torch.cuda.is_available():
            return "cpu"
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        return dev.type  # xla (Trainium), mps, ...: name it in cluster.accelerator
    return normalize_accelerator(torch.cuda.get_device_name(dev))


def peak_flops(name: str, override_tflops: float = 0.0) -> float:
    """Dense bf16 peak of one device in FLOP/s; 0.0 means unknown (MFU is then reported n/a).

    ``override_tflops`` (``cluster.peak_tflops_override``), when > 0, wins over the table.
    """
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    key = normalize_accelerator(name)
    entry = PEAK_BF16_TFLOPS.get(key)
    return entry[0] * 1e12 if entry else 0.0


def resolve_peak(accelerator: str, peak_tflops_override: float = 0.0,
                 device: Any = None) -> Tuple[str, float]:
    """(accelerator name, dense bf16 peak FLOP/s per device) for a run, from the two
    ``cluster`` fields that matter (``cluster.accelerator``, ``cluster.peak_tflops_override``).

    ``cluster.accelerator: auto`` detects the device; a named accelerator wins (Trainium has no
    CUDA name to detect), but when a CUDA device says otherwise we warn: a p5 config run on an L4
    would otherwise report MFU against the wrong peak.
    """
    detected = detect_accelerator(device)
    if accelerator in ("", "auto"):
        name = detected
    else:
        name = normalize_accelerator(accelerator)
        if detected not in ("cpu", name) and detected in PEAK_BF16_TFLOPS:
            warnings.warn(
                f"cluster.accelerator={accelerator!r} but this process runs on "
                f"{detected!r}; MFU uses {name!r}. Set cluster=local or the matching cluster."
            )
    return name, peak_flops(name, peak_tflops_override)
