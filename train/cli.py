"""`python -m train`: compose the Hydra config into typed dataclasses and run."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from health.exit_codes import ExitCode
from moe.config import ConfigError
from train.config import TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)

# Absolute, so the tree is found however the package is imported (python -m train, torchrun, tests).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def to_typed(dcfg: DictConfig) -> TrainConfig:
    return OmegaConf.to_object(dcfg)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _main(dcfg: DictConfig) -> None:
    from train.main import run  # heavy imports after Hydra has parsed the command line

    try:
        from hydra.core.hydra_config import HydraConfig

        from train.distill.teacher import check_teacher
        from train.init_from import resolve_init_from

        cfg = resolve_init_from(to_typed(dcfg), dcfg, HydraConfig.get().overrides.task)
        check_teacher(cfg)  # distill.teacher: readable, same vocabulary (exit 2 otherwise)
        code = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        code = ExitCode.CONFIG_ERROR
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        if code:  # one failed sweep point must not abort the others: report it and go on
            print(f"sweep job {HydraConfig.get().job.num} exited with code {code}", file=sys.stderr)
        return
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: every resource (checkpoint writer, metrics sinks,
    process group, watchers) is already closed and the cost meter has billed up to here; module
    teardown of torch alone takes ~0.5-1 s of paid, useless time per attempt."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    _main()
