"""The training program a launcher hands to torchrun / hyperpodrun, immune to the working directory.

``torchrun -m train`` runs ``python -m train``, which puts the job's working directory first on
``sys.path``: a ``model.py`` or ``train.py`` there would shadow ours. The documented form is the
console script, ``torchrun --no-python moeforge train ...`` (docs/install.md). A checkout used
without installing has no script; ``python -m moeforge`` drops the working directory from
``sys.path`` itself (moeforge/__main__.py), so that form is immune too.
"""

from __future__ import annotations

import os
from typing import List

SCRIPT = "moeforge"


def script_next_to(python: str) -> str:
    """The ``moeforge`` console script installed beside ``python`` ("" when there is none)."""
    path = os.path.join(os.path.dirname(python), SCRIPT)
    return path if os.path.exists(path) else ""


def torchrun_program(python: str) -> List[str]:
    """What follows torchrun's own options: ``--no-python <bin>/moeforge train``, or
    ``-m moeforge train`` where moeforge is not installed beside ``python``."""
    script = script_next_to(python)
    return ["--no-python", script, "train"] if script else ["-m", "moeforge", "train"]


def image_program() -> List[str]:
    """For a container image with moeforge pip-installed: the script is on PATH."""
    return ["--no-python", SCRIPT, "train"]
