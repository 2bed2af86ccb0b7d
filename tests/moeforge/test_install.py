"""A plain install works from any directory: the wheel, installed non-editable into a fresh venv,
trains from a directory full of clashing names (model.py, train.py, moe.py), directly and under
torchrun; and docs/install.md's own-configs example runs (docs/install.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.train.runner import FAST, REPO

DOC = (REPO / "docs" / "install.md").read_text()
# A user's own modules with our packages' names: importing any of them fails the run loudly.
CLASHING = ("model.py", "train.py", "moe.py", "bench.py")


def _copy_sources(dst: Path) -> None:
    """The repository's files as git sees them (tracked and new, not ignored): no build/ or
    outputs/ of a developer's checkout ends up in the wheel."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_symlink() or src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst / rel)
            else:
                shutil.copy2(src, dst / rel)


def _clean_env(venv_bin: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "WANDB"))}
    env.update(PATH=f"{venv_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, a working directory with clashing modules) for the installed wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv = root / "src", root / "dist", root / "venv"
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("moeforge-*.whl"))
    # A fresh venv; torch and the rest come from this test venv's site-packages through a .pth
    # line (after the new venv's own site-packages, so the wheel's packages win).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "moeforge_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = root / "project"
    work.mkdir()
    for name in CLASHING:
        (work / name).write_text(f"raise SystemExit('the user\\'s own {name} was imported instead of moeforge\\'s')\n")
    return venv / "bin", work, Path(site)


def _rows(run_dir: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_wheel_is_not_editable_and_holds_the_configs(installed):
    bin_dir, _, site = installed
    assert (site / "moeforge" / "configs" / "train.yaml").is_file()
    assert not (site / "moeforge" / "configs").is_symlink()
    assert not list(site.glob("__editable__*moeforge*"))
    p = subprocess.run([str(bin_dir / "python"), "-c", "import moeforge, train; print(moeforge.config_dir()); "
                        "print(train.__file__)"], cwd=bin_dir, env=_clean_env(bin_dir), capture_output=True,
                       text=True, check=True)
    config, train_file = p.stdout.split()
    assert config.startswith(str(site)) and train_file.startswith(str(site)), p.stdout


@pytest.mark.slow
def test_moeforge_train_from_a_directory_with_clashing_names(installed):
    bin_dir, work, _ = installed
    p = subprocess.run([str(bin_dir / "moeforge"), "train", "trainer.max_steps=3", *FAST, "run_name=direct"],
                       cwd=work, env=_clean_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert max(_rows(work / "outputs" / "direct")) == 3


@pytest.mark.slow
def test_torchrun_no_python_form_from_a_directory_with_clashing_names(installed):
    bin_dir, work, _ = installed
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "1", "--no-python", "moeforge", "train",
                        "trainer.max_steps=3", *FAST, "run_name=torchrun"],
                       cwd=work, env=_clean_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert max(_rows(work / "outputs" / "torchrun")) == 3


@pytest.mark.slow
def test_own_configs_example_of_the_doc(installed, tmp_path):
    """docs/install.md's search-path example, files and command as written, with the wheel."""
    bin_dir, _, _ = installed
    yaml_block = re.search(r"```yaml\n# (myconf/\S+)\n(.*?)```", DOC, re.S)
    path, text = yaml_block.group(1), yaml_block.group(2)
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(text)
    cmd = next(c for c in re.findall(r"```bash\n(.*?)```", DOC, re.S) if "hydra.searchpath" in c).strip()
    import shlex

    args = shlex.split(cmd)
    assert args[:2] == ["moeforge", "train"], cmd
    p = subprocess.run([str(bin_dir / "moeforge"), *args[1:], *FAST, "run_name=mine"], cwd=tmp_path,
                       env=_clean_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    config = (tmp_path / "outputs" / "mine" / "config.yaml").read_text()
    assert "name: tiny_wide" in config and "n_experts: 16" in config


def test_every_command_of_the_doc_is_run_here():
    """docs/install.md's commands: the wheel build and install are what the fixture above does;
    `moeforge train` with the search path runs in test_own_configs_example_of_the_doc; the torchrun
    line composes and validates at its world size (tests/test_docs.py's rule for multi-GPU lines)."""
    import shlex

    from tests.test_docs import _world_and_overrides
    from train.cli import CONFIG_DIR, to_typed
    from train.validate import validate_train_config

    cmds = [" ".join(c.split()) for b in re.findall(r"```bash\n(.*?)```", DOC, re.S)
            for c in b.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(cmds) == 3, cmds
    wheel, torchrun, own = cmds
    assert wheel.startswith("pip wheel --no-deps -w dist . && pip install dist/moeforge-") and wheel.endswith(".whl")
    assert own.startswith("moeforge train 'hydra.searchpath=")
    args = shlex.split(torchrun)
    assert args[0] == "torchrun" and args[args.index("--no-python") + 1:][:2] == ["moeforge", "train"]
    from hydra import compose, initialize_config_dir

    world, overrides = _world_and_overrides(args)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = to_typed(compose("train", overrides=overrides))
    validate_train_config(cfg, world_size=world)
