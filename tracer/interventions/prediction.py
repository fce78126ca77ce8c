"""What a graph predicts for a multi-node intervention: the change of each of its logit nodes.

A clamped node s takes the relative change `r_s = Δactivation / activation`: a feature set to v
has `r = (v - a) / a`, one scaled by s `r = s - 1` (ablated: -1); error and token nodes are scaled
only. With `A[target, source]` the adjacency (every column already carries its source's value),
the change of logit node k (a demeaned logit, as `validation.demeaned_logits` measures it) is

- direct: `Σ_s A[k, s] r_s` over the clamped nodes: the "direct" intervention mode's change,
  exactly (attention, norms and MLP outputs frozen, so every edge is exact and they add up);
- total: the unclamped feature nodes respond linearly, `r_j = Σ_s A[j, s] r_s / a_j` (an active
  feature moves one for one with its pre-activation; see `validation`), errors and tokens that are
  not clamped keep `r = 0`, clamped nodes keep theirs; then `Σ_s A[k, s] r_s` over every node.
  Node order puts each edge from a lower to a higher feature index, so this is one unit lower
  triangular solve (`validation.total_effects`), with the clamped features' rows removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tracer.graph.graph import Graph
from tracer.interventions.intervene import Change, ErrorChange, FeatureChange, TokenChange
from tracer.interventions.validation import total_effects


@dataclass(frozen=True)
class PredictedChange:
    """The predicted change of each logit node's value, (k,) each, in the graph's logit order."""

    direct: torch.Tensor
    total: torch.Tensor


def node_kind(graph: Graph, node: int) -> str:
    """feature | error | token | logit, for a node index of the full graph."""
    layout = graph.layout
    if not 0 <= node < layout.n_nodes:
        raise ValueError(f"node index {node} out of range [0, {layout.n_nodes})")
    if node < layout.n_features:
        return "feature"
    if node < layout.n_features + layout.n_errors:
        return "error"
    if node < layout.n_nodes - layout.n_logits:
        return "token"
    return "logit"


def relative_change(
    graph: Graph, node: int, *, value: float | None = None, scale: float | None = None
) -> float:
    """r = Δactivation / activation of node `node` set to `value` (features only) or scaled."""
    if (value is None) == (scale is None):
        raise ValueError(f"node {node}: give exactly one of value= or scale=")
    number = value if value is not None else scale
    if not math.isfinite(number):
        raise ValueError(f"node {node}: value/scale must be finite, got {number}")
    kind = node_kind(graph, node)
    if kind == "logit":
        raise ValueError(
            f"node {node} is a logit node: logits are what is predicted, they cannot be clamped"
        )
    if value is None:
        return scale - 1.0
    if kind != "feature":
        raise ValueError(
            f"node {node} is {'an' if kind == 'error' else 'a'} {kind} node: only a feature can be "
            "set to a value; scale it instead"
        )
    activation = float(graph.activation_values[graph.selected_features[node]])
    return (value - activation) / activation


def relative_changes(graph: Graph, changes: Sequence[Change]) -> dict[int, float]:
    """The graph's node index -> r of each node the engine's `changes` clamp.

    A change with `pos=None` clamps its node at every position; a feature that is not a node of
    the graph (inactive there, or not selected) cannot be predicted and raises.
    """
    layout = graph.layout
    features = {
        (layer, pos, feature): i
        for i, (layer, pos, feature) in enumerate(
            graph.active_features[graph.selected_features].tolist()
        )
    }
    positions = range(graph.n_pos)
    relative: dict[int, float] = {}
    for change in changes:
        every = positions if change.pos is None else [change.pos]
        for pos in every:
            if not 0 <= pos < graph.n_pos:
                raise ValueError(f"{change}: position {pos} out of range [0, {graph.n_pos})")
            if isinstance(change, FeatureChange):
                node = features.get((change.layer, pos, change.feature))
                if node is None:
                    if change.pos is None:
                        continue  # not active at this position: nothing there to predict
                    raise ValueError(
                        f"{change}: feature {change.feature} of layer {change.layer} at position "
                        f"{pos} is not a node of this graph, so the graph predicts nothing for it"
                    )
            elif isinstance(change, ErrorChange):
                if not 0 <= change.layer < graph.n_layers:
                    raise ValueError(
                        f"{change}: layer {change.layer} out of range [0, {graph.n_layers})"
                    )
                node = layout.n_features + change.layer * graph.n_pos + pos
            elif isinstance(change, TokenChange):
                node = layout.n_features + layout.n_errors + pos
            else:
                raise TypeError(f"not an intervention: {change!r}")
            if node in relative:
                raise ValueError(f"{change}: node {node} is changed twice")
            value = getattr(change, "value", None)
            scale = change.scale if value is None else None
            relative[node] = relative_change(graph, node, value=value, scale=scale)
    return relative


def predict_change(graph: Graph, relative: Mapping[int, float]) -> PredictedChange:
    """(direct, total) change of each logit node when each node `s` of `relative` is clamped to
    the relative change `relative[s]` (module docstring); (k,) each, in float32 or wider."""
    layout, adjacency = graph.layout, graph.adjacency_matrix
    dtype = torch.promote_types(adjacency.dtype, torch.float32)  # float16 storage: solve in f32
    r = torch.zeros(layout.n_nodes, dtype=dtype)
    for node, change in relative.items():
        if node_kind(graph, int(node)) == "logit":
            raise ValueError(
                f"node {node} is a logit node: logits are what is predicted, they cannot be clamped"
            )
        if not math.isfinite(change):
            raise ValueError(f"node {node}: relative change must be finite, got {change}")
        r[int(node)] = change
    features, logits = layout.feature_slice, layout.logit_slice
    logit_rows = adjacency[logits].to(dtype)  # (k, N)
    direct = logit_rows @ r

    clamped = torch.zeros(layout.n_features, dtype=torch.bool)
    clamped[[n for n in relative if n < layout.n_features]] = True
    others = r.clone()  # clamped errors and tokens: (N,), zero on the feature nodes
    others[features] = 0
    activations = graph.activation_values[graph.selected_features].to(dtype)
    # a free feature's first response, to the clamped errors and tokens; a clamped one keeps r
    feature_rows = adjacency[features].to(dtype)  # (n_f, N)
    start = torch.where(clamped, r[features], (feature_rows @ others) / activations)
    # a clamped feature does not respond to the others: its row of A_FF is left out
    feature_block = torch.where(clamped[:, None], 0, feature_rows[:, features])
    through_features = total_effects(logit_rows[:, features], feature_block, activations)
    total = through_features @ start + logit_rows @ others
    return PredictedChange(direct=direct, total=total)
