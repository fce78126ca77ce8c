"""Viewer documents in the dashboard (dashboards/documents.py): re-pruning, links, comparisons,
checked against `Graph.prune`'s masks and against set computations on the pipeline's JSON files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_dashboard_outputs import PROFILES, PROMPTS, SWEEP, THRESHOLDS, built_outputs

from dashboards import catalog, documents
from tracer.graph.graph import Graph

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


def load(root: Path, profile: str, prompt: str) -> tuple[Graph, dict, dict]:
    graph = Graph.load(catalog.graph_file(root, profile, prompt))
    return (
        graph,
        catalog.read_document(root, profile, prompt),
        catalog.read_scores(root, profile, prompt),
    )


def expected_node_keys(graph: Graph, node_mask) -> Counter:
    """(kind, layer, position, feature) of every kept node, from the graph's tensors and the mask
    in the node order [features | errors (layer-major) | tokens | logits]."""
    layout = graph.layout
    keys = Counter()
    selected = graph.active_features[graph.selected_features].tolist()
    for index in node_mask.nonzero().flatten().tolist():
        if index < layout.n_features:
            layer, pos, feature = selected[index]
            keys[("feature", str(layer), pos, feature)] += 1
        elif index < layout.n_features + layout.n_errors:
            layer, pos = divmod(index - layout.n_features, graph.n_pos)
            keys[("error", str(layer), pos, None)] += 1
        elif index < layout.n_nodes - layout.n_logits:
            pos = index - layout.n_features - layout.n_errors
            keys[("token", "E", pos, pos)] += 1
        else:
            target = graph.logit_targets[index - (layout.n_nodes - layout.n_logits)]
            keys[("logit", str(graph.n_layers + 1), graph.n_pos - 1, target.token_ids[0])] += 1
    return keys


def document_node_keys(document: dict) -> Counter:
    """(kind, layer, position, feature index / position / token id) of every node."""
    keys = Counter()
    for n in document["nodes"]:
        kind = documents.node_kind(n)
        which = {"feature": documents.feature_index(n), "error": None}.get(kind, n["feature"])
        keys[(kind, n["layer"], n["ctx_idx"], which)] += 1
    return keys


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pruning_at_the_pipeline_thresholds_gives_the_pipeline_document(root: Path, profile):
    for prompt in PROMPTS:
        graph, stored, scores = load(root, profile, prompt)
        tokens = documents.prompt_tokens(stored)
        document, summary = documents.prune_document(graph, *THRESHOLDS, tokens)
        assert document["nodes"] == stored["nodes"]
        assert document["links"] == stored["links"]
        assert document["metadata"]["prompt_tokens"] == stored["metadata"]["prompt_tokens"]
        for key, value in summary.items():
            assert value == pytest.approx(scores[key], abs=1e-6), key


@pytest.mark.parametrize("thresholds", [(0.5, 0.9), (0.9, 0.99), (0.95, 0.995)])
def test_repruning_keeps_exactly_what_graph_prune_keeps(root: Path, thresholds):
    graph, stored, _ = load(root, "tiny-clt", "mary")
    document, summary = documents.prune_document(
        graph, *thresholds, documents.prompt_tokens(stored)
    )
    result = graph.prune(*thresholds)
    assert document_node_keys(document) == expected_node_keys(graph, result.node_mask)
    kept_weights = sorted(graph.adjacency_matrix[result.edge_mask].tolist())
    assert sorted(link["weight"] for link in document["links"]) == pytest.approx(kept_weights)
    scores = graph.scores(result)
    assert summary == {
        "node_threshold": thresholds[0],
        "edge_threshold": thresholds[1],
        "pruned_replacement": pytest.approx(scores.replacement),
        "pruned_completeness": pytest.approx(scores.completeness),
        "pruned_nodes": int(result.node_mask.sum()),
        "pruned_edges": int(result.edge_mask.sum()),
    }
    token_labels = {n["ctx_idx"]: n["clerp"] for n in document["nodes"] if n["layer"] == "E"}
    tokens = stored["metadata"]["prompt_tokens"]
    assert token_labels == {pos: tokens[pos] for pos in token_labels}


def test_strongest_links_are_the_largest_by_magnitude(root: Path):
    _, document, _ = load(root, "tiny-plt", "dallas")
    busiest = Counter(link["target"] for link in document["links"]).most_common(1)[0][0]
    incoming, outgoing = documents.strongest_links(document, busiest, k=3)
    expected = sorted(
        (lk for lk in document["links"] if lk["target"] == busiest),
        key=lambda lk: -abs(lk["weight"]),
    )[:3]
    assert [(r["node_id"], r["weight"]) for r in incoming] == [
        (lk["source"], lk["weight"]) for lk in expected
    ]
    expected_out = [lk for lk in document["links"] if lk["source"] == busiest]
    assert len(outgoing) == min(3, len(expected_out))
    assert all(r["description"] for r in incoming + outgoing)


def test_node_table_and_descriptions(root: Path):
    _, document, _ = load(root, "tiny-clt", "dallas")
    rows = documents.node_table(document)
    assert sorted(r["node_id"] for r in rows) == sorted(n["node_id"] for n in document["nodes"])
    tokens = document["metadata"]["prompt_tokens"]
    for row in rows:
        if row["kind"] in ("feature", "error", "token"):
            assert repr(tokens[row["ctx_idx"]]) in row["description"]
        if row["kind"] == "feature":
            index = row["node_id"].split("_")[1]  # ids are {layer}_{feature}_{pos}
            assert f"L{row['layer']} #{index} @" in row["description"]
    logits = [r for r in rows if r["kind"] == "logit"]
    assert logits and all(r["description"].startswith('Output "') for r in logits)
    features = [r["influence"] for r in rows if r["kind"] != "logit"]
    assert features == sorted(features, reverse=True)


def test_shared_nodes_equal_a_set_computation_on_the_two_files(root: Path):
    _, doc_a, _ = load(root, "tiny-clt", "dallas")
    _, doc_b, _ = load(root, "tiny-plt", "dallas")
    rows = {r["kind"]: r for r in documents.shared_nodes(doc_a, doc_b)}
    by_type = {
        "token": "embedding",
        "error": "mlp reconstruction error",
        "logit": "logit",
    }
    for kind, row in rows.items():
        a, b = (
            {
                n["node_id"]
                for n in doc["nodes"]
                if kind == "all"
                or n["feature_type"] == by_type.get(kind)
                or (kind == "feature" and n["feature_type"] not in by_type.values())
            }
            for doc in (doc_a, doc_b)
        )
        assert (row["a"], row["b"], row["shared"]) == (len(a), len(b), len(a & b)), kind
        assert (row["only_a"], row["only_b"]) == (len(a - b), len(b - a))
        assert row["jaccard"] == (len(a & b) / len(a | b) if a | b else None)
    assert rows["token"]["shared"] > 0  # the same model and prompt: token nodes coincide
    same = {r["kind"]: r for r in documents.shared_nodes(doc_a, doc_a)}
    assert same["all"]["jaccard"] == 1 and same["all"]["only_a"] == 0


def test_score_deltas_are_b_minus_a(root: Path):
    _, _, scores_a = load(root, "tiny-clt", "mary")
    _, _, scores_b = load(root, "tiny-plt", "mary")
    rows = documents.score_deltas(scores_a, scores_b)
    assert [r["key"] for r in rows] == [key for key, _ in documents.SCORE_ROWS]
    for row in rows:
        assert row["a"] == scores_a[row["key"]] and row["b"] == scores_b[row["key"]]
        assert row["b_minus_a"] == pytest.approx(scores_b[row["key"]] - scores_a[row["key"]])
    assert len(scores_a["curve"]) == len(SWEEP)
