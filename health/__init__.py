"""Node health and run resilience: stop flags, signal handlers, spot-notice watcher (IMDSv2), NVML
probes and policy, preflight burn-in, hang watchdog, straggler detection, non-finite guard, exit
records (torchrun loses worker exit codes). ``health.runtime.HealthRuntime`` is the facade the
training loop uses.

Watchers only set flags (``health.flags.StopFlags``); the training loop reads them at step
boundaries and decides together. This package never imports ``train``. docs/resilience.md has the
exit-code table and the knobs.
"""

from health.exit_codes import ExitCode
from health.flags import StopFlags, StopRequest

__all__ = ["ExitCode", "StopFlags", "StopRequest"]
