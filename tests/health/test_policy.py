"""health/policy.py: pure thresholds and the XID table."""

from __future__ import annotations

from health.nvml import CLOCK_EVENT_BITS, FakeProbe, GpuReading, decode_clock_events
from health.policy import (EXIT_76, IGNORE, WARN, PolicyConfig, evaluate, evaluate_xid, xid_action)


def test_xid_table():
    for xid in (48, 63, 64, 74, 79, 94, 95):
        assert xid_action(xid) == EXIT_76, xid
    assert xid_action(13) == WARN and xid_action(31) == WARN
    assert xid_action(43) == IGNORE
    assert xid_action(99999) == WARN  # unknown: say so, keep going
    cfg = PolicyConfig(xid_actions={13: EXIT_76})
    assert xid_action(13, cfg) == EXIT_76
    f = evaluate_xid(3, 79, "node-a")
    assert (f.gpu, f.host, f.severity, f.what, f.raw_value, f.action) == (3, "node-a", "critical", "xid_79", 79, EXIT_76)


def test_policy_config_from_health_section_duck_typed():
    class H:  # a partial health section: missing fields keep their defaults
        ecc_uncorrected_max = 2
        temp_warn_c = 80.0
        xid_actions = {"13": "checkpoint_exit_76"}
    cfg = PolicyConfig.from_config(H())
    assert cfg.ecc_uncorrected_max == 2 and cfg.temp_warn_c == 80.0 and cfg.xid_actions == {13: EXIT_76}
    assert PolicyConfig.from_config(None) == PolicyConfig()


def test_clean_reading_has_no_findings():
    r = FakeProbe(1).read(0)
    assert evaluate(r, None) == [] and evaluate(r, r) == []


def test_memory_errors_exit_76():
    r = GpuReading(index=2, ecc_volatile_uncorrected=1, remapped_rows_pending=True, remapped_rows_failed=True,
                   retired_pages_pending=True)
    found = {f.what: f for f in evaluate(r, None, host="h")}
    assert set(found) == {"ecc_volatile_uncorrected", "remapped_rows_pending", "remapped_rows_failed",
                          "retired_pages_pending"}
    assert all(f.action == EXIT_76 and f.gpu == 2 and f.host == "h" for f in found.values())
    assert found["ecc_volatile_uncorrected"].raw_value == 1
    assert evaluate(r, None, PolicyConfig(ecc_uncorrected_max=5))[0].what != "ecc_volatile_uncorrected"


def test_clock_events_decoded_and_warn_only():
    mask = CLOCK_EVENT_BITS["hw_thermal_slowdown"] | CLOCK_EVENT_BITS["sw_power_cap"] | 0x1  # 0x1: idle
    assert decode_clock_events(mask) == ["sw_power_cap", "hw_thermal_slowdown"]
    r = GpuReading(index=0, clock_event_mask=mask, clock_event_reasons=decode_clock_events(mask))
    found = {f.what: f for f in evaluate(r, None)}
    assert found["hw_thermal_slowdown"].action == WARN and found["hw_thermal_slowdown"].raw_value == "0x45"
    assert found["sw_power_cap"].action == IGNORE
    assert all(f.action != EXIT_76 for f in found.values())


def test_counter_deltas_and_temperature():
    prev = GpuReading(index=1, pcie_replay_counter=10, nvlink_errors={"crc_flit": 5, "crc_data": 0, "replay": 0, "recovery": 0})
    cur = GpuReading(index=1, pcie_replay_counter=500, temperature_c=91.0,
                     nvlink_errors={"crc_flit": 400, "crc_data": 0, "replay": 0, "recovery": 1})
    found = {f.what: f.raw_value for f in evaluate(cur, prev)}
    assert found == {"pcie_replay_delta": 490, "nvlink_error_delta": 395, "nvlink_recovery_delta": 1,
                     "temperature_c": 91.0}
    assert evaluate(cur, None, PolicyConfig(temp_warn_c=95)) == []  # no prev: no deltas


def test_health_section_validation():
    from health.validate import health_errors
    from health.config import HealthConfig

    assert health_errors(HealthConfig()) == []
    bad = HealthConfig(preflight="full", nan_on_exhausted="ignore", hang_timeout_s=-1, straggler_min_slow=9,
                       straggler_threshold=0.9, imds_timeout_s=30, xid_actions={"79": "panic", "x": "warn"})
    errs = "\n".join(health_errors(bad))
    for part in ("health.preflight='full' must be off, quick or deep", "health.nan_on_exhausted",
                 "health.hang_timeout_s=-1", "health.straggler_min_slow=9 must be between 1 and "
                 "health.straggler_windows=5", "health.straggler_threshold=0.9", "health.imds_timeout_s=30",
                 "health.xid_actions.79='panic'", "key 'x' must be an XID number"):
        assert part in errs, part
