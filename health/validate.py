"""Rules for the ``health`` config section, with messages that name the field and the fix.
``train/validate.py`` calls ``health_errors(cfg.health)`` and fails before any process group."""

from __future__ import annotations

from health.config import HealthConfig
from health.policy import EXIT_76, IGNORE, WARN


def health_errors(h: HealthConfig) -> list[str]:
    errs: list[str] = []
    g = lambda name, default=None: getattr(h, name, default)  # noqa: E731 (a partial section keeps defaults)
    if g("preflight", "quick") not in ("off", "quick", "deep"):
        errs.append(f"health.preflight={g('preflight')!r} must be off, quick or deep")
    if g("nan_on_exhausted", "rollback") not in ("rollback", "stop"):
        errs.append(f"health.nan_on_exhausted={g('nan_on_exhausted')!r} must be rollback or stop")
    for name in ("imds_interval_s", "imds_timeout_s", "nvml_interval_s", "hang_timeout_s", "preemption_deadline_s"):
        v = g(name, 0)
        if v is not None and v < 0:
            errs.append(f"health.{name}={v} must be >= 0 (0 turns it off where that applies)")
    if (g("imds_timeout_s") or 0) > 5:
        errs.append(f"health.imds_timeout_s={g('imds_timeout_s')} is too long: start-up waits for it off EC2; use <= 5")
    if (g("nan_max_skips") or 0) < 0:
        errs.append(f"health.nan_max_skips={g('nan_max_skips')} must be >= 0")
    if (g("nan_max_rollbacks") or 0) < 0:
        errs.append(f"health.nan_max_rollbacks={g('nan_max_rollbacks')} must be >= 0 (0: stop instead of rolling back)")
    k, m = g("straggler_min_slow", 3), g("straggler_windows", 5)
    if (g("straggler_every") or 0) > 0 and not 1 <= k <= m:
        errs.append(f"health.straggler_min_slow={k} must be between 1 and health.straggler_windows={m}")
    if (g("straggler_threshold") or 1.2) <= 1.0:
        errs.append(f"health.straggler_threshold={g('straggler_threshold')} must be > 1 (a ratio to the median)")
    for xid, action in dict(g("xid_actions") or {}).items():
        if not str(xid).isdigit():
            errs.append(f"health.xid_actions: key {xid!r} must be an XID number")
        if action not in (IGNORE, WARN, EXIT_76):
            errs.append(f"health.xid_actions.{xid}={action!r} must be {IGNORE}, {WARN} or {EXIT_76}")
    return errs
