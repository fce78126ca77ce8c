"""The per-prompt score report the pipeline writes (`scores.json`) and tracking reads."""

from __future__ import annotations

from collections.abc import Sequence

from tracer.graph.graph import Graph
from tracer.graph.summary import PrunedGraph


def pruning_curve(graph: Graph, sweep: Sequence[tuple[float, float]]) -> list[dict]:
    """Pruned graph size and scores at each (node, edge) threshold pair."""
    curve = []
    for node, edge in sweep:
        result = graph.prune(node, edge)
        scores = graph.scores(result)
        curve.append(
            {
                "node_threshold": node,
                "edge_threshold": edge,
                "nodes": int(result.node_mask.sum()),
                "edges": int(result.edge_mask.sum()),
                "replacement": scores.replacement,
                "completeness": scores.completeness,
            }
        )
    return curve


def prompt_report(graph: Graph, pruned: PrunedGraph, sweep: Sequence[tuple[float, float]]) -> dict:
    """scores.json: the pruned graph's scores and sizes, the full graph's, and the pruning curve."""
    return pruned.scores | {"curve": pruning_curve(graph, sweep)}
