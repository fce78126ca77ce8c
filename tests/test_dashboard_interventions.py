"""The Interventions page and its logic (dashboards/interventions.py) on the tiny outputs folder.

- the fetch record's model loads (relative paths from the folder holding the outputs) and gives
  the logits of the model the graphs were computed with; profile.json is the fallback;
- node ids become the engine's changes, bad ones a message naming them;
- the page, ablating picked nodes in each mode, shows the measured change of every graph logit
  that an independent `intervene` + `demeaned_logits` gives, and the top tokens before and after;
  in direct mode the graph's direct prediction matches it;
- two threads (and two app sessions) on one cached model get exactly what each gets alone;
- a logit node, "set" on an error node, a model that cannot be loaded: a message, no traceback.
"""

from __future__ import annotations

import builtins
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from test_dashboard_app import APP, open_app
from test_dashboard_outputs import D_MODEL, MODEL_FOLDER, N_LAYERS, built_outputs
from test_threads import run_threads

from dashboards import catalog, pins
from dashboards.catalog import ENV_OUTPUTS, MissingOutputs
from dashboards.interventions import changes_for, load_replacement, run_intervention
from tracer.experiments import outputs as paths
from tracer.experiments.subgraphs import Subgraph
from tracer.graph.graph import Graph
from tracer.interventions.intervene import ErrorChange, FeatureChange, TokenChange, intervene
from tracer.interventions.modes import MODES
from tracer.interventions.validation import demeaned_logits
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders

PROFILE, PROMPT = "tiny-clt", "dallas"
PAGE = "interventions"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


@pytest.fixture(scope="module")
def model(root: Path) -> ReplacementModel:
    info = catalog.scan_outputs(root).profile(PROFILE).info
    return load_replacement(root, PROFILE, info)


def full_graph(root: Path, prompt: str = PROMPT) -> Graph:
    return Graph.load(paths.graph_path(root, PROFILE, prompt))


def document(root: Path, prompt: str = PROMPT) -> dict:
    return catalog.read_document(root, PROFILE, prompt)


def ids_of(document: dict, feature_type: str, n: int) -> list[str]:
    """The first n node ids of a kind, by influence."""
    nodes = [node for node in document["nodes"] if node["feature_type"] == feature_type]
    nodes.sort(key=lambda node: -node["influence"])
    return [node["node_id"] for node in nodes[:n]]


def expected_changes(node_ids: list[str]) -> list:
    """Ablations of viewer ids, parsed here: `L_F_P` features (value 0), `L_-1_P` errors, tokens
    `E_T_P` (scale 0)."""
    changes = []
    for node in node_ids:
        first, middle, pos = node.split("_")
        if first == "E":
            changes.append(TokenChange(int(pos), 0.0))
        elif middle == "-1":
            changes.append(ErrorChange(int(first), int(pos), 0.0))
        else:
            changes.append(FeatureChange(int(first), int(pos), int(middle), value=0.0))
    return changes


def independent_change(model: ReplacementModel, graph: Graph, changes, mode: str):
    """(demeaned logit change (k,), clean probabilities, probabilities after) by `intervene`."""
    result = intervene(model, graph.input_tokens, changes, mode=mode)
    after = demeaned_logits(model, result.logits[:, -1], graph.logit_targets)[0]
    clean = demeaned_logits(model, result.clean_logits[-1:], graph.logit_targets)[0]
    probabilities = [
        torch.softmax(x.float(), -1) for x in (result.clean_logits[-1], result.logits[0, -1])
    ]
    return after - clean, *probabilities


# ---- loading the model --------------------------------------------------------------------------
def test_fetched_model_gives_the_graphs_logits(root: Path, model: ReplacementModel):
    """The folder the fetch record names relative to the project loads back the model the
    graphs were computed with: the same logits, the same graph activations."""
    record = json.loads((paths.fetched_dir(root, PROFILE) / paths.FETCHED_FILE).read_text())
    assert record["model"]["path"] == MODEL_FOLDER  # relative: found beside the outputs folder
    tokenizer = build_tokenizer()
    original = build_model("gpt2", n_layers=N_LAYERS, d_model=D_MODEL, vocab=len(tokenizer))
    graph = full_graph(root)
    with torch.no_grad():
        expected = original(graph.input_tokens[None]).logits[0]
    state = model.run_prompt(graph.input_tokens)
    torch.testing.assert_close(state.logits, expected, rtol=0, atol=1e-6)
    features = graph.active_features[graph.selected_features]
    recomputed = torch.stack([state.activations[lay][pos, f] for lay, pos, f in features.tolist()])
    torch.testing.assert_close(recomputed, graph.activation_values[graph.selected_features])


