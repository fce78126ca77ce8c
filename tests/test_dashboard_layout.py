"""Where the dashboard draws nodes and links (dashboards/layout.py) and what its charts carry
(dashboards/charts.py), on the pipeline documents of the tiny outputs folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_dashboard_outputs import N_LAYERS, built_outputs

from dashboards import catalog, charts, layout
from dashboards.documents import node_kind, prompt_tokens, prune_document
from tracer.graph.graph import Graph

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    return catalog.read_document(built_outputs(tmp_path_factory), "tiny-clt", "mary")


@pytest.fixture(scope="module")
def everything(tmp_path_factory) -> dict:
    """The document of a graph pruned at (1, 1): every node and edge, too many to draw."""
    root = built_outputs(tmp_path_factory)
    graph = Graph.load(catalog.graph_file(root, "tiny-clt", "mary"))
    stored = catalog.read_document(root, "tiny-clt", "mary")
    return prune_document(graph, 1.0, 1.0, prompt_tokens(stored))[0]


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> dict:
    return catalog.read_document(built_outputs(tmp_path_factory), "tiny-plt", "mary")


def test_rows_follow_layers_and_columns_follow_positions(document: dict):
    assert layout.document_layers(document) == N_LAYERS
    placed = {p["node_id"]: p for p in layout.node_positions(document)}
    column_list = layout.columns(document)
    assert len(column_list) == len(document["metadata"]["prompt_tokens"])
    assert sorted(placed) == sorted(n["node_id"] for n in document["nodes"])
    for node in document["nodes"]:
        p = placed[node["node_id"]]
        kind = node_kind(node)
        rows = {"token": 0, "logit": N_LAYERS + 1}
        expected_y = rows[kind] if kind in rows else int(node["layer"]) + 1
        assert p["row"] == expected_y
        centre, width = column_list[node["ctx_idx"]]
        if kind == "logit":  # lined up leftwards from the last position along the top row
            assert p["y"] == expected_y and column_list[0][0] <= p["x"] <= centre
        else:
            assert abs(p["y"] - expected_y) <= layout.LINE_GAP * (layout.MAX_LINES - 1) / 2
            assert abs(p["x"] - centre) <= (width - layout.COLUMN_MARGIN) / 2 + 1e-9
        assert p["token"] == document["metadata"]["prompt_tokens"][node["ctx_idx"]]
    spots = Counter((round(p["x"], 9), round(p["y"], 9)) for p in placed.values())
    assert max(spots.values()) == 1  # nodes sharing a cell are spread apart
    assert layout.row_labels(N_LAYERS) == {0: "emb", 1: "L0", 2: "L1", 3: "L2", 4: "logit"}


def test_crowded_cells_read_strongest_first_and_logits_by_probability(document: dict):
    cells: dict[tuple, list[dict]] = {}
    for p in layout.node_positions(document):
        cells.setdefault((p["kind"], p["row"], p["ctx_idx"]), []).append(p)
    features = max((c for k, c in cells.items() if k[0] == "feature"), key=len)
    assert len(features) > 1
    reading_order = sorted(features, key=lambda p: (-p["y"], p["x"]))  # top line, left to right
    assert [p["size"] for p in reading_order] == sorted((p["size"] for p in features), reverse=True)
    (logits,) = [c for k, c in cells.items() if k[0] == "logit"]
    right_to_left = sorted(logits, key=lambda p: -p["x"])
    assert [p["size"] for p in right_to_left] == sorted((p["size"] for p in logits), reverse=True)


@pytest.mark.parametrize("count", [1, 2, 8, 9, 20, 33, 100])
def test_cell_offsets_wrap_into_lines(count: int):
    offsets = layout.cell_offsets(count)
    assert len(offsets) == len(set(offsets)) == count
    lines = Counter(dy for _, dy in offsets)
    assert len(lines) == min(layout.MAX_LINES, -(-count // layout.PER_LINE))
    assert max(lines.values()) - min(lines.values()) <= 1 + len(lines)  # balanced lines
    longest = max(lines.values())
    assert all(abs(dx) <= layout.NODE_GAP * (longest - 1) / 2 + 1e-9 for dx, _ in offsets)
    assert sorted(lines) == [-dy for dy in sorted(lines, reverse=True)]  # centred on the row
    first_line = max(lines)  # the first nodes (the strongest) go to the top line
    assert all(dy == first_line for _, dy in offsets[: lines[first_line]])


def test_columns_are_wide_enough_for_their_busiest_cell(document: dict):
    column_list = layout.columns(document)
    left = 0.0
    for centre, width in column_list:  # left to right, touching, at least one unit wide
        assert width >= 1 and centre - width / 2 == pytest.approx(left)
        left += width
    placed = layout.node_positions(document)
    for pos, (centre, width) in enumerate(column_list):
        xs = [p["x"] for p in placed if p["ctx_idx"] == pos and p["kind"] != "logit"]
        # the outer nodes keep half a margin from the column's edges
        assert all(abs(x - centre) <= (width - layout.COLUMN_MARGIN) / 2 + 1e-9 for x in xs)
    busiest = Counter(p["ctx_idx"] for p in placed if p["kind"] == "feature").most_common(1)[0][0]
    assert column_list[busiest][1] > 1


def test_links_join_the_drawn_positions_of_their_ends(document: dict):
    positions = layout.node_positions(document)
    where = {p["node_id"]: (p["x"], p["y"]) for p in positions}
    segments = layout.link_segments(document, positions)
    assert len(segments) == len(document["links"])
    for segment, link in zip(segments, document["links"], strict=True):
        assert (segment["x"], segment["y"]) == where[link["source"]]
        assert (segment["x2"], segment["y2"]) == where[link["target"]]
        assert segment["magnitude"] == abs(link["weight"])
        assert segment["sign"] == ("positive" if link["weight"] >= 0 else "negative")
        assert segment["y2"] > segment["y"] or link["target"].startswith(str(N_LAYERS + 1))
    dangling = {"source": "nowhere", "target": document["links"][0]["target"], "weight": 1.0}
    extended = dict(document, links=[*document["links"], dangling])
    assert len(layout.link_segments(extended, positions)) == len(document["links"])


def test_layer_counts_per_row_and_kind(document: dict, other: dict):
    rows = layout.layer_counts({"A": document, "B": other})
    for name, doc in (("A", document), ("B", other)):
        mine = {(r["row"], r["kind"]): r["count"] for r in rows if r["graph"] == name}
        expected = Counter(
            (
                {"token": "emb", "logit": "logit"}.get(node_kind(n), f"L{n['layer']}"),
                node_kind(n),
            )
            for n in doc["nodes"]
        )
        assert mine == dict(expected)


def chart_data(chart) -> tuple[dict, list[dict], list[dict]]:
    """(datasets by name, layers, selection parameters) of a layered chart's spec."""
    spec = chart.to_dict()
    return spec["datasets"], spec["layer"], spec.get("params", [])


