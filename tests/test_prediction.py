"""Tests for tracer/interventions/prediction.py: a graph's predicted change of a multi-node
intervention.

- direct: several features (set, scaled, ablated), an error and a token clamped at once change the
  demeaned logits of the graph's targets, in the "direct" intervention mode, by exactly the direct
  prediction (float64: 1e-9 relative; float32: 1e-4), for a cross-layer and a per-layer set;
- total: equals a brute-force propagation written here (node by node, plain Python loops);
- one feature ablated alone: both predictions are `validation.predicted_effects`' column;
- bad input raises, naming the node.
"""

from __future__ import annotations

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.graph.graph import Graph
from tracer.interventions.intervene import ErrorChange, FeatureChange, TokenChange, run_with_changes
from tracer.interventions.prediction import (
    node_kind,
    predict_change,
    relative_change,
    relative_changes,
)
from tracer.interventions.validation import demeaned_logits, predicted_effects, select_nodes
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders

PROMPT = "the capital of the state containing Dallas is"
N_LAYERS = 3


def f64_model(kind: str) -> ReplacementModel:
    tokenizer = build_tokenizer()
    model = build_model("gpt2", n_layers=N_LAYERS, vocab=len(tokenizer)).to(torch.float64)
    ts = build_transcoders(kind, n_layers=N_LAYERS, d_model=32)
    return ReplacementModel(model, ts, tokenizer=tokenizer, model_id=f"tiny-f64-{kind}")


@pytest.fixture(scope="module", params=["clt", "plt-relu"])
def f64(request: pytest.FixtureRequest) -> tuple[ReplacementModel, Graph]:
    rm = f64_model(request.param)
    return rm, attribute(PROMPT, rm, progress=False)


def feature_of(graph: Graph, node: int) -> tuple[int, int, int]:
    layer, pos, feature = graph.active_features[graph.selected_features[node]].tolist()
    return layer, pos, feature


def several_changes(graph: Graph) -> list:
    """The most influential feature of each layer (set to a value, scaled, ablated: a clamped
    feature downstream of another), an error, a token."""
    ranked = select_nodes(graph, 10_000).tolist()
    chosen = [
        next(n for n in ranked if feature_of(graph, n)[0] == i) for i in range(graph.n_layers)
    ]
    chosen += [n for n in ranked if n not in chosen]
    first, second, third = chosen[:3]
    activation = float(graph.activation_values[graph.selected_features[first]])
    layer, pos, feature = feature_of(graph, first)
    changes = [FeatureChange(layer, pos, feature, value=2.5 * activation + 0.3)]
    layer, pos, feature = feature_of(graph, second)
    changes.append(FeatureChange(layer, pos, feature, scale=-1.5))
    layer, pos, feature = feature_of(graph, third)
    changes.append(FeatureChange(layer, pos, feature, value=0.0))
    changes.append(ErrorChange(1, graph.n_pos - 2, 0.4))
    changes.append(TokenChange(3, 1.8))
    return changes


def measured_change(rm: ReplacementModel, graph: Graph, changes: list, mode: str) -> torch.Tensor:
    """(k,) change of the graph's demeaned logit targets under a real intervention (against an
    unchanged row of the same batch)."""
    state = rm.run_prompt(graph.input_tokens, zero_bos=False)
    ids = graph.input_tokens[None].expand(2, -1)
    result = run_with_changes(rm, state, ids, [[], changes], mode, with_activations=False)
    values = demeaned_logits(rm, result.logits[:, -1], graph.logit_targets)  # (2, k)
    return values[1] - values[0]


def assert_close_relative(measured: torch.Tensor, predicted: torch.Tensor, rtol: float) -> None:
    scale = predicted.abs().max()
    assert scale > 1e-3  # the intervention moves the logits
    assert (measured.double() - predicted.double()).abs().max() <= rtol * scale, (
        measured,
        predicted,
    )


# ---------------------------------------------------------------------------- direct: exactness


def test_direct_prediction_is_a_real_direct_intervention(f64) -> None:
    rm, graph = f64
    changes = several_changes(graph)
    relative = relative_changes(graph, changes)
    assert len(relative) == len(changes)
    predicted = predict_change(graph, relative)
    assert_close_relative(measured_change(rm, graph, changes, "direct"), predicted.direct, 1e-9)
    # clamping several nodes at once is not the sum of one-node predictions when paths exist
    assert (predicted.total - predicted.direct).abs().max() > 1e-3


def test_direct_prediction_in_float32(plt_model: ReplacementModel, plt_graph: Graph) -> None:
    changes = several_changes(plt_graph)
    predicted = predict_change(plt_graph, relative_changes(plt_graph, changes))
    measured = measured_change(plt_model, plt_graph, changes, "direct")
    assert_close_relative(measured, predicted.direct, 1e-4)


