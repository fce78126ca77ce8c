"""The Streamlit explorer's pages run headless (streamlit.testing AppTest) on the tiny outputs folder:
what they show is checked against the pipeline's files and against `Graph.prune`."""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from streamlit.testing.v1 import AppTest
from test_dashboard_outputs import DISABLED, HUMAN_LABEL, PROFILES, VALIDATED, built_outputs

from dashboards import catalog
from dashboards.catalog import ENV_OUTPUTS
from dashboards.layout import MAX_DRAWN_LINKS
from tracer.experiments import outputs as paths
from tracer.features.labels import Labels, read_labels
from tracer.graph.graph import Graph
from tracer.transcoders.files import load_transcoders

REPO = Path(__file__).resolve().parents[1]

APP = REPO / "dashboards" / "app.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


def open_app(monkeypatch, outputs: Path, page: str | None = None) -> AppTest:
    monkeypatch.setenv(ENV_OUTPUTS, str(outputs))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    if page is not None:
        app.switch_page(f"views/{page}.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def widget(elements, label: str):
    (found,) = [e for e in elements if e.label == label]
    return found


def tables_with(app: AppTest, columns: set[str]) -> list[pd.DataFrame]:
    return [d.value for d in app.dataframe if columns <= set(d.value.columns)]


def assert_scores_shown(app: AppTest, scores: dict, nodes: int, edges: int) -> None:
    shown = metrics(app)
    assert shown["replacement (full)"] == f"{scores['replacement']:.4f}"
    assert shown["completeness (full)"] == f"{scores['completeness']:.4f}"
    assert shown["replacement (pruned)"] == f"{scores['pruned_replacement']:.4f}"
    assert shown["completeness (pruned)"] == f"{scores['pruned_completeness']:.4f}"
    assert (int(shown["nodes (pruned)"]), int(shown["edges (pruned)"])) == (nodes, edges)
    assert (int(shown["nodes (full)"]), int(shown["edges (full)"])) == (
        scores["nodes"],
        scores["edges"],
    )


# ---- Graph page ---------------------------------------------------------------------------------
def test_graph_page_shows_the_picked_graphs_stored_scores(monkeypatch, root: Path):
    app = open_app(monkeypatch, root)
    first = sorted(PROFILES)[0]
    assert app.title[0].value == f"{first} / dallas"
    scores = catalog.read_scores(root, first, "dallas")
    assert_scores_shown(app, scores, scores["pruned_nodes"], scores["pruned_edges"])

    widget(app.selectbox, "profile").set_value("tiny-plt").run()
    widget(app.selectbox, "prompt").set_value("mary").run()
    assert not app.exception
    assert app.title[0].value == "tiny-plt / mary"
    scores = catalog.read_scores(root, "tiny-plt", "mary")
    assert_scores_shown(app, scores, scores["pruned_nodes"], scores["pruned_edges"])
    assert widget(app.slider, "node threshold").value == scores["node_threshold"]
    assert widget(app.slider, "edge threshold").value == scores["edge_threshold"]
    assert any(DISABLED in m.value and "enabled: true" in m.value for m in app.markdown)


@pytest.mark.parametrize("thresholds", [(0.5, 0.9), (0.95, 0.995), (1.0, 1.0)])
def test_threshold_sliders_reprune_the_full_graph(monkeypatch, root: Path, thresholds):
    app = open_app(monkeypatch, root)
    profile, prompt = sorted(PROFILES)[0], "dallas"
    stored = catalog.read_scores(root, profile, prompt)
    widget(app.slider, "node threshold").set_value(thresholds[0])
    widget(app.slider, "edge threshold").set_value(thresholds[1]).run()
    assert not app.exception

    graph = Graph.load(paths.graph_path(root, profile, prompt))
    result = graph.prune(*thresholds)
    nodes, edges = int(result.node_mask.sum()), int(result.edge_mask.sum())
    assert nodes != stored["pruned_nodes"]  # the check below can tell the thresholds apart
    scores = graph.scores(result)
    expected = dict(stored, pruned_replacement=scores.replacement)
    expected["pruned_completeness"] = scores.completeness
    assert_scores_shown(app, expected, nodes, edges)
    (all_nodes,) = tables_with(app, {"node_id", "kind", "influence"})
    assert len(all_nodes) == nodes
    cut = [w.value for w in app.warning if w.value.startswith("Drawing")]
    assert bool(cut) == (edges > MAX_DRAWN_LINKS)  # (1, 1) keeps more links than are drawn


def test_node_picker_lists_the_strongest_links(monkeypatch, root: Path):
    app = open_app(monkeypatch, root)
    document = catalog.read_document(root, sorted(PROFILES)[0], "dallas")
    busiest = Counter(link["target"] for link in document["links"]).most_common(1)[0][0]
    app.selectbox(key="graph_node").set_value(busiest).run()
    assert not app.exception
    incoming, outgoing = tables_with(app, {"node_id", "description", "weight"})
    expected = sorted(
        (lk for lk in document["links"] if lk["target"] == busiest),
        key=lambda lk: -abs(lk["weight"]),
    )[:10]
    assert list(incoming["node_id"]) == [lk["source"] for lk in expected]
    assert list(incoming["weight"]) == pytest.approx([lk["weight"] for lk in expected])
    n_out = sum(lk["source"] == busiest for lk in document["links"])
    assert len(outgoing) == min(10, n_out)


def test_validation_shown_when_the_stage_ran(monkeypatch, root: Path):
    app = open_app(monkeypatch, root)
    assert app.title[0].value.startswith(VALIDATED)
    report = catalog.read_validation(root, VALIDATED, "dallas")
    (summary,) = tables_with(app, {"spearman", "median_relative_error"})
    assert list(summary.index) == list(report["summary"])
    assert summary["spearman"].tolist() == pytest.approx(
        [s["spearman"] for s in report["summary"].values()]
    )
    other = next(p for p in PROFILES if p != VALIDATED)
    widget(app.selectbox, "profile").set_value(other).run()
    assert any("stage `validate`" in i.value for i in app.info)


# ---- Compare page -------------------------------------------------------------------------------
def test_compare_page_counts_match_the_two_files(monkeypatch, root: Path):
    app = open_app(monkeypatch, root, "compare")
    doc_a = catalog.read_document(root, "tiny-clt", "dallas")
    doc_b = catalog.read_document(root, "tiny-plt", "dallas")
    (shared,) = tables_with(app, {"kind", "shared", "jaccard"})
    everything = shared.set_index("kind").loc["all"]
    ids_a = {n["node_id"] for n in doc_a["nodes"]}
    ids_b = {n["node_id"] for n in doc_b["nodes"]}
    assert (everything["a"], everything["b"], everything["shared"]) == (
        len(ids_a),
        len(ids_b),
        len(ids_a & ids_b),
    )

    scores_a = catalog.read_scores(root, "tiny-clt", "dallas")
    scores_b = catalog.read_scores(root, "tiny-plt", "dallas")
    (deltas,) = tables_with(app, {"metric", "B - A"})
    row = deltas.set_index("metric").loc["replacement (pruned)"]
    assert row["B - A"] == pytest.approx(
        scores_b["pruned_replacement"] - scores_a["pruned_replacement"]
    )

    (per_layer,) = [d.value for d in app.dataframe if list(d.value.columns) == ["A", "B"]]
    counts_a = Counter(n["layer"] for n in doc_a["nodes"] if n["feature_type"] != "logit")
    assert per_layer["A"].sum() == len(doc_a["nodes"])
    assert per_layer.loc[("L0", slice(None)), "A"].sum() == counts_a["0"]

    matching = pd.read_csv(root / "compare" / "matching.csv")
    expected = matching[
        (matching["profile_a"] == "tiny-clt")
        & (matching["profile_b"] == "tiny-plt")
        & (matching["prompt"] == "dallas")
    ]
    (shown,) = tables_with(app, {"profile_a", "profile_b", "kept_fraction"})
    assert shown.reset_index(drop=True).equals(expected.reset_index(drop=True))


def test_compare_page_different_prompts_shows_no_overlap_by_id(monkeypatch, root: Path):
    app = open_app(monkeypatch, root, "compare")
    widget(app.selectbox, "B: prompt").set_value("mary").run()
    assert not app.exception
    assert not tables_with(app, {"kind", "shared", "jaccard"})
    assert any("do not name the same nodes" in i.value for i in app.info)


# ---- Tables page --------------------------------------------------------------------------------
def test_tables_page_filters_the_compare_tables(monkeypatch, root: Path):
    app = open_app(monkeypatch, root, "tables")
    scores = pd.read_csv(root / "compare" / "scores.csv")
    (shown,) = tables_with(app, {"pruned_replacement", "active_features"})
    assert shown.reset_index(drop=True).equals(scores)

    widget(app.multiselect, "profiles").set_value(["tiny-plt"]).run()
    assert not app.exception
    (shown,) = tables_with(app, {"pruned_replacement", "active_features"})
    assert shown.reset_index(drop=True).equals(
        scores[scores["profile"] == "tiny-plt"].reset_index(drop=True)
    )
    # matching pairs two profiles: with one selected there are none
    assert not tables_with(app, {"profile_a", "profile_b"})
    assert any(i.value == "No rows for these filters." for i in app.info)


# ---- missing outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", [None, "compare", "tables"])
def test_missing_outputs_folder_says_which_command_writes_it(monkeypatch, tmp_path: Path, page):
    app = open_app(monkeypatch, tmp_path / "nowhere", page)
    assert [w.value for w in app.warning] and "dvc repro" in app.warning[0].value


def test_without_compare_and_graphs_the_pages_still_work(monkeypatch, tmp_path: Path, root: Path):
    """A clone with pruned documents but neither the full graphs (not pulled) nor compare tables."""
    partial = tmp_path / "outputs"
    shutil.copytree(root / "profiles", partial / "profiles")
    app = open_app(monkeypatch, partial)
    assert widget(app.slider, "node threshold").disabled
    assert any("dvc pull" in c.value for c in app.caption)
    scores = catalog.read_scores(root, sorted(PROFILES)[0], "dallas")
    assert_scores_shown(app, scores, scores["pruned_nodes"], scores["pruned_edges"])

    app.switch_page("views/compare.py").run()
    assert not app.exception
    assert any("stage `compare`" in i.value for i in app.info)
    app.switch_page("views/tables.py").run()
    assert not app.exception
    assert "stage `compare`" in app.warning[0].value


# ---- feature pages and labels -------------------------------------------------------------------
def layer_row(folder: Path, layer: int, feature: int) -> tuple[dict, torch.Tensor]:
    """One feature's rows of a pages layer file and the layer's example table, read directly."""
    with safe_open(folder / f"layer_{layer}.safetensors", "pt") as handle:
        examples = handle.get_tensor("example_tokens")
        names = [n for n in handle.keys() if n != "example_tokens"]
        return {name: handle.get_tensor(name)[feature] for name in names}, examples


def labelled_feature(root: Path) -> tuple[int, int]:
    ((key, text),) = read_labels(catalog.labels_folder(root) / "tiny-clt.tsv").items()
    assert text == HUMAN_LABEL
    return key


def test_graph_page_shows_the_picked_features_page_and_labels(monkeypatch, root: Path):
    app = open_app(monkeypatch, root)  # tiny-clt / dallas, its most influential feature picked
    layer, feature = labelled_feature(root)
    picked = app.selectbox(key="graph_node").value
    assert picked.startswith(f"{layer}_{feature}_")
    assert HUMAN_LABEL in app.selectbox(key="graph_node").format_func(picked)
    (all_nodes,) = tables_with(app, {"node_id", "kind", "label"})
    assert all_nodes.set_index("node_id").loc[picked, "label"] == HUMAN_LABEL
    assert any(HUMAN_LABEL in m.value and "labels file" in m.value for m in app.markdown)

    folder = root / "features" / "tiny-clt"
    row, examples_table = layer_row(folder, layer, feature)
    index = json.loads((folder / "index.json").read_text())
    tokens = json.loads((folder / "tokens.json").read_text())
    assert metrics(app)["density"] == f"{int(row['active']) / index['n_tokens']:.3%}"
    (examples,) = [h.value for h in app.html if "Top activations" in h.value]
    first = examples_table[int(row["top_example"][0])]  # the top example's tokens
    shown = re.findall(r">([^<]*)</span>", examples.split('class="context"')[1])
    assert [html.unescape(w) for w in shown] == [tokens[str(t)] for t in first.tolist() if t >= 0]
    top_logits = [tokens[str(t)] for t in row["top_logits"].tolist()]
    (shown_logits,) = [t for t in tables_with(app, {"token", "effect"}) if t["effect"].iloc[0] > 0]
    assert list(shown_logits["token"]) == top_logits
    assert not [t for t in app.text_input if t.label.startswith("Label of")]
    assert any("read-only" in c.value and "--edit-labels" in c.value for c in app.caption)

    token_node = next(i for i in all_nodes["node_id"] if i.startswith("E_"))
    app.selectbox(key="graph_node").set_value(token_node).run()
    assert not [h for h in app.html if "Top activations" in h.value]
    assert any("Pick a feature node" in c.value for c in app.caption)


def test_a_profile_without_pages_names_the_stage_that_writes_them(
    monkeypatch, tmp_path: Path, root: Path
):
    partial = tmp_path / "outputs"
    shutil.copytree(root / "profiles", partial / "profiles")
    shutil.copytree(root / "features" / "tiny-clt", partial / "features" / "tiny-clt")
    app = open_app(monkeypatch, partial)
    assert [h for h in app.html if "Top activations" in h.value]
    widget(app.selectbox, "profile").set_value("tiny-plt").run()
    assert not app.exception
    assert any("No feature pages" in i.value and "dvc repro features@" in i.value for i in app.info)
    assert app.title[0].value == "tiny-plt / dallas"  # the rest of the page is there


def test_labels_are_edited_only_with_the_flag_and_written_to_the_labels_file(
    monkeypatch, tmp_path: Path, root: Path
):
    copy = tmp_path / "outputs"
    shutil.copytree(root, copy)
    shutil.copytree(catalog.labels_folder(root), catalog.labels_folder(copy))
    labels_file = catalog.labels_folder(copy) / "tiny-clt.tsv"
    layer, feature = labelled_feature(copy)
    monkeypatch.setattr(sys, "argv", ["app.py", "--edit-labels"])
    app = open_app(monkeypatch, copy)
    (editor,) = [t for t in app.text_input if t.label == f"Label of L{layer} #{feature}"]
    assert editor.value == HUMAN_LABEL
    editor.set_value("Texas cities")
    widget(app.button, "Save label").click().run()
    assert not app.exception
    assert read_labels(labels_file) == {(layer, feature): "Texas cities"}
    (all_nodes,) = tables_with(app, {"node_id", "kind", "label"})
    picked = app.selectbox(key="graph_node").value
    assert all_nodes.set_index("node_id").loc[picked, "label"] == "Texas cities"

    (editor,) = [t for t in app.text_input if t.label == f"Label of L{layer} #{feature}"]
    editor.set_value("")
    widget(app.button, "Save label").click().run()
    assert read_labels(labels_file) == {}  # empty removes: the automatic label is back
    automatic = Labels.open(copy / "features" / "tiny-clt", None)(layer, feature)
    (all_nodes,) = tables_with(app, {"node_id", "kind", "label"})
    assert all_nodes.set_index("node_id").loc[picked, "label"] == automatic != HUMAN_LABEL


def test_compare_page_matches_features_by_decoder_cosine(monkeypatch, root: Path):
    app = open_app(monkeypatch, root, "compare")  # A tiny-clt, B tiny-plt, dallas
    (table,) = tables_with(app, {"feature_a", "feature_b", "cosine", "label_a", "label_b"})
    sets = {
        name: load_transcoders(catalog.scan_outputs(root).profile(name).info["transcoders"])
        for name in ("tiny-clt", "tiny-plt")
    }
    labels = {
        name: Labels.open(root / "features" / name, catalog.labels_folder(root) / f"{name}.tsv")
        for name in sets
    }
    for row in table.itertuples():
        # brute force: cosine of A's own-layer decoder row with every B decoder row
        a = sets["tiny-clt"].layer(row.layer).W_dec[row.feature_a, 0].double()
        b = sets["tiny-plt"].layer(row.layer).W_dec.double()
        cosines = (b @ a) / (b.norm(dim=1) * a.norm())
        assert row.feature_b == int(cosines.argmax())
        assert row.cosine == pytest.approx(float(cosines.max()), abs=1e-5)
        assert row.label_a == labels["tiny-clt"](row.layer, row.feature_a)
        assert row.label_b == labels["tiny-plt"](row.layer, row.feature_b)
    assert HUMAN_LABEL in set(table["label_a"])
    first = table.iloc[0]
    headings = [m.value for m in app.markdown if m.value.startswith("#### ")]
    assert headings == [
        f"#### A: feature L{first['layer']} #{first['feature_a']}",
        f"#### B: feature L{first['layer']} #{first['feature_b']}",
    ]
    assert len([h for h in app.html if "Top activations" in h.value]) == 2
