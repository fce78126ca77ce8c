"""Feature pages and labels in the explorer (dashboards/features.py, and the labels the charts and
tables carry), on the tiny outputs folder's pages and labels file."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from html import unescape
from pathlib import Path

import pytest
from safetensors import safe_open
from test_dashboard_outputs import HUMAN_LABEL, built_outputs

from dashboards import catalog, charts, layout
from dashboards.documents import node_table, strongest_links
from dashboards.features import (
    context_html,
    feature_key,
    feature_nodes,
    histogram_rows,
    match_table,
    page_html,
    with_labels,
)
from tracer.features.labels import Labels, read_labels
from tracer.features.storage import Context

SPAN = re.compile(r'<span class="token" title="([^"]*)" style="([^"]*)">([^<]*)</span>')


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


@pytest.fixture(scope="module")
def labels(root: Path) -> Labels:
    pages = catalog.find_pages(root, catalog.scan_outputs(root).profile("tiny-clt"))
    return Labels.open(pages.folder, pages.labels)


def parse_spans(html: str) -> list[tuple[float, float, str, bool]]:
    """(activation shown, background opacity, text, underlined) of each token span."""
    spans = []
    for title, style, text in SPAN.findall(html):
        alpha = float(re.search(r"rgba\(255, 127, 14, ([0-9.e-]+)\)", style).group(1))
        spans.append((float(title), alpha, unescape(text), "border-bottom" in style))
    return spans


def test_context_tokens_are_shaded_by_activation_over_the_maximum(labels: Labels):
    pages = labels.pages
    checked = 0
    for feature in range(pages.d_transcoder):
        page = pages.page(1, feature)
        if not page.top:
            continue
        for context in page.top[:2]:
            spans = parse_spans(context_html(context, pages.text, page.act_max))
            assert [s[2] for s in spans] == [pages.text(t) for t in context.tokens]
            for (shown, alpha, _, underlined), act, pos in zip(
                spans, context.acts, range(len(spans)), strict=True
            ):
                assert shown == pytest.approx(act, abs=6e-4)  # shown to 3 decimals
                assert alpha == pytest.approx(max(act, 0.0) / page.act_max, abs=1e-3)
                assert underlined == (pos == context.position)
        # the top example's own token is where the feature peaks: full shade
        best = parse_spans(context_html(page.top[0], pages.text, page.act_max))
        assert best[page.top[0].position][1] == pytest.approx(1.0, abs=2e-3)
        checked += 1
    assert checked > 3


def test_token_text_is_escaped_and_a_dead_feature_is_not_shaded():
    context = Context(tokens=[5, 6], acts=[0.0, 2.0], position=1, value=2.0)
    html = context_html(context, {5: "<b>", 6: "a&b"}.get, act_max=0.0)
    assert "<b>" not in html and "&lt;b&gt;" in html and "a&amp;b" in html
    assert [s[2] for s in parse_spans(html)] == ["<b>", "a&b"]
    assert [s[1] for s in parse_spans(html)] == [0.0, 0.0]


def test_page_html_lists_every_example_of_the_page(labels: Labels):
    page = next(p for f in range(8) if (p := labels.pages.page(0, f)).top)
    html = page_html(page, labels.pages.text)
    n_examples = len(page.top) + sum(len(band) for band in page.bands)
    assert html.count('class="context"') == n_examples
    assert "Top activations" in html and html.count("Quantile ") == len(page.bands)


def test_histogram_bins_cover_zero_to_the_top_and_count_the_active_tokens(root: Path):
    pages = catalog.find_pages(root, catalog.scan_outputs(root).profile("tiny-plt"))
    opened = Labels.open(pages.folder, None).pages
    with safe_open(pages.folder / "layer_2.safetensors", "pt") as handle:
        active = handle.get_tensor("active")
    for feature in range(opened.d_transcoder):
        page = opened.page(2, feature)
        rows = histogram_rows(page)
        assert rows[0]["start"] == 0 and rows[-1]["end"] == pytest.approx(page.histogram_top)
        assert all(a["end"] == pytest.approx(b["start"]) for a, b in itertools.pairwise(rows))
        assert sum(r["count"] for r in rows) == int(active[feature])


def test_labels_reach_the_nodes_the_table_the_links_and_the_hover(root: Path, labels: Labels):
    document = catalog.read_document(root, "tiny-clt", "dallas")
    labelled = with_labels(document, labels)
    assert all("label" not in n for n in document["nodes"])  # the input is left as it was
    human = read_labels(catalog.labels_folder(root) / "tiny-clt.tsv")
    expected = {}
    for node in document["nodes"]:
        layer, feature, _ = node["node_id"].split("_")
        if node["feature_type"] == "cross layer transcoder":
            key = (int(layer), int(feature))
            expected[node["node_id"]] = human.get(key) or labels.auto(*key)
        else:
            expected[node["node_id"]] = node["clerp"]
    assert HUMAN_LABEL in expected.values()
    table = {row["node_id"]: row["label"] for row in node_table(labelled)}
    assert table == expected
    positions = {row["node_id"]: row["label"] for row in layout.node_positions(labelled)}
    assert positions == expected
    busiest = max(expected, key=lambda i: sum(lk["target"] == i for lk in document["links"]))
    incoming, _ = strongest_links(labelled, busiest)
    assert [row["label"] for row in incoming] == [expected[row["node_id"]] for row in incoming]
    spec = charts.graph_chart(labelled).to_dict()
    tooltips = [t["field"] for layer in spec["layer"] for t in layer["encoding"].get("tooltip", [])]
    assert "label" in tooltips
    hovered = [row.get("label") for rows in spec["datasets"].values() for row in rows]
    assert HUMAN_LABEL in hovered


def test_feature_rows_and_matches(root: Path, labels: Labels):
    doc_a = with_labels(catalog.read_document(root, "tiny-clt", "dallas"), labels)
    doc_b = catalog.read_document(root, "tiny-plt", "dallas")
    positions = defaultdict(list)
    for node in doc_a["nodes"]:
        if feature_key(node) is not None:
            positions[feature_key(node)].append(int(node["ctx_idx"]))
    rows = feature_nodes(doc_a)
    assert {(r["layer"], r["feature"]): sorted(r["positions"]) for r in rows} == {
        k: sorted(v) for k, v in positions.items()
    }
    assert [r["influence"] for r in rows] == sorted((r["influence"] for r in rows), reverse=True)

    in_b = defaultdict(list)
    for node in doc_b["nodes"]:
        if feature_key(node) is not None:
            in_b[feature_key(node)].append(int(node["ctx_idx"]))
    # match every A feature to each B feature of its layer in turn: the table follows
    b_features = sorted(in_b)
    matches = {
        (r["layer"], r["feature"]): (b_features[i % len(b_features)][1], 0.5)
        for i, r in enumerate(rows)
    }
    table = match_table(doc_a, doc_b, matches, lambda layer, f: f"b{layer}:{f}")
    for row in table:
        b = matches[(row["layer"], row["feature_a"])][0]
        assert row["feature_b"] == b and row["cosine"] == 0.5
        assert row["label_b"] == f"b{row['layer']}:{b}"
        assert sorted(row["in_b_at"]) == sorted(in_b.get((row["layer"], b), []))
        assert row["label_a"] == labels(row["layer"], row["feature_a"])
    assert any(row["in_b_at"] for row in table)
    unmatched = match_table(doc_a, doc_b, {})
    assert all(row["feature_b"] is None and row["label_b"] == "" for row in unmatched)
