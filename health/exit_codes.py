"""The one table of process exit codes: the trainer exits with them, health's watchers request
them, the launchers act on them (launch/policy.py; docs/resilience.md has the table).

An ``IntEnum``, so a member is the plain int a shell, ``sys.exit`` and ``os._exit`` see.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # done (or already done)
    CRASH = 1  # crash: bounded retries
    CONFIG_ERROR = 2  # bad config or command line: fix it, do not retry
    PREEMPTED = 75  # interrupted with a committed checkpoint: resubmit
    UNHEALTHY = 76  # this node is unhealthy: resubmit elsewhere
    BUDGET_EXHAUSTED = 77  # budget exhausted: do not resubmit
    HANG = 78  # the hang watchdog fired (stacks dumped): resubmit with bounded retries
