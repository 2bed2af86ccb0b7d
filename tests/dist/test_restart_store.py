"""The cause of the restart hang (issue 18): torchrun's c10d agent store outlives a round, with
the killed round's gloo address keys in it; a restarted rank that read a dead peer's address
could wait in connectFullMesh forever. parallelism/process_group.py namespaces the store per
attempt: the new round's keys are all new. The worker checks exactly that, then both ranks
of the restarted round connect and finish."""

from __future__ import annotations

from tests.dist.train_launch import TORCHRUN, REPO, free_port, run


def test_restarted_round_never_sees_the_killed_rounds_keys(tmp_path):
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1", str(REPO / "tests/dist/stale_keys_worker.py")]
    rc, out = run(cmd, tmp_path / "out.log", timeout=150)
    assert rc == 0, out[-4000:]
    assert "STALE in the killed round's namespace: True; in this attempt's: False" in out, out[-4000:]
    assert "round 1 rank 0 done" in out and "round 1 rank 1 done" in out, out[-4000:]
