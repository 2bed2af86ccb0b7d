"""Child process for the async-mode tests: a 1-rank gloo group (DCP's process-mode daemon joins a
group of its own, set up from ours), three consecutive async saves, each checked bitwise."""

import datetime
import json
import sys

import torch
import torch.distributed as dist

from checkpointing import CheckpointManager
from tests.checkpointing.helpers import Cfg, make, state_of, train_steps
from tests.netutil import free_port


def main(out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    model, opt = make()
    mgr = CheckpointManager(Cfg(async_mode=mode, keep_last=2), out_dir, "run")
    snapshots, stats = {}, []
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        res = mgr.save(step, state_of(model, opt), meta={"tokens": step})
        assert not res.committed and res.mode == mgr._async_mode
        mgr.wait()  # staged: the optimizer may now change the parameters
        train_steps(model, opt, 1, seed=10 + step)  # mutate while the write may still run
        # (the next save() waits for this one's commit: never two in flight)
        if step > 1:
            stats.append(mgr.last_save_stats())
    mgr.close()
    stats.append(mgr.last_save_stats())
    assert mgr.committed_steps() == [2, 3], mgr.committed_steps()
    for step in (2, 3):
        m2, o2 = make(seed=99)
        mgr.load(mgr.step_path(step), state_of(m2, o2))
        for k, v in m2.state_dict().items():
            assert torch.equal(v, snapshots[step][k]), (step, k)
    print("RESULT " + json.dumps({"mode": mgr._async_mode, "stats": stats}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
