"""The default suite (`python -m pytest`, what CI runs) reaches every test folder: none of them is
matched by pytest's norecursedirs (its built-in default skips any folder named "dist"). What it
leaves to `-m soak` is documented, each with the default-suite test that samples or covers it."""

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


def _soak_tests() -> dict[str, str]:
    """Every test function marked soak (as a whole or in one parametrize case): name -> file."""
    import ast

    found = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if any("mark.soak" in ast.unparse(d) for d in node.decorator_list):
                    found[node.name] = str(path.relative_to(REPO))
    return found


def test_every_soak_test_is_documented_with_its_default_sample():
    """docs/resilience.md ("Soak trials") names every soak test, and says what the default suite
    runs in its place: moving a test to soak is a documented decision, not a silent one."""
    doc = (REPO / "docs" / "resilience.md").read_text()
    section = doc.split("## Soak trials", 1)[1]
    soak = _soak_tests()
    assert soak, "no soak tests found: the marker or this scan changed"
    missing = {n: f for n, f in soak.items() if f"`{n}" not in section}
    assert not missing, f"soak tests missing from docs/resilience.md, Soak trials: {missing}"
