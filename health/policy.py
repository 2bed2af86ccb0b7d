"""Pure health policy: thresholds and an XID action table -> findings. No NVML, no threads.

Actions:
    ignore              nothing to do (logged at debug)
    warn                log a warning with GPU, host and raw value; keep training
    checkpoint_exit_76  request ExitCode.UNHEALTHY: checkpoint at the next step boundary and exit so the
                        launcher resubmits on another node (if the GPU is too far gone to save, the
                        trainer still exits UNHEALTHY and the previous committed checkpoint is used)

XID meanings follow NVIDIA's "XID Errors" catalogue (docs.nvidia.com/deploy/xid-errors) and its
GPU memory error-management guide (row remapping on A100/H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from health.config import HealthConfig

IGNORE, WARN, EXIT_76 = "ignore", "warn", "checkpoint_exit_76"

XID_ACTIONS: dict[int, str] = {
    # Usually the application's own fault (bad kernel, illegal address): restarting elsewhere does
    # not help, and the process usually dies with a CUDA error anyway.
    13: WARN,  # graphics engine exception (e.g. out-of-range access in a kernel)
    31: WARN,  # GPU memory page fault (illegal address: typically an application bug)
    43: IGNORE,  # GPU stopped processing: the faulting application was stopped; follows 13/31
    45: IGNORE,  # preemptive cleanup after a previous error: a consequence, not a cause
    # Hardware: checkpoint and leave this node.
    48: EXIT_76,  # double-bit ECC error (DBE)
    61: EXIT_76,  # internal micro-controller breakpoint/warning
    62: EXIT_76,  # internal micro-controller halt
    63: EXIT_76,  # ECC page retirement / row-remapping recorded: a GPU reset is needed to apply it
    64: EXIT_76,  # ECC page retirement / row-remapping failure
    74: EXIT_76,  # NVLink error
    79: EXIT_76,  # GPU has fallen off the bus
    92: WARN,  # high single-bit ECC error rate
    94: EXIT_76,  # contained ECC error: memory needs the pending remap (reset) before reuse
    95: EXIT_76,  # uncontained ECC error: other processes on the GPU may be corrupted
    119: EXIT_76,  # GSP RPC timeout
    120: EXIT_76,  # GSP error
    140: EXIT_76,  # unrecovered ECC error
    154: EXIT_76,  # GPU recovery action changed: reset or reboot required
}
UNKNOWN_XID_ACTION = WARN


@dataclass
class Finding:
    gpu: int
    host: str
    severity: str  # info | warning | critical
    what: str  # stable slug: ecc_uncorrected, remap_pending, xid_79, hw_thermal_slowdown, ...
    raw_value: object
    action: str  # ignore | warn | checkpoint_exit_76

    def message(self) -> str:
        return f"GPU {self.gpu} on {self.host}: {self.what}={self.raw_value} -> {self.action}"


@dataclass
class PolicyConfig:
    ecc_uncorrected_max: int = 0  # volatile uncorrected ECC errors tolerated before leaving the node
    temp_warn_c: float = 87.0
    pcie_replay_warn_delta: int = 100  # replays between two polls
    nvlink_error_warn_delta: int = 100  # CRC/replay errors between two polls, summed over links
    xid_actions: dict | None = None  # overrides of XID_ACTIONS, {xid: action}

    @classmethod
    def from_config(cls, cfg: HealthConfig | None) -> "PolicyConfig":
        """From the ``health`` section (a partial one too: missing fields keep their defaults)."""
        kw = {}
        for f in ("ecc_uncorrected_max", "temp_warn_c", "pcie_replay_warn_delta", "nvlink_error_warn_delta",
                  "xid_actions"):
            if cfg is not None and hasattr(cfg, f):
                kw[f] = getattr(cfg, f)
        if kw.get("xid_actions"):
            kw["xid_actions"] = {int(k): str(v) for k, v in dict(kw["xid_actions"]).items()}
        return cls(**kw)


_SLOWDOWN_SEVERITY = {
    "hw_slowdown": WARN,
    "hw_thermal_slowdown": WARN,
    "hw_power_brake": WARN,
    "sw_thermal": WARN,
    "sw_power_cap": IGNORE,  # the normal state of a GPU at its power limit under load
}


def xid_action(xid: int, cfg: PolicyConfig | None = None) -> str:
    if cfg is not None and cfg.xid_actions and xid in cfg.xid_actions:
        return cfg.xid_actions[xid]
    return XID_ACTIONS.get(xid, UNKNOWN_XID_ACTION)


def evaluate_xid(gpu: int, xid: int, host: str, cfg: PolicyConfig | None = None) -> Finding:
    action = xid_action(xid, cfg)
    severity = {EXIT_76: "critical", WARN: "warning"}.get(action, "info")
    return Finding(gpu, host, severity, f"xid_{xid}", xid, action)


def evaluate(reading, prev, cfg: PolicyConfig | None = None, host: str = "") -> list[Finding]:
    """Findings for one GPU reading; ``prev`` (the same GPU's previous reading, or None) turns
    monotonic counters into per-poll deltas."""
    cfg = cfg or PolicyConfig()
    g, out = reading.index, []

    def add(severity, what, raw, action):
        out.append(Finding(g, host, severity, what, raw, action))

    ecc = reading.ecc_volatile_uncorrected
    if ecc is not None and ecc > cfg.ecc_uncorrected_max:
        add("critical", "ecc_volatile_uncorrected", ecc, EXIT_76)
    if reading.remapped_rows_failed:
        add("critical", "remapped_rows_failed", True, EXIT_76)
    if reading.remapped_rows_pending:
        add("critical", "remapped_rows_pending", True, EXIT_76)
    if reading.retired_pages_pending:
        add("critical", "retired_pages_pending", True, EXIT_76)
    for name in reading.clock_event_reasons:
        action = _SLOWDOWN_SEVERITY.get(name, WARN)
        add("warning" if action == WARN else "info", name, f"0x{reading.clock_event_mask:x}", action)
    if reading.temperature_c is not None and reading.temperature_c >= cfg.temp_warn_c:
        add("warning", "temperature_c", reading.temperature_c, WARN)
    if prev is not None and reading.pcie_replay_counter is not None and prev.pcie_replay_counter is not None:
        d = reading.pcie_replay_counter - prev.pcie_replay_counter
        if d >= cfg.pcie_replay_warn_delta:
            add("warning", "pcie_replay_delta", d, WARN)
    if prev is not None and reading.nvlink_errors and prev.nvlink_errors:
        d = sum(reading.nvlink_errors.get(k, 0) - prev.nvlink_errors.get(k, 0)
                for k in ("crc_flit", "crc_data", "replay"))
        if d >= cfg.nvlink_error_warn_delta:
            add("warning", "nvlink_error_delta", d, WARN)
        rec = reading.nvlink_errors.get("recovery", 0) - prev.nvlink_errors.get("recovery", 0)
        if rec > 0:
            add("warning", "nvlink_recovery_delta", rec, WARN)
    return out
