"""The per-prompt report: its numbers are the graph's own, and the curve agrees with them."""

import torch

from tracer.experiments.report import prompt_report
from tracer.graph.summary import prune_graph


def test_report_matches_the_graph(plt_graph):
    report = prompt_report(plt_graph, prune_graph(plt_graph, 0.8, 0.98), [(0.5, 0.9), (0.8, 0.98)])
    result = plt_graph.prune(0.8, 0.98)
    assert report["pruned_nodes"] == int(result.node_mask.sum())
    assert report["pruned_edges"] == int(result.edge_mask.sum())
    assert report["edges"] == int(torch.count_nonzero(plt_graph.adjacency_matrix))
    assert report["active_features"] == plt_graph.active_features.shape[0]
    at_default = report["curve"][1]
    assert (at_default["nodes"], at_default["edges"]) == (
        report["pruned_nodes"],
        report["pruned_edges"],
    )
    assert at_default["replacement"] == report["pruned_replacement"]
    assert report["curve"][0]["nodes"] <= at_default["nodes"]  # looser thresholds keep fewer nodes
