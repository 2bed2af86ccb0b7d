"""What a launcher does with the trainer's exit code (docs/resilience.md, docs/launch.md).

The code to act on is never torchrun's own status (torchrun exits 1 for any worker failure):
it is ``python -m health exit-code --dir RUN_DIR --rc $rc`` (the ranks' exit records, else rc).
"""

from __future__ import annotations

from health.exit_codes import ExitCode

DONE, REQUEUE, REQUEUE_EXCLUDE, STOP, RETRY = "done", "requeue", "requeue-exclude-node", "stop", "retry"

# code -> (name, action)
POLICY = {
    ExitCode.OK: ("done", DONE),
    ExitCode.PREEMPTED: ("preempted", REQUEUE),
    ExitCode.UNHEALTHY: ("unhealthy node", REQUEUE_EXCLUDE),
    ExitCode.BUDGET_EXHAUSTED: ("budget spent", STOP),
    ExitCode.CONFIG_ERROR: ("config error", STOP),
    ExitCode.HANG: ("hang", RETRY),
    ExitCode.CRASH: ("crash", RETRY),
}


def action(code: int) -> str:
    """The launcher's action for ``code``; any code not in the table is a crash (bounded retries)."""
    return POLICY.get(int(code), ("other", RETRY))[1]


def table_markdown() -> str:
    rows = ["| Code | Meaning | Slurm (sbatch script) | local (`python -m launch local`) | HyperPod EKS |",
            "|-----:|---------|------------------------|----------------------------------|--------------|"]
    text = {
        DONE: ("exit 0", "exit 0", "job succeeds"),
        REQUEUE: ("`scontrol requeue $SLURM_JOB_ID`",
                  f"restart torchrun (resumes); exit {ExitCode.PREEMPTED:d} if the launcher itself was signalled",
                  "restart (`runPolicy`)"),
        REQUEUE_EXCLUDE: ("`scontrol update JobId=$SLURM_JOB_ID ExcNodeList=<node>` + requeue",
                          f"stop, exit {ExitCode.UNHEALTHY:d} (no other node)", "restart (HyperPod replaces faulty nodes)"),
        STOP: ("stop, exit with the code", "stop, exit with the code",
               "the operator restarts any failure: each attempt exits again at once, `jobMaxRetryCount` bounds it"),
        RETRY: ("requeue while failures ≤ `--max-retries`", "restart while failures ≤ `--max-retries`",
                "restart while ≤ `runPolicy.jobMaxRetryCount`"),
    }
    for code, (name, act) in POLICY.items():
        s, l, e = text[act]
        rows.append(f"| {code:d} | {name} | {s} | {l} | {e} |")
    rows.append("| other | crash | as 1 | as 1 | as 1 |")
    return "\n".join(rows)
