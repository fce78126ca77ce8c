"""dvc.yaml: every stage depends on all project code it executes, so `dvc repro` never keeps results
computed by old code. The modules a stage executes are found statically (tests/stage_imports.py);
tests/test_pipeline.py checks that DVC then reports the stages that run an edited module."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from stage_imports import ImportGraph, Stage, covers, dvc_stages, is_declarative_init

REPO = Path(__file__).resolve().parents[1]
ZOO_STAGES = ("zoo_corpus", "zoo_model", "zoo_transcoders", "zoo_showcase")
CODE = ("tracer/", "pipelines/", "dashboards/")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dvc_stages(REPO)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(REPO)


def is_zoo(stage: Stage) -> bool:
    return stage.name.split("@")[0] in ZOO_STAGES


def test_every_stage_depends_on_the_code_it_executes(stages, graph) -> None:
    missing = {}
    for stage in stages:
        required = graph.execute(stage.cmd).required(graph)
        uncovered = sorted(f for f in required if not any(covers(d, f) for d in stage.deps))
        if uncovered:
            missing[stage.name] = uncovered
    assert not missing, f"dvc.yaml: stages miss deps on code they execute: {missing}"


def test_zoo_stages_name_exactly_the_files_they_execute(stages, graph) -> None:
    """No folder, nothing extra: a change to code a zoo stage does not run must not retrain."""
    zoo = [stage for stage in stages if is_zoo(stage)]
    assert {s.name.split("@")[0] for s in zoo} == set(ZOO_STAGES)
    for stage in zoo:
        code = {dep for dep in stage.deps if dep.startswith(CODE)}
        assert code == graph.execute(stage.cmd).required(graph), stage.name


def test_every_dep_exists(stages) -> None:
    absent = sorted(
        {dep for s in stages for dep in s.deps if dep.startswith(CODE)}
        - {dep for s in stages for dep in s.deps if (REPO / dep).exists()}
    )
    assert not absent, f"dvc.yaml names code that does not exist: {absent}"
    for stage in stages:
        code = [dep for dep in stage.deps if dep.startswith(CODE)]
        twice = [d for d in code if any(covers(o, d) for o in code if o != d)]
        assert not twice, f"{stage.name}: {twice} inside a folder it also depends on"


def test_foreach_stages_are_expanded_over_params(stages) -> None:
    names = {s.name for s in stages}
    assert {"attribute@gpt2-clt", "zoo_transcoders@gemma2", "compare"} <= names
    (stage,) = [s for s in stages if s.name == "prune@gpt2-clt"]
    assert stage.cmd == "python -m pipelines.prune gpt2-clt"
    assert "outputs/graphs/gpt2-clt" in stage.deps
    assert stage.uncached == ("outputs/metrics/gpt2-clt.json", "outputs/plots/gpt2-clt.json")


# ---- the analysis itself, on a made-up project -----------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


LAZY_INIT = '''
    """The public API, imported on first use."""
    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        from tracer.heavy import Heavy

    import importlib

    _EXPORTS = {"Heavy": "tracer.heavy", "light": ".small"}
    __all__ = sorted(_EXPORTS)


    def __getattr__(name):
        if name not in _EXPORTS:
            raise AttributeError(name)
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
'''

PROJECT = {
    "tracer/__init__.py": LAZY_INIT,
    "tracer/heavy.py": "import torch\nclass Heavy: ...\n",
    "tracer/small.py": "def light(): ...\n",
    "tracer/eng/__init__.py": '"""Engine."""\n',
    "tracer/eng/core.py": (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import util\n"
        "if TYPE_CHECKING:\n    from tracer.eng.typed import T\n"
        "def run():\n    from tracer.eng.lazy import go\n    return go()\n"
    ),
    "tracer/eng/util.py": "X = 1\n",
    "tracer/eng/lazy.py": "def go(): ...\n",
    "tracer/eng/typed.py": "T = int\n",
    "tracer/busy/__init__.py": "import os\nROOT = os.getcwd()\n",
    "tracer/busy/part.py": "Y = 2\n",
    "pipelines/__init__.py": '"""Stages."""\n',
    "pipelines/one.py": "from tracer.eng.core import run\nfrom tracer.busy import part\n",
    "pipelines/two.py": "from tracer import light\n",
    "pipelines/three.py": "import tracer\n",
    "pipelines/four.py": "import importlib\nimportlib.import_module('tracer.eng.util')\n",
}


@pytest.fixture
def project(tmp_path: Path) -> ImportGraph:
    return ImportGraph(write_tree(tmp_path, PROJECT))


def test_lazy_imports_and_submodules_are_followed_type_checking_is_not(project) -> None:
    executed = project.execute("python -m pipelines.one")
    assert executed.files == {
        "pipelines/__init__.py",
        "pipelines/one.py",
        "tracer/__init__.py",
        "tracer/eng/__init__.py",
        "tracer/eng/core.py",
        "tracer/eng/util.py",  # `from . import util`: a submodule
        "tracer/eng/lazy.py",  # imported inside a function
        "tracer/busy/__init__.py",
        "tracer/busy/part.py",
    }
    # declarative packages are no dependency; one that runs code (os.getcwd()) is
    assert executed.required(project) == executed.files - {
        "pipelines/__init__.py",
        "tracer/__init__.py",
        "tracer/eng/__init__.py",
    }


def test_a_script_runs_no_package_init(project) -> None:
    executed = project.execute("python pipelines/one.py --flag")
    assert "pipelines/__init__.py" not in executed.files
    assert "pipelines/one.py" in executed.files


def test_a_lazy_export_table_is_no_dependency_until_a_name_is_taken_through_it(project) -> None:
    tree = project.tree(project.root / "tracer/__init__.py")
    assert is_declarative_init(tree)
    assert not is_declarative_init(project.tree(project.root / "tracer/busy/__init__.py"))
    assert not is_declarative_init(ast.parse("__all__ = sorted(compute())\n"))
    assert not is_declarative_init(ast.parse("ROOT = Path.cwd()\n"))
    # `from tracer import light` reads the table: the table and the module it names are deps
    taken = project.execute("python -m pipelines.two")
    assert taken.required(project) == {"pipelines/two.py", "tracer/__init__.py", "tracer/small.py"}
    # `import tracer` reaches every export as tracer.NAME
    whole = project.execute("python -m pipelines.three")
    assert whole.required(project) == {
        "pipelines/three.py",
        "tracer/__init__.py",
        "tracer/heavy.py",
        "tracer/small.py",
    }


def test_a_dynamic_import_fails_loudly(project) -> None:
    with pytest.raises(ValueError, match="dynamic import"):
        project.execute("python -m pipelines.four")


def test_an_unknown_command_fails_loudly(project) -> None:
    with pytest.raises(ValueError, match="neither"):
        project.execute("bash run.sh")


def test_foreach_expansion_and_coverage(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "params.yaml": "models:\n  a: {size: 1}\n  b: {size: 2}\n",
            "dvc.yaml": """\
                stages:
                  train:
                    foreach: ${models}
                    do:
                      cmd: python -m pipelines.train ${key}
                      deps:
                        - pipelines/train.py
                        - data/${key}
                """,
        },
    )
    assert dvc_stages(tmp_path) == [
        Stage("train@a", "python -m pipelines.train a", ("pipelines/train.py", "data/a")),
        Stage("train@b", "python -m pipelines.train b", ("pipelines/train.py", "data/b")),
    ]
    assert covers("tracer/model", "tracer/model/freezing.py")
    assert covers("tracer/model/", "tracer/model/freezing.py")
    assert not covers("tracer/mod", "tracer/model/freezing.py")
    assert covers("tracer/atomic.py", "tracer/atomic.py")