def test_profile_json_is_used_without_a_fetch_record(root: Path, tmp_path: Path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    shutil.copytree(root.parent / MODEL_FOLDER, tmp_path / MODEL_FOLDER)
    sets = build_transcoders("clt", n_layers=N_LAYERS, d_model=D_MODEL, seed=3)
    info = {"model": MODEL_FOLDER, "transcoders": str(root / "sets" / "clt"), "dtype": "float32"}
    loaded = load_replacement(outputs, PROFILE, info)
    assert loaded.transcoders.n_layers == sets.n_layers
    torch.testing.assert_close(loaded.transcoders.layer(1).W_enc, sets.layer(1).W_enc)
    with pytest.raises(
        MissingOutputs, match=r"zoo/models/gone.*dvc repro` \(stage `fetch@tiny-clt`\)"
    ):
        load_replacement(outputs, PROFILE, info | {"model": "zoo/models/gone"})
    with pytest.raises(MissingOutputs, match=r"names no \['transcoders'\]"):
        load_replacement(outputs, PROFILE, {"model": MODEL_FOLDER})


def test_a_fetch_record_whose_folder_is_gone(root: Path, tmp_path: Path):
    copy = tmp_path / "outputs"
    shutil.copytree(paths.fetched_dir(root, PROFILE), paths.fetched_dir(copy, PROFILE))
    with pytest.raises(MissingOutputs, match=r"fetch record .*fetched.json.*fetch@tiny-clt"):
        load_replacement(copy, PROFILE, {})


# ---- node ids -> changes ------------------------------------------------------------------------
def test_changes_from_node_ids(root: Path):
    graph, doc = full_graph(root), document(root)
    feature, error = (
        ids_of(doc, "cross layer transcoder", 1)[0],
        ids_of(doc, "mlp reconstruction error", 1)[0],
    )
    token = f"E_{int(graph.input_tokens[2])}_2"
    for source in (graph, doc):
        picked = [feature, error] + ([token] if source is graph else [])
        assert changes_for(picked, "ablate", 7.0, source) == expected_changes(picked)
    layer, index, pos = map(int, feature.split("_"))
    assert changes_for([feature, token], "scale", -2.0, graph) == [
        FeatureChange(layer, pos, index, scale=-2.0),
        TokenChange(2, -2.0),
    ]
    assert changes_for([feature], "set", 1.5, doc) == [FeatureChange(layer, pos, index, value=1.5)]
    logit = ids_of(doc, "logit", 1)[0]
    with pytest.raises(ValueError, match=rf"'{logit}' is a logit node"):
        changes_for([feature, logit], "ablate", 0.0, graph)
    with pytest.raises(ValueError, match=rf"'{error}' is an error node: set is for features only"):
        changes_for([feature, error], "set", 1.0, doc)
    with pytest.raises(ValueError, match=r"'9_9_99' is not a node of this graph \(ids look like"):
        changes_for(["9_9_99"], "ablate", 0.0, graph)
    with pytest.raises(ValueError, match=r"action must be one of ablate, scale, set, got 'zero'"):
        changes_for([feature], "zero", 0.0, graph)
    with pytest.raises(ValueError, match="pick at least one"):
        changes_for([], "ablate", 0.0, graph)
    with pytest.raises(ValueError, match="finite"):
        changes_for([feature], "scale", float("inf"), graph)


# ---- the page -----------------------------------------------------------------------------------
def open_page(monkeypatch, root: Path) -> AppTest:
    app = open_app(monkeypatch, root, PAGE)
    assert app.title[0].value == f"Interventions: {PROFILE} / {PROMPT}"  # the first graph
    return app


def run_on_page(app: AppTest, node_ids: list[str], action: str, amount: float, mode: str):
    app.radio(key=f"interventions_source_{PROFILE}_{PROMPT}").set_value("picked nodes").run()
    app.multiselect(key=f"interventions_nodes_{PROFILE}_{PROMPT}").set_value(node_ids)
    app.radio(key="interventions_do").set_value(action)
    app.number_input(key="interventions_amount").set_value(amount)
    app.selectbox(key="interventions_mode").set_value(mode)
    (button,) = [b for b in app.button if b.label == "Run intervention"]
    button.click().run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def table_with(app: AppTest, column: str):
    (table,) = [d.value for d in app.dataframe if column in d.value.columns]
    return table


@pytest.mark.parametrize("mode", MODES)
def test_page_shows_the_measured_change_of_a_real_intervention(
    monkeypatch, root: Path, model: ReplacementModel, mode: str
):
    doc, graph = document(root), full_graph(root)
    picked = ids_of(doc, "cross layer transcoder", 2) + ids_of(doc, "mlp reconstruction error", 1)
    app = run_on_page(open_page(monkeypatch, root), picked, "ablate", 0.0, mode)
    assert not app.warning and not app.error
    measured, clean, after = independent_change(model, graph, expected_changes(picked), mode)
    logits = table_with(app, "measured")
    assert list(logits["target"]) == [t.label for t in graph.logit_targets]
    shown = torch.tensor(logits["measured"].to_list(), dtype=torch.float64)
    assert measured.abs().max() > 1e-3  # the ablation does move the logits
    torch.testing.assert_close(shown, measured.double(), rtol=1e-5, atol=1e-5)
    if mode == "direct":
        direct = torch.tensor(logits["predicted_direct"].to_list(), dtype=torch.float64)
        torch.testing.assert_close(direct, shown, rtol=1e-4, atol=1e-4 * float(shown.abs().max()))
    before_table, after_table = (
        table_with(app, c) for c in ("probability_after", "probability_before")
    )
    for table, probabilities in ((before_table, clean), (after_table, after)):
        top = probabilities.topk(len(table))
        assert table["token_id"].to_list() == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor(table["probability"].to_list()), top.values, rtol=1e-5, atol=1e-6
        )
    assert not torch.equal(clean, after)
    generated = {t.label: t.value for t in app.text_area}
    assert set(generated) == {"before", "after"} and generated["before"]


