"""Restarts that cannot hang (issue 18, point 5): randomized SIGKILL of one worker under torchrun
--max-restarts with c10d rendezvous and process-mode async saves. 5 trials in the default suite
(one launch, five kills and restarts); 25 single-kill launches under ``-m soak``. Every launch
ends with the uninterrupted run's final loss."""

from __future__ import annotations

import pytest

from tests.dist.restart_trial import MAX_STEPS, chained_trials, one_trial, reference_final_loss


@pytest.fixture(scope="module")
def ref_loss(tmp_path_factory):
    return reference_final_loss(tmp_path_factory.mktemp("restart_ref"))


@pytest.mark.slow
def test_five_kill_restart_trials(ref_loss, tmp_path):
    trials = chained_trials(tmp_path, seed=5, kills=5, expected_loss=ref_loss, max_steps=MAX_STEPS)
    assert len(trials) == 5
    print(trials)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(100, 125))
def test_kill_restart_trial_soak(ref_loss, tmp_path, seed):
    print(one_trial(tmp_path, seed, ref_loss))
