"""``python -m health preflight [--deep] [--expected-gpus N] [--instance-type T]``: exit OK healthy,
UNHEALTHY (the table names hosts and GPUs), CONFIG_ERROR bad arguments (``health.exit_codes.ExitCode``).

``python -m health nvml``: one NVML reading per GPU and the policy's findings (exit OK; UNHEALTHY
when a finding asks to leave the node).

``python -m health exit-code --dir RUN_DIR --rc RC``: prints the exit code a launcher should act on
(the ranks' exit records, else RC): torchrun itself exits 1 whatever its workers' codes.

Under torchrun (WORLD_SIZE > 1) preflight joins a process group (NCCL on GPU, gloo on CPU) so it
can measure all-reduce bus bandwidth across every rank; rank 0 prints the whole table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys

from health.exit_codes import ExitCode

def _init_pg_from_env(timeout_s: float):
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _instance_type(arg: str, endpoint: str) -> str:
    if arg:
        return arg
    from health.imds import ImdsClient

    return ImdsClient(endpoint, timeout_s=0.5).instance_type() or ""


def cmd_preflight(a) -> int:
    import torch.distributed as dist

    from health.preflight import run_preflight

    owned = _init_pg_from_env(a.timeout_s)
    try:
        itype = _instance_type(a.instance_type, a.imds_endpoint)
        overrides = {"matmul_tflops": a.matmul_floor, "copy_gbps": a.copy_floor, "allreduce_gbps": a.allreduce_floor}
        rep = run_preflight(deep=a.deep, expected_gpus=a.expected_gpus, instance_type=itype,
                            floor_overrides=overrides)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"preflight ({'deep' if a.deep else 'quick'}) instance_type={itype or 'unknown'}")
            print(rep.table())
            if a.json:
                from dataclasses import asdict

                with open(a.json, "w") as f:
                    json.dump({"healthy": rep.healthy, "checks": [asdict(c) for c in rep.checks]}, f, indent=1)
        print(rep.summary(), file=sys.stderr if not rep.healthy else sys.stdout, flush=True)
        code = 0 if rep.healthy else ExitCode.UNHEALTHY
        if a.record_dir:
            from health.exit_record import write_exit_record

            write_exit_record(a.record_dir, rank, code, rep.summary())
        return code
    finally:
        if owned:
            dist.destroy_process_group()


def cmd_nvml(a) -> int:
    import socket

    from health.nvml import open_probe
    from health.policy import EXIT_76, PolicyConfig, evaluate, evaluate_xid

    probe = open_probe()
    if probe is None:
        print("nvml: unavailable (no NVIDIA driver or nvidia-ml-py)")
        return 0
    host, bad = socket.gethostname(), False
    try:
        for i in range(probe.device_count()):
            r = probe.read(i)
            print(r)
            for f in evaluate(r, None, PolicyConfig(), host):
                print("  finding:", f.message())
                bad |= f.action == EXIT_76
        for g, x in probe.xid_events(100):
            f = evaluate_xid(g, x, host)
            print("  finding:", f.message())
            bad |= f.action == EXIT_76
    finally:
        probe.close()
    return ExitCode.UNHEALTHY if bad else 0


def cmd_exit_code(a) -> int:
    from health.exit_record import resolve_exit_code

    code, reason = resolve_exit_code(a.dir, a.rc)
    print(code)
    print(f"exit code {code}: {reason}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m health", description="moeforge node health tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("preflight", help="check this node (and every rank under torchrun) before training")
    p.add_argument("--deep", action="store_true", help="longer burn-in (~1 min per GPU) and larger transfers")
    p.add_argument("--expected-gpus", type=int, default=0, help="GPUs this node must have (0 = any)")
    p.add_argument("--instance-type", default="", help="EC2 instance type (default: ask IMDS, else unknown)")
    p.add_argument("--imds-endpoint", default=os.environ.get("MOEFORGE_IMDS_ENDPOINT", "http://169.254.169.254"))
    p.add_argument("--matmul-floor", type=float, default=None, help="override the bf16 TFLOP/s floor")
    p.add_argument("--copy-floor", type=float, default=None, help="override the copy GB/s floor")
    p.add_argument("--allreduce-floor", type=float, default=None, help="override the all-reduce busbw GB/s floor")
    p.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout under torchrun")
    p.add_argument("--json", default="", help="also write the checks as JSON here (rank 0)")
    p.add_argument("--record-dir", default="", help="write exit_code.rank<r>.json here (for `health exit-code`)")
    sub.add_parser("nvml", help="print one NVML reading per GPU and the policy's findings")
    e = sub.add_parser("exit-code", help="print the exit code a launcher should act on (torchrun exits 1 "
                                         "for any worker failure; the ranks' exit records say why)")
    e.add_argument("--dir", required=True, help="the run directory the ranks wrote exit_code.rank*.json to")
    e.add_argument("--rc", type=int, required=True, help="the launcher's own exit status (used without records)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return {"preflight": cmd_preflight, "nvml": cmd_nvml, "exit-code": cmd_exit_code}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
