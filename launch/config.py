"""Compose the trainer's config exactly as ``python -m train`` would, and derive its RUN_DIR.

The launcher never invents a run directory: it composes the same Hydra tree (train.cli.CONFIG_DIR)
with the same overrides, converts it to the typed config (train.cli.to_typed), validates it
(a config error is exit 2 here, before anything is submitted), and asks train.run_dir for the
name and directory. Every attempt of the job exports that one RUN_DIR, so auto-resume finds the
checkpoints whatever restarted it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    from train.config import TrainConfig


class LaunchConfigError(Exception):
    """Bad launcher arguments or trainer overrides: exit 2, nothing submitted."""


@dataclass
class Composed:
    cfg: "TrainConfig"
    overrides: List[str]  # what the job passes to `python -m train` (launcher additions included)
    run_name: str
    run_dir: str  # absolute


def _has_key(overrides: Sequence[str], key: str) -> bool:
    for o in overrides:
        k = o.lstrip("+~").split("=", 1)[0]
        if k == key:
            return True
    return False


def cluster_config_exists(name: str) -> bool:
    from train.cli import CONFIG_DIR

    return os.path.exists(os.path.join(CONFIG_DIR, "cluster", f"{name}.yaml"))


def compose(overrides: Sequence[str], *, run_dir: Optional[str] = None, instance_type: str = "",
            nodes: Optional[int] = None, cwd: Optional[str] = None) -> Composed:
    """Compose ``configs/train.yaml`` with ``overrides`` (plus what the launcher adds) and derive the
    run directory as the trainer will.

    - ``instance_type``: adds ``cluster=<type>`` when configs/cluster/<type>.yaml exists and the
      overrides do not already pick a cluster.
    - ``nodes``: adds ``cluster.nodes=N`` (the cost meter bills every node) unless given.
    - ``run_dir``: an explicit directory; the job gets ``output_dir=<parent> run_name=<basename>``
      so the checkpoints (``<checkpoint.root or parent>/<run_name>``) land in it too.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moe.config import ConfigError
    from train.cli import CONFIG_DIR, to_typed  # registers the typed schema with the ConfigStore
    from train.run_dir import run_name as derive_name
    from train.validate import validate_train_config

    cwd = os.path.abspath(cwd or os.getcwd())
    ov = list(overrides)
    if instance_type and not _has_key(ov, "cluster") and cluster_config_exists(instance_type):
        ov.append(f"cluster={instance_type}")
    if nodes is not None and not _has_key(ov, "cluster.nodes"):
        ov.append(f"cluster.nodes={int(nodes)}")
    if run_dir:
        rd = os.path.normpath(os.path.join(cwd, run_dir))
        ov = [o for o in ov if not (_has_key([o], "output_dir") or _has_key([o], "run_name"))]
        ov += [f"output_dir={os.path.dirname(rd)}", f"run_name={os.path.basename(rd)}"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            dcfg = hydra_compose(config_name="train", overrides=ov)
        cfg = to_typed(dcfg)
        validate_train_config(cfg)
    except (HydraException, OmegaConfBaseException, ConfigError, ValueError) as e:
        raise LaunchConfigError(f"config error: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    name = derive_name(cfg)
    # The trainer: RUN_DIR if set, else output_dir/run_name relative to its working directory,
    # which is the launcher's (sbatch --chdir, the pod's workingDir). An inherited RUN_DIR is
    # ignored here on purpose: the launcher is the one that sets it.
    rd = os.path.normpath(os.path.join(cwd, cfg.output_dir, name))
    return Composed(cfg=cfg, overrides=ov, run_name=name, run_dir=rd)
