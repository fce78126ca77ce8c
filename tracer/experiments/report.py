"""The per-prompt score report the pipeline writes (`scores.json`) and tracking reads."""

from __future__ import annotations

from collections.abc import Sequence

from tracer.graph.graph import Graph
from tracer.graph.pruning import PruneResult


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


def prompt_report(
    graph: Graph,
    node_threshold: float,
    edge_threshold: float,
    sweep: Sequence[tuple[float, float]] = (),
    result: PruneResult | None = None,
) -> dict:
    """Scores (full and pruned), sizes and the pruning curve of one graph."""
    if result is None:
        result = graph.prune(node_threshold, edge_threshold)
    full, pruned = graph.scores(), graph.scores(result)
    return {
        "replacement": full.replacement,
        "completeness": full.completeness,
        "pruned_replacement": pruned.replacement,
        "pruned_completeness": pruned.completeness,
        "nodes": graph.layout.n_nodes,
        "edges": graph.n_edges(),
        "pruned_nodes": int(result.node_mask.sum()),
        "pruned_edges": int(result.edge_mask.sum()),
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": graph.layout.n_features,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "curve": pruning_curve(graph, sweep),
    }
