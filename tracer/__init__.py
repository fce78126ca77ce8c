"""tracer: exact attribution graphs over transcoders.

The public API, importable from `tracer` directly:

    from tracer import ReplacementModel, attribute, Graph, LogitTarget, intervene, generate

Names load on first use (a table of name -> module), so `import tracer` and `tracer --help` stay
fast and a stage that imports one engine module does not import them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # the replacement model and transcoder sets
    "ReplacementModel": "tracer.model.replacement",
    "PromptState": "tracer.model.replacement",
    "TranscoderSet": "tracer.transcoders.sets",
    "load_transcoders": "tracer.transcoders.files",
    "save_transcoders": "tracer.transcoders.files",
    # attribution and its graph
    "attribute": "tracer.attribution.attribute",
    "estimate_prompt": "tracer.attribution.estimate",
    "Graph": "tracer.graph.graph",
    "LogitTarget": "tracer.graph.graph",
    "PruneResult": "tracer.graph.pruning",
    "GraphScores": "tracer.graph.pruning",
    "prune_graph": "tracer.graph.summary",
    "PrunedGraph": "tracer.graph.summary",
    "to_viewer_json": "tracer.graph.viewer",
    # interventions and validation
    "MODES": "tracer.interventions.modes",
    "FeatureChange": "tracer.interventions.intervene",
    "ErrorChange": "tracer.interventions.intervene",
    "TokenChange": "tracer.interventions.intervene",
    "InterventionResult": "tracer.interventions.intervene",
    "Generation": "tracer.interventions.intervene",
    "intervene": "tracer.interventions.intervene",
    "generate": "tracer.interventions.intervene",
    "ablate_supernodes": "tracer.interventions.intervene",
    "validate_graph": "tracer.interventions.validation",
    "ValidationReport": "tracer.interventions.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
