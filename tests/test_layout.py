"""The architecture holds: the engine imports nothing of the experiment layer, the zoo, the entry
points or the tracking/app stacks, and the entry points do not import each other.

Statically, with the same import graph as the stage-dependency check (tests/stage_imports.py):
every import statement of every executed module counts, lazy imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.stage_imports import ImportGraph

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ("tracer/model", "tracer/transcoders", "tracer/attribution", "tracer/graph")
ENGINE += ("tracer/interventions", "tracer/features", "tracer/atomic.py", "tracer/hub.py")
ENGINE += ("tracer/memory.py",)
OUTSIDE_ENGINE = (
    "tracer/experiments/",
    "tracer/zoo/",
    "tracer/testing.py",
    "tracer/cli/",
    "pipelines/",
    "dashboards/",
)
FORBIDDEN_PACKAGES = ("mlflow", "dvc", "streamlit")


def modules_under(*paths: str) -> list[str]:
    found = []
    for path in paths:
        target = ROOT / path
        files = [target] if target.is_file() else sorted(target.rglob("*.py"))
        for file in files:
            parts = file.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def third_party(file: Path) -> set[str]:
    """Top-level names of every module `file` imports (any depth of the tree)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


GRAPH = ImportGraph(ROOT)


@pytest.mark.parametrize("module", modules_under(*ENGINE))
def test_engine_imports_only_the_engine(module: str):
    executed = GRAPH.execute(f"python -m {module}").files
    leaks = sorted(f for f in executed if f.startswith(OUTSIDE_ENGINE))
    assert not leaks, f"{module} imports, directly or not, {leaks}"
    for name in FORBIDDEN_PACKAGES:
        users = sorted(f for f in executed if name in third_party(ROOT / f))
        assert not users, f"{module} pulls in {name} through {users}"


@pytest.mark.parametrize(
    ("folder", "other"), [("pipelines", "dashboards/"), ("dashboards", "pipelines/")]
)
def test_entry_points_do_not_import_each_other(folder: str, other: str):
    for module in modules_under(folder):
        executed = GRAPH.execute(f"python -m {module}").files
        assert not [f for f in executed if f.startswith(other)], f"{module} imports {other}"


def test_the_check_sees_a_leak():
    """The import graph follows lazy imports: the CLI (outside the engine) reaches the zoo's
    settings and the experiment layer's params reach the zoo, so a rule that saw nothing would
    be vacuous."""
    cli = GRAPH.execute("python -m tracer.cli").files
    assert "tracer/zoo/config.py" in cli and "tracer/attribution/attribute.py" in cli
    params = GRAPH.execute("python -m tracer.experiments.params").files
    assert "tracer/zoo/config.py" in params