def layer_rows(datasets: dict, layer: dict) -> list[dict]:
    return datasets[layer["data"]["name"]]


def test_graph_chart_draws_only_the_documents_nodes_and_links(document: dict):
    datasets, layers, params = chart_data(charts.graph_chart(document))
    marks = [layer["mark"]["type"] for layer in layers]
    assert marks == ["rule", "circle", "text"]
    nodes = layer_rows(datasets, layers[1])
    assert sorted(r["node_id"] for r in nodes) == sorted(n["node_id"] for n in document["nodes"])
    links = layer_rows(datasets, layers[0])
    assert sorted((r["source"], r["target"]) for r in links) == sorted(
        (lk["source"], lk["target"]) for lk in document["links"]
    )
    labels = layer_rows(datasets, layers[2])
    assert {r["node_id"] for r in labels} == {
        n["node_id"] for n in document["nodes"] if n["feature_type"] == "logit"
    }
    x_axis = layers[1]["encoding"]["x"]["axis"]
    for token in document["metadata"]["prompt_tokens"]:
        assert token in x_axis["labelExpr"]
    assert [(p["name"], p["views"]) for p in params] == [
        (charts.NODE_SELECTION, [layers[1]["name"]])
    ]


def test_graph_chart_rings_the_selected_node_and_its_links(document: dict):
    target = max(
        Counter(link["target"] for link in document["links"]).items(), key=lambda kv: kv[1]
    )[0]
    datasets, layers, _ = chart_data(charts.graph_chart(document, selected=target))
    assert len(layers) == 5
    touching = layer_rows(datasets, layers[3])
    assert len(touching) == sum(target in (lk["source"], lk["target"]) for lk in document["links"])
    assert [r["node_id"] for r in layer_rows(datasets, layers[4])] == [target]
    assert len(chart_data(charts.graph_chart(document, selected="no-such-node"))[1]) == 3


def test_a_graph_too_large_to_draw_is_cut_to_its_strongest_parts(everything: dict):
    assert len(everything["links"]) > layout.MAX_DRAWN_LINKS
    drawn, note = layout.drawable(everything, max_nodes=40, max_links=30)
    assert note and "40 of" in note and "30 of" in note
    ends = {"token", "logit"}
    assert [n for n in drawn["nodes"] if node_kind(n) in ends] == [
        n for n in everything["nodes"] if node_kind(n) in ends
    ]
    others = sorted(
        (n for n in everything["nodes"] if node_kind(n) not in ends), key=lambda n: -n["influence"]
    )
    kept_others = [n for n in drawn["nodes"] if node_kind(n) not in ends]
    assert len(drawn["nodes"]) == 40
    assert min(n["influence"] for n in kept_others) >= others[len(kept_others)]["influence"]
    ids = {n["node_id"] for n in drawn["nodes"]}
    between = [lk for lk in everything["links"] if lk["source"] in ids and lk["target"] in ids]
    weights = sorted((abs(lk["weight"]) for lk in between), reverse=True)
    assert sorted((abs(lk["weight"]) for lk in drawn["links"]), reverse=True) == weights[:30]
    assert layout.drawable(drawn, max_nodes=40, max_links=30) == (drawn, None)

    datasets, layers, _ = chart_data(charts.graph_chart(everything))
    assert len(layer_rows(datasets, layers[0])) == layout.MAX_DRAWN_LINKS


def test_a_graph_without_links_still_draws(document: dict):
    bare = dict(document, links=[])
    spec = charts.graph_chart(bare).to_dict()
    assert "NaN" not in json.dumps(spec)