def test_pinned_nodes_and_supernodes_are_offered(monkeypatch, root: Path, model):
    doc, graph = document(root), full_graph(root)
    features = ids_of(doc, "cross layer transcoder", 3)
    app = open_app(monkeypatch, root)
    subgraph = Subgraph(pinned=tuple(features)).group("pair", features[:2])
    app.session_state[pins._key(PROFILE, PROMPT)] = subgraph
    app.switch_page(f"views/{PAGE}.py").run()
    source = app.radio(key=f"interventions_source_{PROFILE}_{PROMPT}")
    assert source.options == ["pinned nodes", "supernode pair", "picked nodes"]
    assert source.value == "pinned nodes"
    source.set_value("supernode pair").run()
    (button,) = [b for b in app.button if b.label == "Run intervention"]
    button.click().run()
    assert not app.exception and not app.warning
    measured = independent_change(model, graph, expected_changes(features[:2]), "direct")[0]
    shown = torch.tensor(table_with(app, "measured")["measured"].to_list(), dtype=torch.float64)
    torch.testing.assert_close(shown, measured.double(), rtol=1e-5, atol=1e-5)


def test_bad_node_sets_give_a_message(monkeypatch, root: Path):
    doc = document(root)
    feature, error = (
        ids_of(doc, "cross layer transcoder", 1)[0],
        ids_of(doc, "mlp reconstruction error", 1)[0],
    )
    logit = ids_of(doc, "logit", 1)[0]
    app = open_app(monkeypatch, root)
    app.session_state[pins._key(PROFILE, PROMPT)] = Subgraph(pinned=(feature, logit))
    app.switch_page(f"views/{PAGE}.py").run()
    (button,) = [b for b in app.button if b.label == "Run intervention"]
    button.click().run()
    assert not app.exception
    assert any(f"'{logit}' is a logit node" in w.value for w in app.warning)
    assert not [d for d in app.dataframe if "measured" in d.value.columns]

    app = run_on_page(open_page(monkeypatch, root), [feature, error], "set", 2.0, "direct")
    assert any(f"'{error}' is an error node: set is for features" in w.value for w in app.warning)
    assert not [d for d in app.dataframe if "measured" in d.value.columns]