def test_every_position_of_a_feature(f64) -> None:
    """A change with pos=None clamps the feature wherever it is a node (and only there)."""
    rm, graph = f64
    layer, _, feature = feature_of(graph, int(select_nodes(graph, 1)[0]))
    change = FeatureChange(layer, None, feature, scale=0.0)
    relative = relative_changes(graph, [change])
    nodes = [
        i
        for i in range(graph.layout.n_features)
        if feature_of(graph, i)[0] == layer and feature_of(graph, i)[2] == feature
    ]
    assert sorted(relative) == nodes and set(relative.values()) == {-1.0}
    measured = measured_change(rm, graph, [change], "direct")
    assert_close_relative(measured, predict_change(graph, relative).direct, 1e-9)


# ---------------------------------------------------------------------------- total: brute force


def brute_force_total(graph: Graph, relative: dict[int, float]) -> list[float]:
    """Walk the feature nodes in node order: a clamped one keeps its r, a free one takes
    sum_s A[j, s] r_s / a_j over every source already known; then each logit sums A[k, s] r_s."""
    a = graph.adjacency_matrix.tolist()
    layout = graph.layout
    activations = graph.activation_values[graph.selected_features].tolist()
    r = [0.0] * layout.n_nodes
    for node, change in relative.items():
        if node >= layout.n_features:
            r[node] = change
    for j in range(layout.n_features):
        if j in relative:
            r[j] = relative[j]
            continue
        pre = 0.0
        for s in range(layout.n_nodes):
            if r[s] != 0.0:
                pre += a[j][s] * r[s]
        r[j] = pre / activations[j]
    first_logit = layout.n_nodes - layout.n_logits
    return [
        sum(a[k][s] * r[s] for s in range(layout.n_nodes))
        for k in range(first_logit, layout.n_nodes)
    ]


def test_total_prediction_equals_brute_force_propagation(f64) -> None:
    _, graph = f64
    relative = relative_changes(graph, several_changes(graph))
    expected = torch.tensor(brute_force_total(graph, relative), dtype=torch.float64)
    total = predict_change(graph, relative).total
    assert total.dtype == torch.float64
    torch.testing.assert_close(
        total, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max())
    )


def test_one_ablated_feature_is_the_validation_prediction(f64) -> None:
    _, graph = f64
    direct, total = predicted_effects(graph)
    for node in select_nodes(graph, 4).tolist():
        layer, pos, feature = feature_of(graph, node)
        relative = relative_changes(graph, [FeatureChange(layer, pos, feature, scale=0.0)])
        assert relative == {node: -1.0}
        predicted = predict_change(graph, relative)
        torch.testing.assert_close(predicted.direct, direct[:, node], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(predicted.total, total[:, node], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- bad input


def test_relative_changes_by_kind(plt_graph: Graph) -> None:
    layout = plt_graph.layout
    activation = float(plt_graph.activation_values[plt_graph.selected_features[0]])
    assert relative_change(plt_graph, 0, value=3.0) == pytest.approx(
        (3.0 - activation) / activation
    )
    assert relative_change(plt_graph, 0, scale=0.25) == -0.75
    error, token = layout.n_features, layout.n_features + layout.n_errors
    assert (node_kind(plt_graph, error), node_kind(plt_graph, token)) == ("error", "token")
    assert relative_change(plt_graph, error, scale=0.0) == -1.0
    assert relative_change(plt_graph, token, scale=2.0) == 1.0
    assert node_kind(plt_graph, layout.n_nodes - 1) == "logit"


def test_bad_input_names_the_node(plt_graph: Graph) -> None:
    layout = plt_graph.layout
    n, error = layout.n_nodes, layout.n_features + 3
    with pytest.raises(ValueError, match=rf"node index {n} out of range \[0, {n}\)"):
        predict_change(plt_graph, {n: -1.0})
    with pytest.raises(ValueError, match=r"node index -1 out of range"):
        relative_change(plt_graph, -1, scale=0.0)
    with pytest.raises(ValueError, match=rf"node {n - 1} is a logit node"):
        predict_change(plt_graph, {0: -1.0, n - 1: -1.0})
    with pytest.raises(ValueError, match=rf"node {n - 1} is a logit node"):
        relative_change(plt_graph, n - 1, scale=0.0)
    with pytest.raises(ValueError, match=rf"node {error} is an error node: only a feature can be"):
        relative_change(plt_graph, error, value=1.0)
    with pytest.raises(ValueError, match="exactly one of value= or scale="):
        relative_change(plt_graph, 0)
    with pytest.raises(ValueError, match="must be finite"):
        predict_change(plt_graph, {0: float("nan")})
    # a feature that is not a node of the graph, and a node changed twice
    with pytest.raises(ValueError, match="is not a node of this graph"):
        relative_changes(plt_graph, [FeatureChange(0, 0, 0, scale=0.0)])
    with pytest.raises(ValueError, match="changed twice"):
        relative_changes(plt_graph, [ErrorChange(1, 2, 0.0), ErrorChange(1, None, 0.5)])
    with pytest.raises(ValueError, match=r"position 99 out of range"):
        relative_changes(plt_graph, [TokenChange(99, 0.0)])
