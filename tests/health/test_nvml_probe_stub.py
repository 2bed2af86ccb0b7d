"""NvmlProbe's code paths on CPU, against a stand-in ``pynvml`` module (the GPU test in
tests/gpu/test_nvml_real.py checks the real library; this one catches mistakes before that run)."""

from __future__ import annotations

import sys
import types

import pytest

real = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (pip install nvidia-ml-py)")

from health.nvml import FakeProbe, NvmlProbe, NvmlUnavailable  # noqa: E402


def stub_module(unsupported=(), xids=()):
    m = types.ModuleType("pynvml")
    for name in dir(real):  # constants and error classes as the real module has them
        if name.startswith(("NVML_", "nvmlClocks", "nvmlEventType", "NVMLError")):
            setattr(m, name, getattr(real, name))
    handles = ["h0", "h1"]
    pending = list(xids)

    def sup(name, fn):
        def f(*a):
            if name in unsupported:
                raise real.NVMLError_NotSupported()
            return fn(*a)
        setattr(m, name, f)

    sup("nvmlInit", lambda: None)
    sup("nvmlShutdown", lambda: None)
    sup("nvmlDeviceGetCount", lambda: len(handles))
    sup("nvmlDeviceGetHandleByIndex", lambda i: handles[i])
    sup("nvmlDeviceGetIndex", lambda h: handles.index(h))
    sup("nvmlDeviceGetName", lambda h: "NVIDIA H100 80GB HBM3")
    sup("nvmlDeviceGetTotalEccErrors", lambda h, t, c: 0)
    sup("nvmlDeviceGetRemappedRows", lambda h: (0, 0, 1 if h == "h1" else 0, 0))
    sup("nvmlDeviceGetRetiredPagesPendingStatus", lambda h: 1)
    sup("nvmlDeviceGetCurrentClocksEventReasons", lambda h: 0x4 | 0x40)
    sup("nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: 0x8)
    sup("nvmlDeviceGetTemperature", lambda h, s: 51)
    sup("nvmlDeviceGetPowerUsage", lambda h: 312_500)
    sup("nvmlDeviceGetPcieReplayCounter", lambda h: 7)
    sup("nvmlDeviceGetNvLinkState", lambda h, link: 1 if link < 2 else 0)
    sup("nvmlDeviceGetNvLinkErrorCounter", lambda h, link, c: 3)
    sup("nvmlEventSetCreate", lambda: "es")
    sup("nvmlDeviceRegisterEvents", lambda h, t, es: None)
    sup("nvmlEventSetFree", lambda es: None)

    def wait(es, timeout_ms):
        if "nvmlEventSetWait" in unsupported:
            raise real.NVMLError_NotSupported()
        if not pending:
            raise real.NVMLError_Timeout()
        gpu, xid = pending.pop(0)
        return types.SimpleNamespace(device=handles[gpu], eventData=xid)

    m.nvmlEventSetWait = wait
    return m


@pytest.fixture
def use_stub(monkeypatch):
    def install(**kw):
        monkeypatch.setitem(sys.modules, "pynvml", stub_module(**kw))
    return install


def test_reading_fields_types_and_xids(use_stub):
    use_stub(xids=[(1, 79), (0, 13)])
    p = NvmlProbe()
    assert p.device_count() == 2
    r0, r1 = p.read(0), p.read(1)
    assert (r0.name, r0.ecc_volatile_uncorrected, r0.remapped_rows_pending, r1.remapped_rows_pending) == (
        "NVIDIA H100 80GB HBM3", 0, False, True)
    assert r0.retired_pages_pending is None  # remapping GPUs do not retire pages
    assert r0.clock_event_reasons == ["sw_power_cap", "hw_thermal_slowdown"] and r0.clock_event_mask == 0x44
    assert (r0.temperature_c, r0.power_w, r0.pcie_replay_counter) == (51.0, 312.5, 7)
    assert r0.nvlink_errors == {"crc_flit": 6, "crc_data": 6, "replay": 6, "recovery": 6}  # 2 active links
    fake = FakeProbe(1).read(0)
    for f in ("ecc_volatile_uncorrected", "remapped_rows_pending", "temperature_c", "power_w",
              "pcie_replay_counter", "nvlink_errors", "clock_event_reasons", "name"):
        assert type(getattr(r0, f)) is type(getattr(fake, f)), f
    assert p.xid_events(100) == [(1, 79), (0, 13)] and p.xid_events(0) == []
    p.close()


def test_unsupported_fields_read_as_none(use_stub):
    use_stub(unsupported={"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRemappedRows", "nvmlDeviceGetPcieReplayCounter",
                          "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetNvLinkState",
                          "nvmlDeviceRegisterEvents", "nvmlEventSetWait"})
    p = NvmlProbe()
    r = p.read(0)
    assert r.ecc_volatile_uncorrected is None and r.remapped_rows_pending is None
    assert r.retired_pages_pending is True  # the pre-A100 path
    assert r.clock_event_reasons == ["hw_slowdown"]  # the older throttle-reasons call
    assert r.pcie_replay_counter is None and r.nvlink_errors is None
    assert p.xid_events(10) == []


def test_no_driver_is_unavailable(monkeypatch):
    m = stub_module()

    def no_lib():
        raise real.NVMLError_LibraryNotFound()

    m.nvmlInit = no_lib
    monkeypatch.setitem(sys.modules, "pynvml", m)
    with pytest.raises(NvmlUnavailable, match="NVML unavailable"):
        NvmlProbe()
