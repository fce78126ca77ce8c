"""The Graph page's subgraph tools (pin, group into supernodes, live scores, save and load) and its
readable drawing (labels where there is room, a message for graphs too big to draw), headless on the
tiny outputs folder. Scores are checked against `Graph.scores` with masks built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dashboard_app import metrics, open_app, widget
from test_dashboard_outputs import built_outputs
from test_subgraphs import independent_scores, index_of

from dashboards import catalog, layout
from dashboards.charts import graph_chart
from dashboards.layout import drawn_labels, node_positions
from tracer.experiments.subgraphs import subgraph_files, subgraphs_dir
from tracer.graph.graph import Graph

PROFILE, PROMPT = "tiny-clt", "dallas"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


@pytest.fixture
def outputs(tmp_path: Path, root: Path) -> Path:
    """A copy of the outputs (subgraphs are saved beside it: each test gets its own)."""
    import shutil

    copy = tmp_path / "outputs"
    shutil.copytree(root, copy)
    return copy


def strongest_features(document: dict, count: int) -> list[str]:
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    features.sort(key=lambda n: -n["influence"])
    return [n["node_id"] for n in features[:count]]


def shown_subgraph_scores(app) -> tuple[float, float]:
    shown = metrics(app)
    return float(shown["replacement (subgraph)"]), float(shown["completeness (subgraph)"])


def test_pinning_and_grouping_update_the_subgraph_scores(monkeypatch, outputs: Path):
    app = open_app(monkeypatch, outputs)
    assert app.title[0].value == f"{PROFILE} / {PROMPT}"
    document = catalog.read_document(outputs, PROFILE, PROMPT)
    graph = Graph.load(catalog.graph_file(outputs, PROFILE, PROMPT))
    before = shown_subgraph_scores(app)
    empty = independent_scores(graph, [])
    assert before == pytest.approx((empty.replacement, empty.completeness), abs=6e-5)

    two = strongest_features(document, 2)
    widget(app.multiselect, "pinned nodes").set_value(two).run()
    assert not app.exception, [e.value for e in app.exception]
    expected = independent_scores(graph, [index_of(graph, n) for n in two])
    after = shown_subgraph_scores(app)
    assert after == pytest.approx((expected.replacement, expected.completeness), abs=6e-5)
    assert after != before
    assert metrics(app)["pinned nodes"] == "2"

    widget(app.text_input, "supernode name").set_value("capital")
    widget(app.multiselect, "members (pinned nodes)").set_value(two)
    widget(app.button, "Group as supernode").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert metrics(app)["supernodes"] == "1"
    assert any("**capital** (2)" in m.value for m in app.markdown)
    # grouping changes nothing that is kept: the scores stay
    assert shown_subgraph_scores(app) == after

    # pinning the picked node with its button adds it to the subgraph
    third = strongest_features(document, 3)[2]
    widget(app.selectbox, "node").set_value(third).run()
    widget(app.button, "Pin this node").click().run()
    three = [*two, third]
    expected = independent_scores(graph, [index_of(graph, n) for n in three])
    assert shown_subgraph_scores(app) == pytest.approx(
        (expected.replacement, expected.completeness), abs=6e-5
    )
    assert widget(app.multiselect, "pinned nodes").value == three

    widget(app.text_input, "save as").set_value("capital circuit")
    widget(app.button, "Save subgraph").click().run()
    assert not app.exception, [e.value for e in app.exception]
    project = catalog.project_folder(outputs)
    (path,) = subgraph_files(project, PROFILE, PROMPT)
    assert path == subgraphs_dir(project, PROFILE, PROMPT) / "capital circuit.json"
    saved = json.loads(path.read_text())
    assert saved["qParams"] == {"pinnedIds": three, "supernodes": [["capital", *two]]}

    # a fresh session loads it back
    app = open_app(monkeypatch, outputs)
    assert metrics(app)["pinned nodes"] == "0"
    widget(app.button, "Load subgraph").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert widget(app.multiselect, "pinned nodes").value == three
    assert metrics(app)["supernodes"] == "1"


def test_a_subgraph_file_naming_unknown_nodes_is_refused_on_the_page(monkeypatch, outputs: Path):
    folder = subgraphs_dir(catalog.project_folder(outputs), PROFILE, PROMPT)
    folder.mkdir(parents=True)
    (folder / "stale.json").write_text(
        json.dumps({"name": "stale", "qParams": {"pinnedIds": ["1_99999_3"], "supernodes": []}})
    )
    app = open_app(monkeypatch, outputs)
    widget(app.button, "Load subgraph").click().run()
    assert not app.exception, [e.value for e in app.exception]
    (error,) = app.error
    assert "Not loaded" in error.value and "1_99999_3" in error.value
    assert "not nodes of this graph" in error.value
    assert metrics(app)["pinned nodes"] == "0"


def test_feature_labels_are_drawn_where_there_is_room(root: Path):
    document = catalog.read_document(root, PROFILE, PROMPT)
    for node in document["nodes"]:  # long labels, to be cut
        if node["feature_type"] == "cross layer transcoder":
            node["clerp"] = f"a rather long label for feature {node['node_id']} " * 3
    positions = node_positions(document)
    drawn = drawn_labels(document, positions)
    assert drawn
    by_id = {p["node_id"]: p for p in positions}
    cells = [(by_id[d["node_id"]]["row"], by_id[d["node_id"]]["ctx_idx"]) for d in drawn]
    assert len(cells) == len(set(cells))  # one label per cell
    widths = [w for _, w in layout.columns(document)]
    for label in drawn:
        node = by_id[label["node_id"]]
        assert label["label"] == node["label"]  # in full, for hover
        assert len(label["text"]) <= max(layout.MIN_LABEL, widths[node["ctx_idx"]] * 14)
        assert label["text"].endswith("…") and label["label"].startswith(label["text"][:-1])
    spec = graph_chart(document).to_dict()
    texts = [layer for layer in spec["layer"] if layer["mark"].get("type") == "text"]
    assert any(layer["encoding"]["text"]["field"] == "text" for layer in texts)


def test_a_graph_too_big_to_draw_gets_a_message(monkeypatch, outputs: Path):
    """Nothing drawn, and a threshold of the pruning curve that keeps a drawable graph named."""
    scores = catalog.read_scores(outputs, PROFILE, PROMPT)
    fits = sorted((p["nodes"], p["node_threshold"]) for p in scores["curve"])
    limit = fits[0][0]  # only the smallest pruning of the sweep fits
    monkeypatch.setattr(layout, "MAX_DRAWABLE_NODES", 5)
    monkeypatch.setattr(layout, "MAX_DRAWN_NODES", limit)
    app = open_app(monkeypatch, outputs)
    (warning,) = [w.value for w in app.warning if "too many to draw" in w.value]
    assert "lower the node threshold" in warning
    named = max(p["node_threshold"] for p in scores["curve"] if p["nodes"] <= limit)
    assert f"node threshold {named:g}" in warning and f"keeps {limit:,} nodes" in warning
    assert not app.exception
