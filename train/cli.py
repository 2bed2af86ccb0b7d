"""`python -m train`: compose the Hydra config into typed dataclasses and run."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from health.exit_codes import ExitCode
from moe.config import ConfigError
from moeforge import config_dir
from train.config import TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)

# Through the installed package (importlib.resources), never a path relative to this file: a wheel
# ships the tree as moeforge's package data (moeforge/__init__.py).
CONFIG_DIR = config_dir()


def to_typed(dcfg: DictConfig) -> TrainConfig:
    from train.strict import check_known_keys

    check_known_keys(dcfg, TrainConfig)  # a `+key=...` Hydra accepted into a typed node
    return OmegaConf.to_object(dcfg)


_STATE = {"task_started": False}


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _main(dcfg: DictConfig) -> None:
    _STATE["task_started"] = True
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
    try:
        _main()
    except (SystemExit, Exception) as e:
        # Hydra reports a bad override or composition itself (exit 1, before our task runs): a
        # config error, which is exit 2 for launchers, with the fix for an unknown key.
        code = e.code if isinstance(e, SystemExit) else 1
        if _STATE["task_started"] or code in (0, None) or not _is_config_error(sys.argv[1:]):
            raise
        if not isinstance(e, SystemExit):
            print(f"config error: {e}", file=sys.stderr)
        _exit_now(ExitCode.CONFIG_ERROR)


def _is_config_error(argv: list) -> bool:
    """Whether Hydra's failure was the config's: an unknown key (the fix is printed) or overrides
    that do not compose."""
    from hydra._internal.utils import get_args_parser
    from train.strict import override_hints

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return False
    hints = override_hints(args.overrides, TrainConfig)
    for hint in hints:
        print(f"config error: {hint}", file=sys.stderr)
    if hints:
        return True
    if args.multirun or args.config_dir or args.config_name:
        return False  # sweep syntax and user trees: leave Hydra's verdict as it is
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            compose("train", overrides=args.overrides)
    except (HydraException, OmegaConfBaseException):
        return True
    return False
