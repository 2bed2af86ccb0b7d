"""Session fixture: the project's own single-node Slurm (launch/slurm_localhost.sh).

CI (.ci/run) brings the cluster up before pytest, so the install time stays outside the tests. Run
alone, the fixture brings it up itself when it can (root: installs Slurm + munge with apt if
missing) and takes it down at the end; otherwise every Slurm test is skipped with the reason.
MOEFORGE_SLURM_TESTS=0 skips them outright; MOEFORGE_REQUIRE_SLURM=1 (set by .ci/run after `up`)
makes a missing cluster a failure.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.launch.common import SLURM_SH, slurm_available


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("MOEFORGE_SLURM_TESTS", "1") == "0":
        pytest.skip("MOEFORGE_SLURM_TESTS=0")
    ok, why = slurm_available()
    if not ok and os.environ.get("MOEFORGE_REQUIRE_SLURM") == "1":  # CI brought it up: it must be there
        pytest.fail(f"MOEFORGE_REQUIRE_SLURM=1 but no local Slurm: {why}")
    started = False
    if not ok:
        if os.geteuid() != 0:
            pytest.skip(f"no local Slurm ({why}) and not root, so launch/slurm_localhost.sh up cannot start one")
        p = subprocess.run(["bash", str(SLURM_SH), "up"], capture_output=True, text=True, timeout=900)
        ok, why2 = slurm_available()
        if p.returncode != 0 or not ok:
            pytest.skip(f"no local Slurm: launch/slurm_localhost.sh up failed (rc {p.returncode}): "
                        f"{(p.stderr or p.stdout).strip()[-400:]} {why2}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(SLURM_SH), "down"], capture_output=True, text=True, timeout=120)
