"""Multi-process (gloo, real collectives): straggler gathering and stop agreement.

Preflight under torchrun (gathered table, all-reduce) is in test_exit_record.py."""

from __future__ import annotations

import datetime
import json
import os
import time

import torch.multiprocessing as mp

from tests.netutil import free_port

WORLD = 3
SLOW_RANK = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from health.exit_codes import ExitCode

    from health.flags import StopFlags, agree_stop
    from health.straggler import StragglerDetector, gather_hosts, gather_step_times

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        hosts = [f"{h}#{i}" for i, h in enumerate(gather_hosts())]
        det = StragglerDetector(threshold=1.2, k=2, m=3, hosts=hosts)
        named, times = [], []
        for step in range(1, 13):  # 3 windows of 4 steps
            t0 = time.perf_counter()
            time.sleep(0.02 + (0.04 if rank == SLOW_RANK else 0.0))  # the "work"; one rank is 3x slower
            times.append(time.perf_counter() - t0)
            if step % 4 == 0:
                s = det.update(gather_step_times(times))
                times = []
                named.append(None if s is None else [s.rank, s.host, round(s.score, 2)])
        # Step-boundary agreement: one rank preempted, another unhealthy; everyone agrees on 76.
        flags = StopFlags()
        if rank == 1:
            flags.request(ExitCode.PREEMPTED, "SIGTERM")
        if rank == 2:
            flags.request(ExitCode.UNHEALTHY, "xid 79")
        decided = agree_stop(flags)
        none_yet = agree_stop(StopFlags())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"named": named, "decided": [decided.code, decided.reason], "none": none_yet}, f)
    finally:
        dist.destroy_process_group()


def test_straggler_named_and_stop_agreed_over_gloo(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert res["named"][0] is None  # one slow window names nobody (k=2)
        rank, host, score = res["named"][-1]
        assert rank == SLOW_RANK and host.endswith(f"#{SLOW_RANK}") and score > 2.0
        assert res["decided"][0] == 76 and res["none"] is None
    assert results[2]["decided"][1] == "xid 79"
    assert results[0]["decided"][1] == "stop requested by a peer rank"
