"""``python -m launch {local,slurm,hyperpod,hyperpod-eks} [options] -- <hydra overrides>``.

Composes the trainer's config (so a config error is exit 2 before anything is submitted), derives
RUN_DIR exactly as the trainer does, renders the job into ``RUN_DIR/launch/`` and submits it
(``sbatch``), runs it (``local``), or prints it (``--dry-run``; always for ``hyperpod-eks``, whose
``kubectl apply``/``hyp create`` command is printed for you to run).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, List, Optional

from health.exit_codes import ExitCode

from launch.config import Composed, LaunchConfigError, compose

if TYPE_CHECKING:
    from train.config import TrainConfig
TARGETS = ("local", "slurm", "hyperpod", "hyperpod-eks")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS,
                   help="local: torchrun here; slurm: sbatch; hyperpod: sbatch with srun --auto-resume=1; "
                        "hyperpod-eks: HyperPodPyTorchJob manifest + kubectl/hyp command")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="accelerators per node (default: the cluster config's, 0 on CPU)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--instance-type", default="", help="e.g. p5.48xlarge: picks cluster=<type> and EKS resources")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="Slurm time limit HH:MM:SS")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit that Slurm sends USR1 (>= one step + a save + 30 s)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="Slurm CPUs per node task (0: Slurm's default)")
    p.add_argument("--exclusive", action="store_true", help="sbatch --exclusive (the default with GPUs)")
    p.add_argument("--max-retries", type=int, default=3, help=f"requeues after crashes/hangs (codes {ExitCode.CRASH:d}, {ExitCode.HANG:d}, other)")
    p.add_argument("--hyperpod", action="store_true",
                   help="slurm: force srun --auto-resume=1 (default: when /opt/sagemaker_cluster exists on the node)")
    p.add_argument("--run-dir", default="", help="explicit run directory (default: output_dir/run_name from the config)")
    p.add_argument("--rdzv-port", type=int, default=0)
    p.add_argument("--local-addr", default="", help="torchrun --local-addr (default 127.0.0.1 on one node)")
    p.add_argument("--dry-run", action="store_true", help="render and print; submit nothing")
    # EKS
    p.add_argument("--image", default="<account>.dkr.ecr.<region>.amazonaws.com/moeforge:latest")
    p.add_argument("--namespace", default="default")
    p.add_argument("--fsx-claim", default="fsx-claim", help="PVC of the FSx for Lustre volume")
    p.add_argument("--fsx-mount", default="/fsx")
    p.add_argument("--workdir", default="/workspace/moeforge", help="EKS: the repository inside the image")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for python -m train (after --)")
    return p


def _split(argv: List[str]):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _instance_type(args: argparse.Namespace, cfg: TrainConfig) -> str:
    return args.instance_type or (cfg.cluster.instance_type if cfg.cluster.instance_type != "local" else "")


def _neuron_env(c: Composed) -> dict:
    """trainer.device=neuron on EKS: the Neuron variables in the pod spec (no precompile step there)."""
    if c.cfg.trainer.device != "neuron":
        return {}
    from devices.neuron_env import recommended_xla_env

    return {s.key: s.value for s in recommended_xla_env("neuron", c.cfg.neuron, c.run_dir, local_rank=None)}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, overrides = _split(argv)
    p = _parser()
    args = p.parse_args(head)
    overrides = list(args.overrides) + overrides
    if args.time and not re.fullmatch(r"(\d+-)?\d+:\d{2}:\d{2}|\d+", args.time):
        print(f"config error: --time {args.time!r} is not HH:MM:SS", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if args.nodes < 1:
        print("config error: --nodes must be >= 1", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    eks = args.target == "hyperpod-eks"
    if eks and not args.instance_type:
        args.instance_type = "p5.48xlarge"
    cwd = None
    if eks:
        # RUN_DIR is a path inside the pods: relative paths resolve against the image's workdir, and
        # the default output_dir is on the FSx volume so every restart (any node) finds the commits.
        cwd = args.workdir
        if not args.run_dir and not any(o.split("=", 1)[0] == "output_dir" for o in overrides):
            overrides.append(f"output_dir={args.fsx_mount.rstrip('/')}/runs")
    try:
        c = compose(overrides, run_dir=args.run_dir or None, instance_type=args.instance_type,
                    nodes=args.nodes if args.nodes != 1 or args.instance_type else None, cwd=cwd)
    except LaunchConfigError as e:
        print(str(e), file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    gpus = args.gpus_per_node if args.gpus_per_node is not None else int(c.cfg.cluster.accelerators_per_node or 0)
    xla = c.cfg.trainer.device in ("neuron", "xla")
    if xla:  # NeuronCores are not Slurm GPUs, and the XLA path runs one process (devices/neuron_env.py)
        gpus = args.gpus_per_node or 0
    nproc = args.nproc_per_node or gpus or 1
    if xla:
        from devices.neuron_env import xla_config_errors

        errors = xla_config_errors(c.cfg, args.nodes * nproc)
        if errors:
            print("config error: " + "; ".join(errors), file=sys.stderr)
            return ExitCode.CONFIG_ERROR
    print(f"run_name={c.run_name}")
    print(f"run_dir={c.run_dir}")
    # Secrets never reach a file or an echo: each secret override becomes an environment reference
    # whose value goes to the job through its environment (train/redact.py).
    from train.redact import protect_overrides

    overrides, secret_env = protect_overrides(c.overrides)
    for var in secret_env:
        print(f"secret: {var} (in the job's environment, not in its files)")

    if args.target == "local":
        from launch.local import run_local, torchrun_command

        cmd = torchrun_command(nproc, overrides, port=args.rdzv_port)
        if args.dry_run:
            from launch.eks import shell

            print(f"RUN_DIR={c.run_dir} {shell(cmd)}")
            return 0
        return run_local(c.run_dir, cmd, max_retries=args.max_retries, extra_env=secret_env)

    if eks:
        from launch import eks as E

        job = E.EksJob(run_name=c.run_name, run_dir=c.run_dir, overrides=overrides,
                       secret_vars=list(secret_env),
                       instance_type=args.instance_type, nodes=args.nodes,
                       nproc_per_node=args.nproc_per_node or (1 if xla else 0), image=args.image,
                       namespace=args.namespace,
                       workdir=args.workdir, fsx_claim=args.fsx_claim, fsx_mount=args.fsx_mount,
                       max_retries=max(args.max_retries, 1), extra_env=_neuron_env(c))
        try:
            E.resources(args.instance_type)
        except ValueError as e:
            print(f"config error: {e}", file=sys.stderr)
            return ExitCode.CONFIG_ERROR
        if args.dry_run:  # print only: RUN_DIR is a path inside the pods (FSx), maybe not mounted here
            doc = E.manifest(job)
            try:
                E.validate(doc)
            except ImportError:
                pass
            sys.stdout.write(E.to_yaml(doc))
        else:
            path = E.write(job)
            print(f"manifest={path}")
            with open(path) as f:
                sys.stdout.write(f.read())
        if job.secret_vars:
            print("# first, the secret overrides' values as a Kubernetes Secret (the manifest holds none):")
            print(E.shell(E.secret_command(job)))
        print("# submit with kubectl (HyperPod training operator installed):")
        print(E.shell(E.kubectl_command(job)))
        print("# or with the HyperPod CLI:")
        print(E.shell(E.hyp_command(job)))
        return 0

    from launch import slurm as S

    job = S.SlurmJob(run_name=c.run_name, run_dir=c.run_dir, overrides=overrides, workdir=os.getcwd(),
                     nodes=args.nodes, nproc_per_node=nproc, gpus_per_node=gpus,
                     cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                     signal_lead_s=args.signal_lead, max_retries=args.max_retries,
                     hyperpod="on" if (args.hyperpod or args.target == "hyperpod") else "auto",
                     exclusive=args.exclusive or gpus > 0 or c.cfg.trainer.device == "neuron",
                     rdzv_port=args.rdzv_port, local_addr=args.local_addr)
    if c.cfg.trainer.device == "neuron":  # Neuron variables and the neuron_parallel_compile trial run
        from launch.neuron import neuron_launch

        job.neuron = neuron_launch(c.cfg, overrides, c.run_dir)
    path = S.write(job)
    print(f"script={path}")
    if args.dry_run:
        with open(path) as f:
            sys.stdout.write(f.read())
        if secret_env:
            print(f"# export {' '.join(secret_env)} (the secret overrides' values) before sbatch")
        print(f"# submit with: {' '.join(S.submit_command(job))}")
        return 0
    try:
        job_id = S.submit(job, secret_env)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"job_id={job_id}")
    print(f"log={c.run_dir}/slurm-{job_id}.out")
    return 0
