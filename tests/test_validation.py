"""Tests for tracer/interventions/validation.py: predicted ablation effects against real interventions.

- direct mode: a real intervention reproduces the graph's direct prediction (float64, 1e-4 relative,
  in fact ~1e-13) for every validated node, for a cross-layer and a per-layer set;
- total prediction: equals (a) a brute-force enumeration of paths on a hand-built graph and (b) the
  frozen model run forward until every feature node follows its pre-activation linearly (direct-mode
  interventions iterated layer by layer), an independent computation of the same linearisation;
- Spearman against hand-computed values, clear errors for a wrong prompt or model, report files.
"""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.graph.graph import Graph, LogitTarget
from tracer.interventions.intervene import FeatureChange
from tracer.interventions.validation import (
    ROW_FIELDS,
    predicted_effects,
    rank,
    select_nodes,
    spearman,
    total_effects,
    validate_graph,
)
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders, direct_run

PROMPT = "the capital of the state containing Dallas is"
N_LAYERS = 3
TOP_N = 12


def f64_model(kind: str, transcoder_seed: int = 0) -> ReplacementModel:
    tokenizer = build_tokenizer()
    model = build_model("gpt2", n_layers=N_LAYERS, vocab=len(tokenizer)).to(torch.float64)
    ts = build_transcoders(kind, n_layers=N_LAYERS, d_model=32, seed=transcoder_seed)
    return ReplacementModel(model, ts, tokenizer=tokenizer, model_id=f"tiny-f64-{kind}")


@pytest.fixture(scope="module", params=["clt", "plt-jumprelu"])
def validated(request: pytest.FixtureRequest):
    """(model, full graph, report of the full graph's top nodes in every mode)."""
    rm = f64_model(request.param)
    graph = attribute(PROMPT, rm, progress=False)
    return rm, graph, validate_graph(graph, rm, top_n=TOP_N, batch_size=5)


# ---------------------------------------------------------------------------- the experiment


def test_direct_mode_reproduces_the_direct_prediction(validated) -> None:
    _, graph, report = validated
    direct = [row for row in report.rows if row["mode"] == "direct"]
    assert len(direct) == TOP_N * len(graph.logit_targets)
    for row in direct:
        scale = max(abs(row["measured"]), abs(row["predicted_direct"]))
        assert abs(row["measured"] - row["predicted_direct"]) <= 1e-4 * scale, row
        assert row["relative_error"] <= 1e-4
    assert sum(abs(row["measured"]) > 1e-3 for row in direct) > len(direct) // 2
    assert report.summary["direct"]["spearman"] > 0.999
    assert report.summary["direct"]["median_relative_error"] < 1e-8


@pytest.mark.parametrize(
    ("family", "kind"), [("gemma2", "plt-skip"), ("llama", "plt-topk"), ("qwen3", "plt-relu")]
)
def test_direct_mode_is_exact_across_families_and_custom_targets(family: str, kind: str) -> None:
    """Gemma-2's logits are soft-capped (undone before demeaning); a target may be a direction."""
    model = build_model(family).to(torch.float64)
    rm = ReplacementModel(model, build_transcoders(kind, n_layers=2, d_model=32))
    difference = LogitTarget("5 - 2 x 9", (5, 9), (1.0, -2.0), 0.5)
    graph = attribute([5, 6, 7, 8, 9, 10], rm, targets=[difference, 11], progress=False)
    report = validate_graph(graph, rm, top_n=8, modes=("direct",))
    assert len(report.rows) == 8 * 2
    # float64 gives ~1e-13; a skipped soft-cap inversion would show as ~1e-5 here
    assert max(row["relative_error"] for row in report.rows) <= 1e-9
    assert report.summary["direct"]["spearman"] > 0.999


def test_rows_cover_nodes_targets_and_modes(validated) -> None:
    _, graph, report = validated
    k = len(graph.logit_targets)
    assert len(report.rows) == TOP_N * k * 3
    assert set(report.summary) == {"direct", "frozen_attention", "full"}
    direct, total = predicted_effects(graph)
    nodes = select_nodes(graph, TOP_N)
    influence = graph.node_influence()
    for row in report.rows:
        assert set(row) == set(ROW_FIELDS)
        assert row["pos"] != 0
        assert row["predicted_direct"] == float(direct[row["target"], row["node"]])
        assert row["predicted_total"] == float(total[row["target"], row["node"]])
        layer, pos, feature = graph.active_features[graph.selected_features[row["node"]]].tolist()
        assert (row["layer"], row["pos"], row["feature"]) == (layer, pos, feature)
    # the chosen nodes are the most influential ones
    chosen = influence[nodes]
    others = torch.ones(graph.layout.n_features, dtype=torch.bool)
    others[nodes] = False
    assert chosen.min() >= influence[: graph.layout.n_features][others].max()
    for mode in ("frozen_attention", "full"):
        rows = [r for r in report.rows if r["mode"] == mode]
        predicted = torch.tensor([r["predicted_total"] for r in rows])
        measured = torch.tensor([r["measured"] for r in rows])
        assert report.summary[mode]["spearman"] == pytest.approx(spearman(predicted, measured))


