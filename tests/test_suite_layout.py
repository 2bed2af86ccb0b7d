"""The default suite (`python -m pytest`, what CI runs) reaches every test folder: none of them is
matched by pytest's norecursedirs (its built-in default skips any folder named "dist")."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_folder_is_collected_by_default():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    patterns = ini.get("norecursedirs")
    assert patterns is not None, "without norecursedirs pytest's default skips tests/dist"
    folders = [p for p in (REPO / "tests").iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert any(p.name == "dist" for p in folders)
    skipped = [p.name for p in folders if any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert not skipped, f"norecursedirs skips tests/{skipped}"
