"""GPU health readings behind one small interface: ``NvmlProbe`` (real, nvidia-ml-py) and
``FakeProbe`` (a scriptable CPU test double; tests/gpu/test_nvml_real.py checks they agree in shape).

Costs measured on an H100 (reference/FACTS.md): ECC, remapped rows, clock-event reasons, power and
temperature 2-3.5 us each; the PCIe replay counter 0.1-0.2 ms; a 100 ms XID event wait returns
NVMLError_Timeout cleanly. A full ``read`` of 8 GPUs is a few ms: poll every tens of seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

log = logging.getLogger("moeforge.health")

# nvmlClocksEventReason* bits (nvml.h); the names are what findings and logs print.
CLOCK_EVENT_BITS = {
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake": 0x80,
}


def decode_clock_events(mask: int) -> list[str]:
    return [name for name, bit in CLOCK_EVENT_BITS.items() if mask & bit]


@dataclass
class GpuReading:
    index: int
    ecc_volatile_uncorrected: int | None = None  # None where ECC is off or unsupported
    remapped_rows_pending: bool | None = None  # A100 and later; a GPU reset applies the remap
    remapped_rows_failed: bool | None = None  # remap failed: the GPU needs service
    retired_pages_pending: bool | None = None  # pre-A100 page retirement
    clock_event_reasons: list[str] = field(default_factory=list)
    clock_event_mask: int = 0
    temperature_c: float | None = None
    power_w: float | None = None
    pcie_replay_counter: int | None = None
    nvlink_errors: dict[str, int] | None = None  # summed over links: crc_flit, crc_data, replay, recovery
    name: str = ""


@runtime_checkable
class GpuProbe(Protocol):
    def device_count(self) -> int: ...

    def read(self, i: int) -> GpuReading: ...

    def xid_events(self, timeout_ms: int) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


class NvmlUnavailable(RuntimeError):
    pass


class NvmlProbe:
    """The real probe. Raises ``NvmlUnavailable`` from the constructor when there is no NVML (no
    nvidia-ml-py, or no driver: ``NVMLError_LibraryNotFound``); every field a GPU does not support
    reads as None rather than failing the whole reading."""

    def __init__(self, register_xid_events: bool = True):
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from e
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"NVML unavailable: {e.__class__.__name__}: {e}") from e
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._event_set = None
        self._handle_index: dict[int, int] = {}
        if register_xid_events:
            self._register_xid()

    def _register_xid(self) -> None:
        nv = self.nv
        try:
            es = nv.nvmlEventSetCreate()
        except nv.NVMLError as e:
            log.warning("NVML event set unavailable (%s): XID events will not be watched", e)
            return
        for i, h in enumerate(self._handles):
            try:
                nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, es)
            except nv.NVMLError as e:  # e.g. NotSupported inside some containers
                log.warning("GPU %d: cannot register XID events (%s)", i, e)
        self._event_set = es

    def device_count(self) -> int:
        return len(self._handles)

    def _try(self, fn, *args):
        try:
            return fn(*args)
        except self.nv.NVMLError:
            return None

    def read(self, i: int) -> GpuReading:
        nv, h = self.nv, self._handles[i]
        r = GpuReading(index=i)
        name = self._try(nv.nvmlDeviceGetName, h)
        r.name = name.decode() if isinstance(name, bytes) else (name or "")
        r.ecc_volatile_uncorrected = self._try(nv.nvmlDeviceGetTotalEccErrors, h,
                                               nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
        rows = self._try(nv.nvmlDeviceGetRemappedRows, h)  # (corr, unc, pending, failure)
        if rows is not None:
            r.remapped_rows_pending, r.remapped_rows_failed = bool(rows[2]), bool(rows[3])
        else:
            pend = self._try(nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
            r.retired_pages_pending = None if pend is None else bool(pend)
        mask = self._try(nv.nvmlDeviceGetCurrentClocksEventReasons, h)
        if mask is None:
            mask = self._try(nv.nvmlDeviceGetCurrentClocksThrottleReasons, h)
        r.clock_event_mask = int(mask or 0)
        r.clock_event_reasons = decode_clock_events(r.clock_event_mask)
        t = self._try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        r.temperature_c = None if t is None else float(t)
        p = self._try(nv.nvmlDeviceGetPowerUsage, h)
        r.power_w = None if p is None else p / 1000.0
        r.pcie_replay_counter = self._try(nv.nvmlDeviceGetPcieReplayCounter, h)
        r.nvlink_errors = self._nvlink_errors(h)
        return r

    def _nvlink_errors(self, h) -> dict[str, int] | None:
        nv = self.nv
        counters = {"crc_flit": nv.NVML_NVLINK_ERROR_DL_CRC_FLIT, "crc_data": nv.NVML_NVLINK_ERROR_DL_CRC_DATA,
                    "replay": nv.NVML_NVLINK_ERROR_DL_REPLAY, "recovery": nv.NVML_NVLINK_ERROR_DL_RECOVERY}
        out = {k: 0 for k in counters}
        any_link = False
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            if not self._try(nv.nvmlDeviceGetNvLinkState, h, link):
                continue
            any_link = True
            for k, c in counters.items():
                v = self._try(nv.nvmlDeviceGetNvLinkErrorCounter, h, link, c)
                out[k] += int(v or 0)
        return out if any_link else None

    def xid_events(self, timeout_ms: int = 0) -> list[tuple[int, int]]:
        """XID events since the last call: [(gpu index, xid)]. Waits at most ``timeout_ms`` for the
        first one (ctypes releases the GIL while NVML waits, so training threads keep running)."""
        if self._event_set is None:
            return []
        nv, out = self.nv, []
        wait = int(timeout_ms)
        for _ in range(64):  # bounded drain
            try:
                data = nv.nvmlEventSetWait(self._event_set, wait)
            except nv.NVMLError_Timeout:
                break
            except nv.NVMLError as e:
                log.warning("NVML event wait failed: %s", e)
                break
            try:
                gpu = nv.nvmlDeviceGetIndex(data.device)
            except nv.NVMLError:
                gpu = -1
            out.append((int(gpu), int(data.eventData)))
            wait = 0
        return out

    def close(self) -> None:
        try:
            if self._event_set is not None:
                self.nv.nvmlEventSetFree(self._event_set)
                self._event_set = None
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass


class FakeProbe:
    """A scriptable probe: ``readings`` are per-GPU GpuReadings (mutate or ``set`` them between
    polls); ``inject_xid(gpu, xid)`` queues an XID event for the next ``xid_events`` call."""

    def __init__(self, n_gpus: int = 8, name: str = "NVIDIA H100 80GB HBM3"):
        self.readings = [GpuReading(index=i, ecc_volatile_uncorrected=0, remapped_rows_pending=False,
                                    remapped_rows_failed=False, retired_pages_pending=False,
                                    clock_event_reasons=[], clock_event_mask=0, temperature_c=45.0,
                                    power_w=120.0, pcie_replay_counter=0,
                                    nvlink_errors={"crc_flit": 0, "crc_data": 0, "replay": 0, "recovery": 0},
                                    name=name)
                         for i in range(n_gpus)]
        self._xids: list[tuple[int, int]] = []
        self.reads = 0

    def device_count(self) -> int:
        return len(self.readings)

    def read(self, i: int) -> GpuReading:
        import copy

        self.reads += 1
        return copy.deepcopy(self.readings[i])

    def set(self, i: int, **fields) -> None:
        r = self.readings[i]
        for k, v in fields.items():
            if not hasattr(r, k):
                raise AttributeError(f"GpuReading has no field {k!r}")
            setattr(r, k, v)
        if "clock_event_mask" in fields:
            r.clock_event_reasons = decode_clock_events(r.clock_event_mask)

    def inject_xid(self, gpu: int, xid: int) -> None:
        self._xids.append((gpu, xid))

    def xid_events(self, timeout_ms: int = 0) -> list[tuple[int, int]]:
        out, self._xids = self._xids, []
        return out

    def close(self) -> None:
        pass


def open_probe() -> GpuProbe | None:
    """NvmlProbe when NVML works, else None (logged once at info: CPU machines have no NVML)."""
    try:
        return NvmlProbe()
    except NvmlUnavailable as e:
        # Expected on a CPU-only machine (debug there); worth a line where CUDA is visible.
        import torch

        (log.warning if torch.cuda.is_available() else log.debug)("GPU health probe off: %s", e)
        return None
