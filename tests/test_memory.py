"""tracer.memory: the allocator setting is a program's opt-in, never made by a library call."""

from __future__ import annotations

import ctypes

import tracer.memory
from tracer.attribution.attribute import attribute
from tracer.interventions.intervene import FeatureChange, intervene
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders


def test_library_calls_leave_the_allocator_alone(monkeypatch):
    """No mallopt (no libc loaded through ctypes) during attribution and interventions."""
    loaded = []
    real = ctypes.CDLL

    def recording_cdll(name, *args, **kwargs):
        loaded.append(str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(tracer.memory, "_done", False)  # as in a fresh process
    monkeypatch.setattr(ctypes, "CDLL", recording_cdll)
    with ReplacementModel(
        build_model("gpt2"), build_transcoders("clt", n_layers=2, d_model=32)
    ) as rm:
        attribute([5, 6, 7, 8], rm, progress=False)
        intervene(rm, [5, 6, 7, 8], [FeatureChange(1, 2, 0, value=1.0)], mode="direct")
    assert [name for name in loaded if "libc" in name] == []
    assert tracer.memory._done is False
