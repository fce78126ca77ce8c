"""Subgraphs (tracer/experiments/subgraphs.py): editing, the file format, node ids of the full
graph, and subgraph scores against `Graph.scores` with masks built here from the node layout."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tracer.experiments.subgraphs import (
    Subgraph,
    load_subgraph,
    node_indices,
    save_subgraph,
    subgraph_files,
    subgraph_scores,
    subgraphs_dir,
)
from tracer.graph.graph import Graph
from tracer.graph.viewer import node_ids


def index_of(graph: Graph, node_id: str) -> int:
    """A node id's index, from the layout `[features | errors | tokens | logits]` directly."""
    layout = graph.layout
    first, _, rest = node_id.partition("_")
    if first == "E":
        return layout.n_features + layout.n_errors + int(rest.split("_")[1])
    layer, feature, pos = map(int, node_id.split("_"))
    if feature == -1:
        return layout.n_features + layer * graph.n_pos + pos
    if layer == graph.n_layers + 1:
        raise AssertionError("logit ids are not looked up here")
    rows = graph.active_features[graph.selected_features].tolist()
    return rows.index([layer, pos, feature])


def independent_scores(graph: Graph, pinned: list[int]):
    """Graph.scores with the node mask (pinned + tokens + logits) and every edge between kept
    nodes, as a pruning result would give them."""
    layout = graph.layout
    keep = torch.zeros(layout.n_nodes, dtype=torch.bool)
    keep[pinned] = True
    keep[layout.token_slice] = True
    keep[layout.logit_slice] = True
    edges = keep[:, None] & keep[None, :] & (graph.adjacency_matrix != 0)
    return graph.scores(SimpleNamespace(node_mask=keep, edge_mask=edges))


@pytest.mark.parametrize("which", ["plt_graph", "clt_graph"])
def test_node_ids_are_the_viewer_documents(request, which: str):
    graph = request.getfixturevalue(which)
    ids = node_ids(graph)
    assert len(ids) == len(set(ids)) == graph.layout.n_nodes
    document = graph_document(graph, 1.0, 1.0)
    kept = graph.prune(1.0, 1.0).node_mask.nonzero().flatten().tolist()
    assert [n["node_id"] for n in document["nodes"]] == [ids[i] for i in kept]
    for node_id in ids[: graph.layout.n_nodes - graph.layout.n_logits]:
        assert node_indices(graph, [node_id]) == [index_of(graph, node_id)]


def graph_document(graph: Graph, node_threshold: float, edge_threshold: float) -> dict:
    from tracer.graph.viewer import to_viewer_json

    return to_viewer_json(graph, graph.prune(node_threshold, edge_threshold))


@pytest.mark.parametrize("which", ["plt_graph", "clt_graph"])
def test_subgraph_scores_equal_graph_scores_on_the_same_nodes(request, which: str):
    graph = request.getfixturevalue(which)
    layout = graph.layout
    ids = node_ids(graph)
    influence = graph.node_influence()[: layout.n_features + layout.n_errors]
    strongest = influence.argsort(descending=True).tolist()
    for count in (0, 1, 3, 10, len(strongest)):
        chosen = [ids[i] for i in strongest[:count]]
        mine = subgraph_scores(graph, Subgraph(pinned=tuple(chosen)))
        reference = independent_scores(graph, [index_of(graph, n) for n in chosen])
        assert mine.replacement == pytest.approx(reference.replacement, abs=1e-6)
        assert mine.completeness == pytest.approx(reference.completeness, abs=1e-6)
    # every feature and error pinned: the whole graph
    assert mine.replacement == pytest.approx(graph.scores().replacement, abs=1e-6)
    assert mine.completeness == pytest.approx(graph.scores().completeness, abs=1e-6)


def test_editing_keeps_supernodes_within_the_pinned_nodes():
    subgraph = Subgraph().pin(["a", "b", "c"])
    grouped = subgraph.group("Texas", ["a", "b"]).group("capital", ["c", "d"])
    assert grouped.pinned == ("a", "b", "c", "d")
    assert grouped.supernodes == (("Texas", ("a", "b")), ("capital", ("c", "d")))
    # a node belongs to one supernode: regrouping moves it
    moved = grouped.group("capital", ["b", "c"])
    assert dict(moved.supernodes) == {"Texas": ("a",), "capital": ("b", "c")}
    gone = moved.unpin(["a"])
    assert gone.pinned == ("b", "c", "d") and dict(gone.supernodes) == {"capital": ("b", "c")}
    assert gone.ungroup("capital").supernodes == ()
    with pytest.raises(ValueError, match="not pinned"):
        Subgraph(pinned=("a",), supernodes=(("x", ("b",)),))
    with pytest.raises(ValueError, match="no members"):
        Subgraph().group("empty", [])
    with pytest.raises(ValueError, match="subgraph name must be"):
        Subgraph().renamed("../escape")


def test_files_round_trip_in_the_viewer_conventions(tmp_path: Path, plt_graph: Graph):
    ids = node_ids(plt_graph)
    subgraph = Subgraph("my circuit", (ids[0], ids[1], ids[2])).group("pair", [ids[1], ids[2]])
    path = save_subgraph(tmp_path, "prof", "prompt", subgraph)
    assert path == subgraphs_dir(tmp_path, "prof", "prompt") / "my circuit.json"
    assert subgraph_files(tmp_path, "prof", "prompt") == [path]
    assert subgraph_files(tmp_path, "prof", "other") == []
    document = json.loads(path.read_text())
    assert document["qParams"] == {
        "pinnedIds": [ids[0], ids[1], ids[2]],
        "supernodes": [["pair", ids[1], ids[2]]],
    }
    assert (document["name"], document["profile"], document["prompt"]) == (
        "my circuit",
        "prof",
        "prompt",
    )
    assert load_subgraph(path, set(ids)) == subgraph


def test_bad_subgraph_files_name_what_is_wrong(tmp_path: Path, plt_graph: Graph):
    ids = set(node_ids(plt_graph))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"qParams": {"pinnedIds": ["0_999999_1", "E_1_99"]}}))
    with pytest.raises(ValueError, match=r"bad.json: 2 node id\(s\) are not nodes.*0_999999_1"):
        load_subgraph(path, ids)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON subgraph"):
        load_subgraph(path)
    path.write_text(json.dumps({"qParams": {"supernodes": [["only a name"]]}}))
    with pytest.raises(ValueError, match=r"\[name, node_id"):
        load_subgraph(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        load_subgraph(path)
    # the web viewer's URL form of pinnedIds (comma-joined) and members pinned implicitly
    some = sorted(ids)[:3]
    path.write_text(
        json.dumps({"qParams": {"pinnedIds": ",".join(some[:2]), "supernodes": [["g", some[2]]]}})
    )
    assert load_subgraph(path, ids).pinned == tuple(some)
