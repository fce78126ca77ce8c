"""From a full graph to what people look at: prune, then the viewer document and the scores.

The one path that the CLI, the pipeline's prune stage, the explorer and the reports share, so a
document and the scores printed beside it always come from the same pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tracer.graph.graph import Graph
from tracer.graph.pruning import PruneResult
from tracer.graph.viewer import to_viewer_json


@dataclass(frozen=True)
class PrunedGraph:
    result: PruneResult
    document: dict  # the viewer document {metadata, qParams, nodes, links}
    scores: dict  # see `score_summary`


def score_summary(
    graph: Graph,
    result: PruneResult,
    node_threshold: float,
    edge_threshold: float,
    *,
    full: bool = True,
) -> dict:
    """Scores and sizes of the pruned graph (`pruned_*`) and, with `full`, of the full graph."""
    pruned = graph.scores(result)
    summary = {
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "pruned_replacement": pruned.replacement,
        "pruned_completeness": pruned.completeness,
        "pruned_nodes": int(result.node_mask.sum()),
        "pruned_edges": int(result.edge_mask.sum()),
    }
    if full:
        whole = graph.scores()
        summary |= {
            "replacement": whole.replacement,
            "completeness": whole.completeness,
            "nodes": graph.layout.n_nodes,
            "edges": graph.n_edges(),
            "active_features": int(graph.active_features.shape[0]),
            "selected_features": graph.layout.n_features,
        }
    return summary


def prune_graph(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    slug: str = "graph",
    tokenizer=None,
    labels: Callable[[int, int], str] | None = None,
    full_scores: bool = True,
) -> PrunedGraph:
    """Prune `graph`; its viewer document and scores (full-graph scores too with `full_scores`).

    `tokenizer` (anything with `decode(ids)`) labels tokens and logits; without it, token ids.
    `labels(layer, feature)` labels feature nodes (the document's `clerp`).
    """
    result = graph.prune(node_threshold, edge_threshold)
    document = to_viewer_json(
        graph,
        result,
        slug=slug,
        tokenizer=tokenizer,
        labels=labels,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    scores = score_summary(graph, result, node_threshold, edge_threshold, full=full_scores)
    return PrunedGraph(result=result, document=document, scores=scores)
