"""The default suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadfile``).

``loadfile`` hands each test file to one worker whole, so a module fixture (one reference run
shared by several tests) still runs once. The files that use the single-node Slurm
(tests/launch/conftest.py ``slurm_cluster``) go to ONE worker together: that session fixture may
bring the cluster up and take it down at its session's end, which must not happen under another
worker's running jobs. ``-n 0`` runs everything in one process, as before.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
SLURM_SCOPE = "slurm_cluster"


@lru_cache(maxsize=None)
def _uses_slurm(test_file: str) -> bool:
    path = _ROOT / test_file
    try:
        return SLURM_SCOPE in path.read_text()
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # another --dist on the command line: xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class _SlurmTogether(LoadFileScheduling):
        """loadfile, with every Slurm-using file in one scope (so on one worker)."""

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # the file
            return SLURM_SCOPE if _uses_slurm(scope) else scope

    return _SlurmTogether(config, log)
