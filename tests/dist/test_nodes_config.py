"""cluster.nodes set and disagreeing with what torchrun launched stops every rank at validation
(exit 2 on each worker), with a message naming both numbers."""

from __future__ import annotations

from tests.dist.train_launch import FAST, run, torchrun_cmd


def test_cluster_nodes_disagreeing_with_the_launch_stops_at_validation(tmp_path):
    rc, out = run(torchrun_cmd(2, *FAST, "trainer.max_steps=2", "cluster.nodes=3", f"output_dir={tmp_path}"),
                  tmp_path / "out.log", timeout=120)
    assert rc != 0, out
    assert "cluster.nodes=3 but 1 node(s) were launched" in out, out[-3000:]
    assert "exitcode  : 2" in out or "exitcode: 2" in out.replace(" ", "") or "(exit 2)" in out, out[-3000:]
    assert not list(tmp_path.rglob("metrics.jsonl"))  # nothing was trained or allocated
