"""Tests for tracer/graph/viewer.py: the pruned graph as the web viewers' JSON (DESIGN.md section 4).

Node ids, links and numbers are recomputed here from the graph's tensors: ids from the node
layout, links from `adjacency[edge_mask]`, influence by a linear solve (not a power series). The
node fields follow circuit-tracer's `circuit_tracer/frontend/graph_models.py` (`Node.feature_node`,
`error_node`, `token_node`, `logit_node`; error ids `{layer}_-1_{pos}` since its issue #78), and the
document is checked against the required fields and types of Neuronpedia's published schema.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch

from tracer.atomic import write_json
from tracer.graph.graph import Graph, LogitTarget
from tracer.graph.pruning import PruneResult
from tracer.graph.viewer import to_viewer_json
from tracer.model.replacement import ReplacementModel

# circuit-tracer writes "cross layer transcoder" for the features of every transcoder set (its
# graph_models.py has no other string); Neuronpedia's frontend finds feature nodes by it.
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}

# The required fields and types of Neuronpedia's attribution-graph schema
# (hijohnnylin/neuronpedia, apps/webapp/app/api/graph/graph-schema.json, draft-07): top level
# metadata/qParams/nodes/links; metadata requires slug, scan, prompt_tokens, prompt (node_threshold
# is a number when present); nodes require node_id, feature (integer or null), layer (string or
# integer), ctx_idx (integer), feature_type, jsNodeId, clerp (influence/activation number or null);
# links require source, target (strings) and weight (number). Tightened with circuit-tracer's
# pydantic models (frontend/graph_models.py): qParams' five fields, supernodes as lists of strings,
# a node's `feature` an int and `layer` a string, token_prob a number, is_target_logit a boolean.
NODE_SCHEMA = {
    "type": "object",
    "properties": {
        "node_id": {"type": "string"},
        "feature": {"type": "integer"},
        "layer": {"type": "string"},
        "ctx_idx": {"type": "integer"},
        "feature_type": {"enum": list(FEATURE_TYPES.values())},
        "jsNodeId": {"type": "string"},
        "clerp": {"type": "string"},
        "influence": {"type": ["number", "null"]},
        "activation": {"type": ["number", "null"]},
        "token_prob": {"type": "number"},
        "is_target_logit": {"type": "boolean"},
    },
    "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
}
GRAPH_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "metadata": {
            "type": "object",
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "node_threshold": {"type": "number"},
                "info": {"type": "object"},
            },
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
        },
        "qParams": {
            "type": "object",
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "string"}},
                },
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
            },
            "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
        },
        "nodes": {"type": "array", "items": NODE_SCHEMA},
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                },
                "required": ["source", "target", "weight"],
            },
        },
    },
    "required": ["metadata", "qParams", "nodes", "links"],
}


def cantor(x: int, y: int) -> int:
    """The Cantor pairing circuit-tracer's `Node.feature_node` numbers a feature by."""
    return (x + y) * (x + y + 1) // 2 + y


