"""Worker for tests/dist/test_restart_store.py (run under torchrun --max-restarts 1, c10d).

Round 0: init through parallelism.process_group, then rank 1 SIGKILLs itself. Round 1, rank 0,
before its own init: the killed round's gloo address keys are still in torchrun's agent store
(the cause of the restart hang), but not under this attempt's prefix. Prints what it saw."""

import datetime
import os
import signal
import sys
import time

import torch.distributed as dist

from parallelism.process_group import attempt_prefix, init_distributed

restart, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if restart == 1 and rank == 0:
    raw = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=datetime.timedelta(seconds=20))
    old = dist.PrefixStore("moeforge/" + os.environ["TORCHELASTIC_RUN_ID"] + "/attempt_0/", raw)
    new = dist.PrefixStore(attempt_prefix(), raw)
    key = "0//cpu//0/1"  # rank 1's gloo address in the default group (keys under our store)
    print(f"STALE in the killed round's namespace: {old.check([key])}; in this attempt's: {new.check([key])}",
          flush=True)
if restart == 1 and rank == 1:
    time.sleep(3)  # the new rank 1 comes late (the hang's race): rank 0 looks before it writes its key
init_distributed("gloo", 30, "cpu", init_timeout_s=30)
dist.barrier()
if restart == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(0.5)
dist.barrier() if restart == 1 else time.sleep(5)
print(f"round {restart} rank {rank} done", flush=True)
sys.stdout.flush()
os._exit(0)
