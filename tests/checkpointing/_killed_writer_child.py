"""Child process of test_killed_writer: commit step 1, then start step 2 with a writer that stalls
after its shard is on disk, print WRITING, and wait to be SIGKILLed."""

import sys
import time

from checkpointing import CheckpointManager, _dcp
from tests.checkpointing.helpers import Cfg, make, state_of, train_steps


class StallingWriter(_dcp._LocalWriter):
    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)  # the shard file is written (and fsynced) here
        print("WRITING", flush=True)
        time.sleep(120)  # bounded: the parent kills us long before
        return fut


def main(out_dir: str) -> None:
    model, opt = make()
    mgr = CheckpointManager(Cfg(), out_dir, "run")
    train_steps(model, opt, 1)
    mgr.save(1, state_of(model, opt), meta={"tokens": 1})
    print("COMMITTED 1", flush=True)
    train_steps(model, opt, 1)
    _dcp._LocalWriter = StallingWriter  # the manager builds its writer through _dcp.make_writer
    mgr.save(2, state_of(model, opt), meta={"tokens": 2})
    print("UNREACHABLE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