def _linear_propagation(rm: ReplacementModel, graph: Graph, nodes: torch.Tensor) -> torch.Tensor:
    """(k, n_nodes) logit change when each node is removed and every other feature node follows
    its pre-activation change one for one (errors, attention and norms frozen), by running the
    frozen model forward layer after layer."""
    state = rm.run_prompt(graph.input_tokens)
    features = graph.active_features[graph.selected_features]
    activations = graph.activation_values[graph.selected_features]
    encoders = torch.stack([rm.transcoders.layer(lay).W_enc[f] for lay, _, f in features.tolist()])
    unembed = rm.unembedding
    directions = torch.stack(
        [unembed[t.token_ids[0]] - unembed.mean(0) for t in graph.logit_targets]
    )
    clean = direct_run(rm, state, [[]])
    deltas = torch.zeros(len(nodes), features.shape[0], dtype=torch.float64)
    for _ in range(N_LAYERS + 1):  # layer l's features are exact after l + 1 runs
        batch = []
        for b, node in enumerate(nodes.tolist()):
            layer, pos, feature = features[node].tolist()
            changes = [FeatureChange(layer, pos, feature, value=0.0)]
            for t in deltas[b].nonzero().flatten().tolist():
                lay, p, f = features[t].tolist()
                changes.append(FeatureChange(lay, p, f, value=float(activations[t] + deltas[b, t])))
            batch.append(changes)
        run = direct_run(rm, state, batch)
        reads = run.reads[:, features[:, 0], features[:, 1]]  # (B, n_f, d_model)
        base = clean.reads[:, features[:, 0], features[:, 1]]
        deltas = torch.einsum("bnd,nd->bn", reads - base, encoders)
        deltas[torch.arange(len(nodes)), nodes] = 0.0  # the removed node stays removed
    return ((run.final_hidden[:, -1] - clean.final_hidden[:, -1]) @ directions.T).T


def test_total_prediction_equals_linear_propagation_in_the_model(validated) -> None:
    rm, graph, _ = validated
    nodes = select_nodes(graph, 6)
    _, total = predicted_effects(graph)
    measured = _linear_propagation(rm, graph, nodes)
    predicted = total[:, nodes]
    assert (measured - predicted).abs().max() <= 1e-8 * predicted.abs().max()
    direct, _ = predicted_effects(graph)
    assert (predicted - direct[:, nodes]).abs().max() > 1e-3  # indirect paths do matter here


# ---------------------------------------------------------------------------- total effects by hand