def design_node(graph: Graph, index: int) -> dict:
    """Kind, ids, feature number, layer and position of node `index`, as upstream computes them
    (DESIGN.md section 4)."""
    layout, n_pos = graph.layout, graph.n_pos
    if index < layout.n_features:
        layer, pos, feature = graph.active_features[graph.selected_features[index]].tolist()
        return dict(
            kind="feature",
            id=f"{layer}_{feature}_{pos}",
            js=f"{layer}_{feature}-0",
            feature=cantor(layer, feature),
            layer=str(layer),
            pos=pos,
        )
    index -= layout.n_features
    if index < layout.n_errors:
        layer, pos = index // n_pos, index % n_pos
        return dict(
            kind="error",
            id=f"{layer}_-1_{pos}",
            js=f"{layer}_-1-{pos}",
            feature=-1,
            layer=str(layer),
            pos=pos,
        )
    index -= layout.n_errors
    if index < layout.n_tokens:
        token = int(graph.input_tokens[index])
        return dict(
            kind="token",
            id=f"E_{token}_{index}",
            js=f"E_{token}-{index}",
            feature=index,
            layer="E",
            pos=index,
        )
    k = index - layout.n_tokens
    target = graph.logit_targets[k]
    single = len(target.token_ids) == 1 and target.weights == (1.0,)
    vocab = target.token_ids[0] if single else graph.metadata["vocab_size"] + k
    layer = graph.n_layers + 1
    return dict(
        kind="logit",
        id=f"{layer}_{vocab}_{n_pos - 1}",
        js=f"L_{vocab}-{n_pos - 1}",
        feature=vocab,
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
        assert node["jsNodeId"] == want["js"]
        assert node["feature"] == want["feature"]
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


def test_logit_nodes(document: dict, plt_graph: Graph, plt_model: ReplacementModel) -> None:
    logits = [n for n in document["nodes"] if n["feature_type"] == "logit"]
    for node, target in zip(logits, plt_graph.logit_targets, strict=True):
        token = plt_model.tokenizer.decode([target.token_ids[0]])
        assert node["clerp"] == f'Output "{token}" (p={target.probability:.3f})'
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
    assert metadata["scan"] == plt_graph.metadata["scan"]
    assert metadata["info"]["model_id"] == plt_graph.metadata["model_id"]
    embeddings = [n for n in document["nodes"] if n["feature_type"] == "embedding"]
    assert [n["clerp"] for n in embeddings] == tokens  # every token is always kept


def test_write_json_round_trips_and_leaves_no_temp(document: dict, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write_json(tmp_path / "sub" / "g.json", document)
    assert json.loads(path.read_text()) == document
    assert list(path.parent.iterdir()) == [path]


def collision_graph() -> tuple[Graph, PruneResult]:
    """A hand-made graph with a layer-0 feature whose index equals an error node's layer.

    n_layers 2, n_pos 2; nodes: feature (layer 0, pos 1, feature 1) | errors (0,0) (0,1) (1,0)
    (1,1) | tokens 0, 1 | one logit. Upstream's old error id `0_{layer}_{pos}` gave the feature
    and the layer-1 error at pos 1 the same id `0_1_1`.
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


def test_error_ids_do_not_collide_with_feature_ids() -> None:
    """Errors are `{layer}_-1_{pos}` (feature index -1 is never a feature's): the ids of the
    scheme, with no suffixes, and unique; jsNodeIds too."""
    graph, keep_all = collision_graph()
    document = to_viewer_json(graph, keep_all)
    ids = [n["node_id"] for n in document["nodes"]]
    assert ids == ["0_1_1", "0_-1_0", "0_-1_1", "1_-1_0", "1_-1_1", "E_0_0", "E_5_1", "3_7_1"]
    js = [n["jsNodeId"] for n in document["nodes"]]
    assert js == ["0_1-0", "0_-1-0", "0_-1-1", "1_-1-0", "1_-1-1", "E_0-0", "E_5-1", "L_7-1"]
    links = {(lk["source"], lk["target"]) for lk in document["links"]}
    assert links == {
        ("E_5_1", "0_1_1"),
        ("0_1_1", "3_7_1"),
        ("1_-1_1", "3_7_1"),
        ("E_5_1", "3_7_1"),
    }
    jsonschema.validate(document, GRAPH_SCHEMA)


def direction_graph(metadata: dict) -> tuple[Graph, PruneResult]:
    """Targets logit(5) - logit(6) and logit(5): one position, no features."""
    n = 2 + 1 + 2  # errors (2 layers x 1 pos) | token | two logits
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
        metadata=metadata,
    )
    keep_all = PruneResult(
        node_mask=torch.ones(n, dtype=torch.bool),
        edge_mask=adjacency != 0,
        node_influence=torch.zeros(n),
    )
    return graph, keep_all


def test_a_direction_target_gets_upstreams_virtual_vocabulary_index() -> None:
    """Upstream numbers a logit target that is not one token `vocab_size + k` (k: its place among
    the targets), so it cannot share an id with the plain target of its first token."""
    graph, keep_all = direction_graph({"vocab_size": 64})
    document = to_viewer_json(graph, keep_all)
    logits = [n for n in document["nodes"] if n["feature_type"] == "logit"]
    assert [n["node_id"] for n in logits] == ["3_64_0", "3_5_0"]
    assert [n["jsNodeId"] for n in logits] == ["L_64-0", "L_5-0"]
    assert [n["feature"] for n in logits] == [64, 5]
    assert [n["clerp"] for n in logits] == ['Output "5 - 6" (p=0.500)', 'Output "5" (p=0.400)']
    jsonschema.validate(document, GRAPH_SCHEMA)


def test_a_direction_target_without_vocab_size_is_refused() -> None:
    graph, keep_all = direction_graph({})
    with pytest.raises(ValueError, match="vocabulary size"):
        to_viewer_json(graph, keep_all)


@pytest.mark.parametrize("which", ["plt", "clt"])
def test_document_is_valid_against_the_public_schema(
    which: str, document: dict, plt_graph: Graph, clt_graph: Graph
) -> None:
    if which == "plt":
        jsonschema.validate(document, GRAPH_SCHEMA)
    else:
        jsonschema.validate(to_viewer_json(clt_graph, clt_graph.prune(0.8, 0.98)), GRAPH_SCHEMA)
    # without thresholds (an unpruned-looking call) the number-typed node_threshold is left out
    bare = to_viewer_json(plt_graph, plt_graph.prune(0.8, 0.98))
    assert "node_threshold" not in bare["metadata"]
    jsonschema.validate(bare, GRAPH_SCHEMA)
    broken = json.loads(json.dumps(document))
    broken["nodes"][0]["feature"] = None  # circuit-tracer's Node.feature is an int
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, GRAPH_SCHEMA)
