"""The public API: every name in `tracer.__all__` imports from `tracer` and is the engine's own."""

import importlib
import subprocess
import sys

import pytest

import tracer


def test_readme_names_import_from_the_package():
    from tracer import Graph, LogitTarget, ReplacementModel, attribute, generate, intervene

    assert Graph.__module__ == "tracer.graph.graph"
    assert ReplacementModel.__module__ == "tracer.model.replacement"
    assert callable(attribute) and callable(intervene) and callable(generate)
    assert LogitTarget.__module__ == "tracer.graph.graph"


@pytest.mark.parametrize("name", tracer.__all__)
def test_every_exported_name_resolves_to_its_module(name):
    value = getattr(tracer, name)
    module = importlib.import_module(tracer._EXPORTS[name])
    assert getattr(module, name) is value


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'attribute_graph'"):
        tracer.attribute_graph  # noqa: B018


def test_import_tracer_loads_no_torch():
    code = "import sys, tracer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
