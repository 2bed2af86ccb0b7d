"""The house as docs/ARCHITECTURE.md draws it: arrows between top-level packages point down only,
private torch APIs live in compat/ alone, exit codes are defined once, files stay small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["compat", "moeforge", "devices", "moe", "model", "parallelism", "checkpointing", "health", "cost", "train",
            "launch", "bench"]


def _sources(pkg: str) -> list[Path]:
    return sorted(p for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(pkg: str) -> set[str]:
    """Top-level packages of ours that ``pkg`` imports (absolute imports, anywhere in a file)."""
    out = set()
    for path in _sources(pkg):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            out.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
    out.discard(pkg)
    return out


def _documented_arrows() -> dict[str, set[str]]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = {}
    for pkg, deps in re.findall(r"^\| ([a-z, ]+) \| ([^|]+) \|$", text, re.M):
        if pkg.strip() == "package":
            continue
        targets = {w for w in re.findall(r"[a-z]+", deps) if w in PACKAGES}
        if "all of the above" in deps:
            targets = set(PACKAGES[:PACKAGES.index("train")])
        if "and below" in deps:
            targets = set(PACKAGES[:PACKAGES.index("train") + 1])
        for p in pkg.split(","):
            table[p.strip()] = targets
    return table


def test_arrows_point_down_and_match_the_documented_table():
    documented = _documented_arrows()
    assert set(documented) == set(PACKAGES), sorted(set(PACKAGES) ^ set(documented))
    for pkg in PACKAGES:
        actual = _imports(pkg)
        below = set(PACKAGES[:PACKAGES.index(pkg)])
        if pkg == "bench":
            below.discard("launch")
        assert actual <= below, f"{pkg} imports {sorted(actual - below)}: an upward or sideways arrow"
        if pkg in ("train", "launch", "bench"):
            assert actual <= documented[pkg], (pkg, sorted(actual - documented[pkg]))
        else:
            assert actual == documented[pkg], f"{pkg}: code {sorted(actual)}, ARCHITECTURE.md {sorted(documented[pkg])}"


PRIVATE_TORCH = re.compile(r"torch\._[a-zA-Z]|\._local_tensor\b|_functional_collectives|_fsspec_filesystem|"
                           r"\._foreach_|torch\.distributed\._")


def test_private_torch_symbols_only_in_the_shim():
    offenders = []
    for pkg in PACKAGES:
        if pkg == "compat":
            continue
        for path in _sources(pkg):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE_TORCH.search(code) and not code.lstrip().startswith(('"', "'")):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_exit_codes_75_to_78_defined_once():
    hits = []
    for pkg in PACKAGES:
        for path in _sources(pkg):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in (75, 76, 77, 78) and type(node.value) is int:
                    hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert all(h.startswith("health/exit_codes.py:") for h in hits), hits
    assert len(hits) == 4, hits


def test_no_source_file_over_500_lines():
    long = [f"{p.relative_to(REPO)} ({n})" for pkg in PACKAGES for p in _sources(pkg)
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_no_package_holds_more_than_a_quarter_of_the_code():
    sizes = {pkg: sum(len(p.read_text().splitlines()) for p in _sources(pkg)) for pkg in PACKAGES}
    total = sum(sizes.values())
    assert max(sizes.values()) <= 0.26 * total, sizes


def test_no_untyped_config_sections_below_train():
    pattern = re.compile(r"\b(\w*cfg|config|section|ds|ctx)\s*:\s*Any\b")
    offenders = [f"{p.relative_to(REPO)}:{i}" for pkg in ("checkpointing", "parallelism", "health", "cost")
                 for p in _sources(pkg) for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders
