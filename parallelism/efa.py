"""EFA (AWS Elastic Fabric Adapter) detection, the NCCL/libfabric settings we recommend with it,
and a versions report for the run log.

Only when an EFA device is present, and only for variables the user has not set, does
:func:`apply_efa_env` set:

==================================  ============================================================
FI_PROVIDER=efa                     make libfabric (aws-ofi-nccl) use EFA; otherwise it may pick
                                    the tcp/sockets provider silently and run many times slower
FI_EFA_USE_DEVICE_RDMA=1            GPUDirect RDMA on p4d/p5; only libfabric < 1.18 needs it
                                    (newer ones enable it by themselves), so it is set only when
                                    ``fi_info --version`` says older
FI_EFA_SET_CUDA_SYNC_MEMOPS=0       skip per-registration CU_POINTER_ATTRIBUTE_SYNC_MEMOPS: NCCL
                                    already orders its copies; AWS's samples set it
NCCL_SOCKET_IFNAME=^docker,lo,veth  NCCL's bootstrap/out-of-band traffic on a real interface, not
                                    a container bridge or loopback
TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed or timed-out collective aborts the communicator and
                                    the process exits, so the job is restarted instead of hanging
TORCH_NCCL_DUMP_ON_TIMEOUT=1        on a timeout, dump the flight recorder (the last collectives
TORCH_NCCL_TRACE_BUFFER_SIZE=20000  of each rank) to find the rank that diverged
==================================  ============================================================

Not set (documented in docs/distributed.md): FI_EFA_USE_HUGE_PAGE=0 (only when fork() fails with
huge pages, e.g. DataLoader workers), PYTORCH_CUDA_ALLOC_CONF (a memory choice, not a network one).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Callable, Dict, List, Optional, Tuple

from devices.env import EnvSetting  # the record of a setting, shared with devices/neuron_env.py

__all__ = ["EnvSetting", "detect_efa", "libfabric_version", "recommended_efa_env", "apply_efa_env",
           "versions_report"]


def _run(cmd: List[str], timeout: float = 5.0) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def detect_efa(sysfs_root: str = "/sys", fi_info: Optional[Callable[[], Optional[str]]] = None) -> List[str]:
    """Names of EFA devices: ``<sysfs>/class/infiniband/*`` whose driver is ``efa`` (or whose name
    starts with ``efa``); else, when ``fi_info`` is installed, the efa provider's domains.
    Empty list: no EFA."""
    found = []
    for dev in sorted(glob.glob(os.path.join(sysfs_root, "class", "infiniband", "*"))):
        name = os.path.basename(dev)
        driver = os.path.join(dev, "device", "driver")
        drv = os.path.basename(os.path.realpath(driver)) if os.path.exists(driver) else ""
        if drv == "efa" or name.startswith("efa"):
            found.append(name)
    if found:
        return found
    out = (fi_info or (lambda: _run(["fi_info", "-p", "efa"])))()
    if out and "provider: efa" in out:
        return sorted(set(re.findall(r"domain:\s*(\S+)", out))) or ["efa"]
    return []


def libfabric_version(fi_info_version: Optional[Callable[[], Optional[str]]] = None) -> Optional[Tuple[int, int]]:
    out = (fi_info_version or (lambda: _run(["fi_info", "--version"])))()
    m = re.search(r"libfabric:\s*(\d+)\.(\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def recommended_efa_env(libfabric: Optional[Tuple[int, int]]) -> List[EnvSetting]:
    s = [EnvSetting("FI_PROVIDER", "efa", "use the EFA provider, never a silent tcp/sockets fallback")]
    if libfabric is not None and libfabric < (1, 18):
        s.append(EnvSetting("FI_EFA_USE_DEVICE_RDMA", "1",
                            f"GPUDirect RDMA; libfabric {libfabric[0]}.{libfabric[1]} < 1.18 does not "
                            "enable it by itself"))
    s += [
        EnvSetting("FI_EFA_SET_CUDA_SYNC_MEMOPS", "0", "NCCL orders its own copies; avoid sync memops"),
        EnvSetting("NCCL_SOCKET_IFNAME", "^docker,lo,veth", "bootstrap traffic on a real interface"),
        EnvSetting("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1",
                   "abort on a failed/timed-out collective so the job restarts instead of hanging"),
        EnvSetting("TORCH_NCCL_DUMP_ON_TIMEOUT", "1", "flight-recorder dump on a collective timeout"),
        EnvSetting("TORCH_NCCL_TRACE_BUFFER_SIZE", "20000", "collectives kept by the flight recorder"),
    ]
    return s


def apply_efa_env(environ: Optional[Dict[str, str]] = None, sysfs_root: str = "/sys",
                  fi_info: Optional[Callable[[], Optional[str]]] = None,
                  fi_info_version: Optional[Callable[[], Optional[str]]] = None) -> dict:
    """Detect EFA and set the recommended variables the user has not set. Call it before
    ``init_process_group`` (NCCL reads them when the communicator is created).

    Returns ``{"efa_devices": [...], "set": [EnvSetting], "kept": {key: user value},
    "libfabric": (major, minor) | None}``; nothing is set when no EFA device is found.
    """
    env = os.environ if environ is None else environ
    devices = detect_efa(sysfs_root, fi_info)
    report = {"efa_devices": devices, "set": [], "kept": {}, "libfabric": None}
    if not devices:
        return report
    report["libfabric"] = version = libfabric_version(fi_info_version)
    for s in recommended_efa_env(version):
        if s.key in env:
            report["kept"][s.key] = env[s.key]
        else:
            env[s.key] = s.value
            report["set"].append(s)
    return report


def _ofi_nccl() -> Optional[str]:
    for pattern in ("/opt/amazon/ofi-nccl/lib*/libnccl-net*.so*", "/opt/aws-ofi-nccl/lib*/libnccl-net*.so*",
                    "/usr/local/lib/libnccl-net*.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def versions_report() -> Dict[str, Optional[str]]:
    """torch, CUDA runtime, NCCL, CUDA driver, libfabric and aws-ofi-nccl (None where absent)."""
    import torch

    rep: Dict[str, Optional[str]] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                                     "nccl": None, "cuda_driver": None}
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            rep["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # NCCL not compiled in: the report says None
            pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
            rep["cuda_driver"] = m.group(1) if m else None
    except OSError:
        pass
    lf = libfabric_version()
    rep["libfabric"] = f"{lf[0]}.{lf[1]}" if lf else None
    rep["aws_ofi_nccl"] = _ofi_nccl()
    return rep