def test_without_the_full_graph_only_measured_changes(
    monkeypatch, root: Path, model: ReplacementModel, tmp_path: Path
):
    """The graph file not pulled: the measured change still shown, the predictions left out."""
    copy = tmp_path / "outputs"
    shutil.copytree(root, copy)
    shutil.copytree(root.parent / MODEL_FOLDER, tmp_path / MODEL_FOLDER)
    paths.graph_path(copy, PROFILE, PROMPT).unlink()
    picked = ids_of(document(root), "cross layer transcoder", 2)
    app = run_on_page(open_page(monkeypatch, copy), picked, "ablate", 0.0, "direct")
    assert any("full graph file is not here" in i.value for i in app.info)
    logits = table_with(app, "measured")
    assert "predicted_direct" not in logits.columns and "predicted_total" not in logits.columns
    graph = full_graph(root)
    measured = independent_change(model, graph, expected_changes(picked), "direct")[0]
    # the document's logit nodes are the graph's single-token targets, in its order
    assert list(logits["token_ids"]) == [list(t.token_ids) for t in graph.logit_targets]
    shown = torch.tensor(logits["measured"].to_list(), dtype=torch.float64)
    torch.testing.assert_close(shown, measured.double(), rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_be_loaded_gives_a_message(monkeypatch, root: Path, tmp_path: Path):
    """The outputs copied without the model folder beside them: the record's path is missing."""
    copy = tmp_path / "outputs"
    shutil.copytree(root, copy)
    app = open_page(monkeypatch, copy)
    feature = ids_of(document(root), "cross layer transcoder", 1)
    app = run_on_page(app, feature, "ablate", 0.0, "full")
    assert any("fetch@tiny-clt" in e.value and MODEL_FOLDER in e.value for e in app.error)


# ---- several sessions at once -------------------------------------------------------------------
def test_two_threads_on_one_model_get_what_each_gets_alone(root: Path, model: ReplacementModel):
    work = []
    for prompt, action, amount in (("dallas", "ablate", 0.0), ("mary", "scale", -1.0)):
        graph, doc = full_graph(root, prompt), document(root, prompt)
        picked = ids_of(doc, "cross layer transcoder", 2) + ids_of(
            doc, "mlp reconstruction error", 1
        )
        work.append((graph, picked, action, amount))

    def jobs() -> list:
        return [
            lambda g=g, p=p, a=a, x=x: [
                run_intervention(model, g.input_string, g, p, a, x, mode, max_new_tokens=3)
                for mode in MODES
            ]
            for g, p, a, x in work
        ]

    alone = run_threads(jobs(), at_once=False)
    for _ in range(2):
        together = run_threads(jobs(), at_once=True)
        for first, second in zip(alone, together, strict=True):
            for a, b in zip(first, second, strict=True):
                assert torch.equal(a.measured, b.measured)
                assert (a.logits, a.top_before, a.top_after) == (
                    b.logits,
                    b.top_before,
                    b.top_after,
                )
                assert (a.text_before, a.text_after) == (b.text_before, b.text_after)
    assert alone[0][0].logits != alone[1][0].logits and alone[0][0].changes != alone[1][0].changes


def test_two_app_sessions_at_once(monkeypatch, root: Path):
    """Two sessions of the app, each intervening on its own prompt, run in two threads at once:
    each shows what it shows when run alone (the model is cached once for both)."""
    monkeypatch.setenv(ENV_OUTPUTS, str(root))
    # Each AppTest compiles the page on every run, and CPython 3.11's compiler is not safe to run
    # from two threads at once ("AST constructor recursion depth mismatch"); a served app compiles
    # a page once, under Streamlit's script-cache lock. Only compiling takes turns here: the
    # interventions still run at once.
    compiling, compile_alone = threading.Lock(), builtins.compile

    def compile_in_turn(*args, **kwargs):
        with compiling:
            return compile_alone(*args, **kwargs)

    monkeypatch.setattr(builtins, "compile", compile_in_turn)

    def session(prompt: str, mode: str) -> AppTest:
        app = AppTest.from_file(str(APP), default_timeout=60).run()
        app.switch_page(f"views/{PAGE}.py").run()
        app.selectbox(key="graph_profile").set_value(PROFILE).run()
        app.selectbox(key="graph_prompt").set_value(prompt).run()
        doc = document(root, prompt)
        picked = ids_of(doc, "cross layer transcoder", 2)
        app.radio(key=f"interventions_source_{PROFILE}_{prompt}").set_value("picked nodes").run()
        app.multiselect(key=f"interventions_nodes_{PROFILE}_{prompt}").set_value(picked)
        app.selectbox(key="interventions_mode").set_value(mode)
        return app

    def shown(app: AppTest) -> list:
        (button,) = [b for b in app.button if b.label == "Run intervention"]
        button.click().run()
        assert not app.exception, [e.value for e in app.exception]
        return [d.value.to_dict("list") for d in app.dataframe] + [t.value for t in app.text_area]

    plans = (("dallas", "full"), ("mary", "frozen_attention"))
    alone = [shown(session(*plan)) for plan in plans]
    apps = [session(*plan) for plan in plans]
    together = run_threads([lambda a=a: shown(a) for a in apps], at_once=True)
    assert together == alone
    assert alone[0] != alone[1]
