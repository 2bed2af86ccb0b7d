"""``moeforge <command> [args]``: one command for what the repository's modules already do.

Each subcommand is a thin dispatch to an existing entry point, which keeps its own arguments and
``--help``:

=========  ===========================================  =========================================
command    runs                                         e.g.
=========  ===========================================  =========================================
train      ``python -m train`` (Hydra overrides)        ``moeforge train model=dsv3_mini``
launch     ``python -m launch``                         ``moeforge launch slurm --nodes 2 -- ...``
ckpt       ``python -m checkpointing`` (ls/verify/      ``moeforge ckpt verify outputs/run``
           export)
report     ``python -m cost.report``                    ``moeforge report outputs/run``
health     ``python -m health`` (preflight, nvml,       ``moeforge health preflight --deep``
           exit-code)
prepare    ``python -m train.prepare``                  ``moeforge prepare --input a.txt --output s``
bench      ``python -m bench``                          ``moeforge bench smoke``
=========  ===========================================  =========================================

Under torchrun: ``torchrun --nproc-per-node 8 --no-python moeforge train ...``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

# command -> (module, its ``main``'s calling convention, one-line help). "argv": main(argv) returns
# an exit code; "sys.argv": main() reads sys.argv itself (Hydra's decorator, bench's suite table).
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "train": ("train.cli", "sys.argv", "train a model (Hydra overrides: key=value ...)"),
    "launch": ("launch.cli", "argv", "run or submit a job: local, slurm, hyperpod, hyperpod-eks"),
    "ckpt": ("checkpointing.cli", "argv", "checkpoints: ls, verify, export"),
    "report": ("cost.report", "argv", "a run's HTML report (cost, goodput, loss, expert load)"),
    "health": ("health.__main__", "argv", "node health: preflight, nvml, exit-code"),
    "prepare": ("train.prepare", "argv", "tokenize text/JSONL into a shard directory"),
    "bench": ("bench.__main__", "sys.argv", "benchmarks: smoke, train, ckpt, attn, compare, split"),
}


def usage() -> str:
    lines = ["usage: moeforge <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`moeforge <command> --help` shows a command's own options."]
    return "\n".join(lines)


def _entry(command: str) -> Tuple[Callable, str]:
    module, convention, _ = COMMANDS[command]
    return importlib.import_module(module).main, convention


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"moeforge: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    fn, convention = _entry(command)
    if convention == "argv":
        return int(fn(rest) or 0)
    # The entry parses sys.argv itself: it sees the command's own arguments.
    sys.argv = [sys.argv[0] if sys.argv else "moeforge", *rest]
    result = fn()
    return int(result or 0)
