"""Exit codes the launchers understand (DESIGN.md, "Exit codes"; docs/resilience.md has the table)."""

EXIT_OK = 0  # done (or already done)
EXIT_CRASH = 1  # crash: bounded retries
EXIT_CONFIG = 2  # bad config or command line: fix it, do not retry
EXIT_PREEMPTED = 75  # interrupted with a committed checkpoint: resubmit
EXIT_UNHEALTHY = 76  # this node is unhealthy: resubmit elsewhere
EXIT_BUDGET = 77  # budget exhausted: do not resubmit
EXIT_HANG = 78  # the hang watchdog fired (stacks dumped): resubmit with bounded retries
