"""`run(cfg)`: one attempt of a training run, from a typed config to an exit code.

Order (docs/ARCHITECTURE.md, "One run"): validate → process group → run directory and logs → data → model
→ optimizer → resume → loop → exit code. Nothing here uses the clock for names or paths.
"""

from __future__ import annotations

import logging
import sys
import os

from checkpointing.errors import CheckpointError
from moe.config import ConfigError
from moeforge import alerts
from parallelism.process_group import env_ranks, init_distributed, shutdown
from train.config import TrainConfig
from health.exit_codes import ExitCode
from train.run_dir import run_dir, run_name
from train.validate import validate_train_config

log = logging.getLogger("moeforge")


def setup_logging(directory: str, rank: int) -> str:
    """Console on rank 0, and one log file per rank in the run directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{rank}.log")
    root = logging.getLogger("moeforge")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s [rank%(rank)s] %(message)s")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)  # same stream as the metric lines: order kept
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    old_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old_factory(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)
    root.propagate = False
    # checkpointing/ logs under its own name (it never imports train): the same console and file, so
    # a background commit, retention and the host-buffer allocation are in the run's log too.
    ckpt = logging.getLogger("checkpointing")
    ckpt.setLevel(logging.INFO)
    ckpt.handlers[:] = list(root.handlers)
    ckpt.propagate = False
    return path


def write_resolved_config(cfg: TrainConfig, directory: str) -> None:
    import dataclasses

    from omegaconf import OmegaConf

    from train.metrics import redact_secrets

    from checkpointing.atomic import atomic_write_text

    blob = redact_secrets(dataclasses.asdict(cfg))
    atomic_write_text(os.path.join(directory, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(blob)))


def _log_xla(runtime, xla_env: dict) -> None:
    from devices.neuron_env import extracting_graphs

    log.info("xla: %s", runtime.xla.versions())
    for setting in xla_env["set"]:
        log.info("neuron: set %s=%s (%s)", setting.key, setting.value, setting.reason)
    for key, value in xla_env["kept"].items():
        log.info("neuron: kept %s=%s (already set)", key, value)
    for note in xla_env["notes"]:
        log.warning("neuron: %s", note)
    if extracting_graphs():
        log.warning("neuron_parallel_compile trial run (NEURON_EXTRACT_GRAPHS_ONLY): graphs are compiled, "
                    "not executed; losses and metrics below are placeholders")


def run(cfg: TrainConfig) -> int:
    from cost.meter import process_start_time

    start_time = process_start_time()  # interpreter start and imports are billed too
    validate_train_config(cfg)  # before any process group or allocation
    from train.strict import check_input_paths

    check_input_paths(cfg)  # data.path, checkpoint.resume exist (exit 2), still before any allocation
    from cost.nodes import check_nodes, launched_topology

    nodes_error = check_nodes(cfg.cluster.nodes, launched_topology())
    if nodes_error:  # every rank reads the same launcher variables: all stop here together
        raise ConfigError(nodes_error)
    from health.runtime import HealthRuntime
    from parallelism.efa import apply_efa_env, versions_report
    from parallelism.process_group import apply_slurm_env
    from devices.runtime import resolve_runtime

    apply_slurm_env()  # srun without torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from Slurm
    directory = run_dir(cfg)
    rank, world, local_rank = env_ranks()
    alerts.configure(run_name(cfg), enabled=rank == 0, webhook=cfg.logging.alert_webhook)
    health = HealthRuntime(cfg.health, rank=rank, local_rank=local_rank, world_size=world, run_dir=directory)
    health.apply_early_env()  # NCCL flight recorder: must precede the process group
    efa = apply_efa_env()
    from devices.neuron_env import apply_xla_env, recommended_xla_env

    # Neuron compiler/cache/runtime variables: read when torch_xla is imported, so before that.
    xla_env = apply_xla_env(recommended_xla_env(cfg.trainer.device, cfg.neuron, directory, local_rank))
    from train.master_weights import effective_precision

    runtime = resolve_runtime(cfg.trainer.device, effective_precision(cfg), local_rank)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, runtime.device_type,
                           cfg.parallel.init_timeout_s, on_init_timeout=lambda msg: _init_timeout_record(health, msg))
    health.group = ctx.control_group
    from health.fail_together import FailTogether

    together = FailTogether(ctx.store, ctx.rank, directory).start()  # one rank raises: all leave, fast
    code, trainer, reason, failed = ExitCode.CRASH, None, "", False
    try:
        setup_logging(directory, ctx.rank)
        if ctx.is_main:
            write_resolved_config(cfg, directory)
            log.info("versions: %s", versions_report())
            for setting in efa.get("set", []):
                log.info("EFA: set %s=%s (%s)", setting.key, setting.value, setting.reason)
            if runtime.xla is not None:
                _log_xla(runtime, xla_env)
        expected = cfg.health.expected_gpus or cfg.cluster.accelerators_per_node
        report = health.preflight(expected, cfg.cluster.instance_type) if runtime.device_type == "cuda" else None
        if report is not None and not report.healthy:
            code = ExitCode.UNHEALTHY
            alerts.alert("unhealthy", f"preflight failed on this node: exit {int(code)}, resubmit elsewhere", "ERROR")
            return code
        from train.trainer import Trainer

        trainer = Trainer(cfg, directory, run_name(cfg), runtime, ctx, start_time, health)
        code = trainer.run()
        return code
    except ConfigError:
        code = ExitCode.CONFIG_ERROR
        raise
    except Exception as e:
        log.exception("training crashed")
        if isinstance(e, CheckpointError):
            alerts.alert("save_failed", f"checkpoint save failed, the run stopped: {e}", "ERROR")
        code, failed = ExitCode.CRASH, True
        reason = together.reason(together.fail(e))  # the first failure of any rank, named
        log.error("exit %d: %s", code, reason)
        return code
    finally:
        together.stop()
        alerts.shutdown(timeout_s=10.0)  # queued webhooks go out before the process leaves
        health.shutdown()
        health.exit(code, reason)  # torchrun reports 1 for any failure: the record keeps the real code
        if not (failed and ctx.distributed):  # after a failure a teardown can block on a peer: leave
            shutdown()
        if trainer is not None:
            trainer.finish(code)


def _init_timeout_record(health, message: str) -> None:
    os.makedirs(health.run_dir, exist_ok=True)
    health.exit(ExitCode.CRASH, message)