def hand_graph(seed: int = 0) -> Graph:
    """3 layers x 2 positions, 8 active features of which 6 are nodes, 2 logits; random edges."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.tensor(
        [[0, 0, 3], [0, 1, 1], [0, 1, 4], [1, 0, 2], [1, 1, 0], [1, 1, 5], [2, 1, 1], [2, 1, 6]]
    )
    selected = torch.tensor([0, 1, 2, 4, 5, 6])  # (layer, pos, feature) order kept
    activations = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    n_f, n_errors, n_tokens, k = 6, 6, 2, 2
    n = n_f + n_errors + n_tokens + k
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    layers = active[selected, 0]
    for t, s in itertools.product(range(n_f), range(n_f)):  # feature -> later-layer feature
        if layers[t] > layers[s] and torch.rand(1, generator=gen) < 0.8:
            adjacency[t, s] = torch.randn(1, generator=gen, dtype=torch.float64)
    adjacency[:n_f, n_f : n_f + n_errors + n_tokens] = torch.randn(n_f, 8, generator=gen)
    adjacency[n - k :, : n - k] = torch.randn(k, n - k, generator=gen, dtype=torch.float64)
    adjacency[n - k, 2] = 0.0  # a feature with no direct edge to one logit
    return Graph(
        adjacency_matrix=adjacency,
        active_features=active,
        activation_values=activations,
        selected_features=selected,
        logit_targets=[LogitTarget.token(7, 0.6), LogitTarget.token(9, 0.3)],
        input_tokens=torch.tensor([0, 5]),
        input_string=None,
        n_layers=3,
    )


def brute_force_total(graph: Graph) -> torch.Tensor:
    """(k, n_f): -(sum over every path s -> t_1 -> ... -> l through feature nodes of
    A[l, t_m] * prod_i A[t_i, t_(i-1)] / a_(t_i)), enumerating every increasing node sequence."""
    a = graph.adjacency_matrix
    n_f, k = graph.layout.n_features, graph.layout.n_logits
    acts = graph.activation_values[graph.selected_features]
    logits = range(graph.layout.n_nodes - k, graph.layout.n_nodes)
    total = torch.zeros(k, n_f, dtype=torch.float64)
    for s in range(n_f):
        later = range(s + 1, n_f)
        for length in range(n_f):
            for middle in itertools.combinations(later, length):
                path = (s, *middle)
                weight = 1.0
                for source, target in itertools.pairwise(path):
                    weight *= a[target, source] / acts[target]
                for i, logit in enumerate(logits):
                    total[i, s] -= weight * a[logit, path[-1]]
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_prediction_equals_brute_force_paths(seed: int) -> None:
    graph = hand_graph(seed)
    direct, total = predicted_effects(graph)
    expected = brute_force_total(graph)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    n_f = graph.layout.n_features
    torch.testing.assert_close(direct, -graph.adjacency_matrix[-2:, :n_f])
    assert (total - direct).abs().max() > 0.1  # the graph has indirect paths


def test_total_effects_reject_a_backward_edge() -> None:
    graph = hand_graph()
    graph.adjacency_matrix[1, 4] = 0.5  # feature 4 (layer 1) -> feature 1 (layer 0)
    with pytest.raises(ValueError, match="later to an earlier node"):
        predicted_effects(graph)
    with pytest.raises(ValueError, match="self-loop"):
        total_effects(torch.zeros(1, 2), torch.eye(2), torch.ones(2))


# ---------------------------------------------------------------------------- spearman


def test_spearman_against_hand_computed_values() -> None:
    # no ties: rank differences d = (0, -1, 1, 0), rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman(torch.tensor([10.0, 20, 30, 40]), torch.tensor([1.0, 3, 2, 4])) == 0.8
    # ties: y ranks (1, 2, 3.5, 5, 3.5); centred x (-2,-1,0,1,2), y (-2,-1,.5,2,.5): 8 / sqrt(95)
    rho = spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7]))
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-15)
    assert spearman(torch.tensor([3.0, 2, 1]), torch.tensor([1.0, 5, 9])) == pytest.approx(-1.0)
    assert rank(torch.tensor([3.0, 1, 3, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(spearman(torch.tensor([1.0, 2]), torch.tensor([4.0, 4])))
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))


# ---------------------------------------------------------------------------- inputs and files


def test_mismatched_prompt_raises(validated) -> None:
    rm, graph, _ = validated
    with pytest.raises(ValueError, match="tokenizes to .* but the graph was computed from"):
        validate_graph(graph, rm, prompt="the capital of Texas is", top_n=2)


def test_graph_of_another_transcoder_set_raises(validated) -> None:
    rm, graph, _ = validated
    other = f64_model("clt" if rm.transcoders.cross_layer else "plt-jumprelu", transcoder_seed=1)
    with pytest.raises(ValueError, match="another model, transcoder set or dtype"):
        validate_graph(graph, other, top_n=2)


def test_bad_arguments_raise(validated) -> None:
    rm, graph, _ = validated
    with pytest.raises(ValueError, match="modes must be"):
        validate_graph(graph, rm, modes=("direct", "bogus"))
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        validate_graph(graph, rm, top_n=0)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        validate_graph(graph, rm, batch_size=1)


def test_pruned_graph_nodes_and_start_token() -> None:
    rm = f64_model("clt")
    graph = attribute(PROMPT, rm, zero_bos=False, progress=False)
    assert (graph.active_features[graph.selected_features, 1] == 0).any()  # BOS features exist
    pruned = graph.prune(0.5, 0.9)
    nodes = select_nodes(graph, 1000, pruned)
    features = graph.active_features[graph.selected_features[nodes]]
    assert (features[:, 1] != 0).all()
    assert pruned.node_mask[nodes].all()
    kept = pruned.node_mask[: graph.layout.n_features]
    kept &= graph.active_features[graph.selected_features, 1] != 0
    assert len(nodes) == int((kept & (pruned.node_influence[: len(kept)] > 0)).sum())
    report = validate_graph(graph, rm, top_n=3, modes=("direct",), pruned=pruned)
    assert len(report.rows) == 3 * len(graph.logit_targets)
    assert {r["node"] for r in report.rows} == set(nodes[:3].tolist())


def test_report_files(validated, tmp_path) -> None:
    _, _, report = validated
    csv_path = report.to_csv(tmp_path / "out" / "validation.csv")
    json_path = report.to_json(tmp_path / "out" / "validation.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "validation.csv",
        "validation.json",
    ]
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.rows)
    assert float(rows[0]["measured"]) == report.rows[0]["measured"]
    document = json.loads(json_path.read_text())
    assert document["summary"] == report.summary
    assert document["rows"] == report.rows
    report.summary["direct"]["spearman"] = math.nan
    assert (
        json.loads(report.to_json(json_path).read_text())["summary"]["direct"]["spearman"] is None
    )
