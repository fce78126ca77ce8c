"""Tests for tracer/graph/viewer.py: the pruned graph as the web viewers' JSON (DESIGN.md section 4).

Node ids, links and numbers are recomputed here from the graph's tensors: ids from the node
layout, links from `adjacency[edge_mask]`, influence by a linear solve (not a power series).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tracer.graph.graph import Graph, LogitTarget
from tracer.graph.pruning import PruneResult
from tracer.graph.viewer import to_viewer_json, write_json
from tracer.model.replacement import ReplacementModel

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}


def design_node(graph: Graph, index: int) -> dict:
    """Kind, id, layer and position of node `index`, as DESIGN.md section 4 defines them."""
    layout, n_pos = graph.layout, graph.n_pos
    if index < layout.n_features:
        layer, pos, feature = graph.active_features[graph.selected_features[index]].tolist()
        return dict(kind="feature", id=f"{layer}_{feature}_{pos}", layer=str(layer), pos=pos)
    index -= layout.n_features
    if index < layout.n_errors:
        layer, pos = index // n_pos, index % n_pos
        return dict(kind="error", id=f"0_{layer}_{pos}", layer=str(layer), pos=pos)
    index -= layout.n_errors
    if index < layout.n_tokens:
        token = int(graph.input_tokens[index])
        return dict(kind="token", id=f"E_{token}_{index}", layer="E", pos=index)
    target = graph.logit_targets[index - layout.n_tokens]
    layer = graph.n_layers + 1
    return dict(
        kind="logit",
        id=f"{layer}_{target.token_ids[0]}_{n_pos - 1}",
        layer=str(layer),
        pos=n_pos - 1,
    )


def solved_influence(graph: Graph) -> torch.Tensor:
    """w (B + B^2 + ...) = w B (I - B)^-1, by a float64 linear solve."""
    absolute = graph.adjacency_matrix.double().abs()
    sums = absolute.sum(dim=1, keepdim=True)
    b = absolute / torch.where(sums == 0, 1, sums)
    w = graph.logit_weights().double()
    eye = torch.eye(b.shape[0], dtype=torch.float64)
    return torch.linalg.solve((eye - b).T, b.T @ w)


@pytest.fixture(scope="module")
def pruned(plt_graph: Graph) -> PruneResult:
    return plt_graph.prune(0.8, 0.98)


@pytest.fixture(scope="module")
def document(plt_graph: Graph, pruned: PruneResult, plt_model: ReplacementModel) -> dict:
    return to_viewer_json(
        plt_graph,
        pruned,
        slug="tiny",
        tokenizer=plt_model.tokenizer,
        node_threshold=0.8,
        edge_threshold=0.98,
    )


def kept_indices(result: PruneResult) -> list[int]:
    return result.node_mask.nonzero(as_tuple=True)[0].tolist()


def test_document_shape_and_json(document: dict) -> None:
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    text = json.dumps(document, allow_nan=False)
    assert json.loads(text) == document
    assert set(document["qParams"]) >= {"pinnedIds", "supernodes", "linkType", "clickedId"}


def test_only_kept_nodes_with_design_ids(
    document: dict, plt_graph: Graph, pruned: PruneResult
) -> None:
    kept = kept_indices(pruned)
    assert 0 < len(kept) < plt_graph.layout.n_nodes
    expected = [design_node(plt_graph, i) for i in kept]
    nodes = document["nodes"]
    assert sorted(n["node_id"] for n in nodes) == sorted(e["id"] for e in expected)
    by_id = {n["node_id"]: n for n in nodes}
    assert len(by_id) == len(nodes), "node ids must be unique"
    for want in expected:
        node = by_id[want["id"]]
        assert node["feature_type"] == FEATURE_TYPES[want["kind"]]
        assert node["layer"] == want["layer"]
        assert node["ctx_idx"] == want["pos"]
        assert node["jsNodeId"] == node["node_id"]
        assert isinstance(node["clerp"], str)
    kinds = {n["feature_type"] for n in nodes}
    assert kinds == set(FEATURE_TYPES.values())  # the pruned tiny graph keeps every kind


def test_node_numbers(document: dict, plt_graph: Graph, pruned: PruneResult) -> None:
    influence = solved_influence(plt_graph)
    scale = float(influence.max())
    for index, node in zip(kept_indices(pruned), document["nodes"], strict=True):
        assert node["node_id"] == design_node(plt_graph, index)["id"]
        assert math.isclose(node["influence"], float(influence[index]), abs_tol=1e-5 * scale)
        if index < plt_graph.layout.n_features:
            active = plt_graph.selected_features[index]
            assert node["activation"] == float(plt_graph.activation_values[active])
        else:
            assert node["activation"] is None


def test_links_are_the_kept_nonzero_edges(
    document: dict, plt_graph: Graph, pruned: PruneResult
) -> None:
    ids = {i: design_node(plt_graph, i)["id"] for i in kept_indices(pruned)}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    expected = {}
    for t, s in zip(targets.tolist(), sources.tolist(), strict=True):
        weight = float(plt_graph.adjacency_matrix[t, s])
        if weight != 0:
            expected[(ids[s], ids[t])] = weight
    links = document["links"]
    node_ids = {n["node_id"] for n in document["nodes"]}
    assert all(link["source"] in node_ids and link["target"] in node_ids for link in links)
    got = {(link["source"], link["target"]): link["weight"] for link in links}
    assert len(got) == len(links) == len(expected) > 0
    assert got == expected
    kept_edges = plt_graph.adjacency_matrix[pruned.edge_mask]
    assert sorted(link["weight"] for link in links) == sorted(kept_edges[kept_edges != 0].tolist())


def test_logit_nodes(document: dict, plt_graph: Graph) -> None:
    logits = [n for n in document["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(plt_graph.logit_targets)
    assert sum(n["is_target_logit"] for n in document["nodes"]) == 1
    top = plt_graph.logit_targets[0]
    target = next(n for n in document["nodes"] if n["is_target_logit"])
    assert target["node_id"] == f"{plt_graph.n_layers + 1}_{top.token_ids[0]}_{plt_graph.n_pos - 1}"
    probabilities = {
        f"{plt_graph.n_layers + 1}_{t.token_ids[0]}_{plt_graph.n_pos - 1}": t.probability
        for t in plt_graph.logit_targets
    }
    assert {n["node_id"]: n["token_prob"] for n in logits} == probabilities
    assert all(n["token_prob"] == 0 for n in document["nodes"] if n["feature_type"] != "logit")


def test_metadata(document: dict, plt_graph: Graph, plt_model: ReplacementModel) -> None:
    metadata = document["metadata"]
    tokens = [plt_model.tokenizer.decode([t]) for t in plt_graph.input_tokens.tolist()]
    assert metadata["prompt_tokens"] == tokens
    assert metadata["prompt"] == plt_graph.input_string
    assert metadata["slug"] == "tiny"
    assert (metadata["node_threshold"], metadata["edge_threshold"]) == (0.8, 0.98)
    assert metadata["info"]["model_id"] == plt_graph.metadata["model_id"]
    embeddings = [n for n in document["nodes"] if n["feature_type"] == "embedding"]
    assert [n["clerp"] for n in embeddings] == tokens  # every token is always kept


def test_write_json_round_trips_and_leaves_no_temp(document: dict, tmp_path: Path) -> None:
    path = write_json(document, tmp_path / "sub" / "g.json")
    assert json.loads(path.read_text()) == document
    assert list(path.parent.iterdir()) == [path]


def collision_graph() -> tuple[Graph, PruneResult]:
    """A hand-made graph with a layer-0 feature whose index equals an error node's layer.

    n_layers 2, n_pos 2; nodes: feature (layer 0, pos 1, feature 1) | errors (0,0) (0,1) (1,0)
    (1,1) | tokens 0, 1 | one logit. Feature `0_1_1` and the layer-1 error at pos 1 (`0_1_1`).
    """
    n = 1 + 4 + 2 + 1
    adjacency = torch.zeros(n, n)
    adjacency[0, 6] = 1.0  # token 1 -> feature
    adjacency[7, 0] = 2.0  # feature -> logit
    adjacency[7, 4] = 0.5  # error (layer 1, pos 1) -> logit
    adjacency[7, 6] = 0.25  # token 1 -> logit
    graph = Graph(
        adjacency_matrix=adjacency,
        active_features=torch.tensor([[0, 1, 1]]),
        activation_values=torch.tensor([1.5]),
        selected_features=torch.tensor([0]),
        logit_targets=[LogitTarget.token(7, 0.9)],
        input_tokens=torch.tensor([0, 5]),
        input_string=None,
        n_layers=2,
    )
    keep_all = PruneResult(
        node_mask=torch.ones(n, dtype=torch.bool),
        edge_mask=adjacency != 0,
        node_influence=torch.zeros(n),
    )
    return graph, keep_all


def test_node_ids_are_unique_even_for_colliding_nodes() -> None:
    """DESIGN's (and upstream circuit-tracer's) error id `0_{layer}_{pos}` equals the id of the
    layer-0 feature number `layer` at the same position; the later node gets a `~1` suffix."""
    graph, keep_all = collision_graph()
    document = to_viewer_json(graph, keep_all)
    ids = [n["node_id"] for n in document["nodes"]]
    assert len(set(ids)) == len(ids)


def test_logit_ids_are_unique_for_a_direction_and_its_first_token() -> None:
    """Targets logit(5) - logit(6) and logit(5) would both get `{n_layers + 1}_5_{pos}`."""
    n = 2 + 1 + 2  # errors (2 layers x 1 pos) | token | two logits; one pos, no features
    adjacency = torch.zeros(n, n)
    adjacency[3:, 2] = torch.tensor([1.0, 0.5])  # the token -> both logits
    graph = Graph(
        adjacency_matrix=adjacency,
        active_features=torch.zeros(0, 3, dtype=torch.long),
        activation_values=torch.zeros(0),
        selected_features=torch.zeros(0, dtype=torch.long),
        logit_targets=[LogitTarget("5 - 6", (5, 6), (1.0, -1.0), 0.5), LogitTarget.token(5, 0.4)],
        input_tokens=torch.tensor([0]),
        input_string=None,
        n_layers=2,
    )
    keep_all = PruneResult(
        node_mask=torch.ones(n, dtype=torch.bool),
        edge_mask=adjacency != 0,
        node_influence=torch.zeros(n),
    )
    ids = [node["node_id"] for node in to_viewer_json(graph, keep_all)["nodes"]]
    assert len(set(ids)) == len(ids)
