"""Graph validation: do a graph's predicted ablation effects match real interventions?

For the top-N feature nodes by influence, each node s is ablated (activation set to 0) and the change
of every logit target's demeaned logit (logit minus the mean over the vocabulary, at the last
position) is compared with what the graph predicts. With `A[target, source]` the adjacency, a_t the
activation of feature t, F the feature nodes and L the logit nodes:

- direct: `-A[l, s]`. The source's own activation already multiplies its column, so removing it
  removes the whole entry. The "direct" intervention mode must reproduce it exactly.
- total: `-T[l, s]` with `T = A_LF (I - D^-1 A_FF)^-1`, D = diag(a_F): the sum over every path
  s -> t_1 -> ... -> t_k -> l through feature nodes of `A[l, t_k] * prod_i A[t_i, t_(i-1)] / a_(t_i)`.
  An entry A[t, s] of a feature row is the change of t's *pre-activation* when s is removed, and an
  active feature's activation moves one for one with its pre-activation (ReLU, JumpReLU and TopK
  alike, as long as it stays active), so an intermediate node t passes on the fraction
  `A[t, s] / a_t` of its own column. Node order puts every edge from a lower to a higher index
  (layer order), so I - D^-1 A_FF is unit lower triangular and one triangular solve gives T.
  This linearisation holds the errors and attention fixed; "frozen_attention" and "full" runs show
  how far the real model departs from it.

Rows come per (node, logit target, mode); the summary per mode has the Spearman rank correlation
between the matching prediction (direct for "direct", total otherwise) and the measurement, and the
median relative error `|measured - predicted| / max(|measured|, |predicted|)` (0 when both are 0).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tracer.atomic import write_text
from tracer.graph.graph import Graph, LogitTarget
from tracer.graph.pruning import PruneResult
from tracer.interventions.intervene import MODES, FeatureChange, run_with_changes
from tracer.model.replacement import PromptState, ReplacementModel

ROW_FIELDS = (
    "mode",
    "node",
    "layer",
    "pos",
    "feature",
    "activation",
    "influence",
    "target",
    "target_label",
    "predicted_direct",
    "predicted_total",
    "measured",
    "relative_error",
)
_TRIANGLE_CHUNK = 1024  # rows per block when checking that A_FF is strictly lower triangular


@dataclass
class ValidationReport:
    """Per (node, target, mode) rows (keys `ROW_FIELDS`) and a summary per mode."""

    rows: list[dict]
    summary: dict[str, dict]
    metadata: dict = field(default_factory=dict)

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV, atomically."""

        def write(handle) -> None:
            writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS))
            writer.writeheader()
            writer.writerows(self.rows)

        return write_text(path, write)

    def to_json(self, path: str | Path) -> Path:
        """Write `{metadata, summary, rows}` as JSON (NaN as null), atomically."""
        document = json_safe(
            {"metadata": self.metadata, "summary": self.summary, "rows": self.rows}
        )
        return write_text(path, lambda h: json.dump(document, h, indent=1))


def json_safe(value):
    """A copy of nested dicts/lists whose non-finite floats are None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# ---- graph side ---------------------------------------------------------------------------------
def total_effects(
    logit_rows: torch.Tensor, feature_block: torch.Tensor, activations: torch.Tensor
) -> torch.Tensor:
    """T = A_LF (I - D^-1 A_FF)^-1: the summed path effect of removing each feature on each logit.

    logit_rows (k, n_f) = A_LF, feature_block (n_f, n_f) = A_FF (strictly lower triangular in node
    order), activations (n_f,) = diag(D), non-zero. Returns (k, n_f).
    """
    n = feature_block.shape[0]
    for start in range(0, n, _TRIANGLE_CHUNK):
        block = feature_block[start : start + _TRIANGLE_CHUNK]
        if bool(torch.triu(block, diagonal=start).any()):
            raise ValueError(
                "the feature-feature block of the adjacency has an edge from a later to an earlier "
                "node (or a self-loop): node order must be (layer, pos, feature)"
            )
    if bool((activations == 0).any()):
        raise ValueError("a feature node has activation 0; graph feature nodes must be active")
    # unitriangular: the (zero) diagonal of -M is not read and taken as 1, so this is I - M
    scaled = feature_block / activations[:, None]  # M = D^-1 A_FF
    return torch.linalg.solve_triangular(
        -scaled, logit_rows, upper=False, left=False, unitriangular=True
    )


def predicted_effects(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(direct, total) predicted change of each logit when each feature node is ablated, (k, n_f)."""
    layout, adjacency = graph.layout, graph.adjacency_matrix
    features, logits = layout.feature_slice, layout.logit_slice
    dtype = torch.promote_types(adjacency.dtype, torch.float32)  # float16 storage: solve in f32
    activations = graph.activation_values[graph.selected_features].to(dtype)
    direct = -adjacency[logits, features].to(dtype)
    feature_block = adjacency[features, features].to(dtype)
    total = -total_effects(adjacency[logits, features].to(dtype), feature_block, activations)
    return direct, total


def select_nodes(graph: Graph, top_n: int, pruned: PruneResult | None = None) -> torch.Tensor:
    """Feature node indices (<= top_n) of highest influence, kept by `pruned` if given.

    Nodes at position 0 (the start token, whose features the graph zeroes) and nodes with no
    influence on the logits are skipped.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    n_features = graph.layout.n_features
    influence = graph.node_influence() if pruned is None else pruned.node_influence
    influence = influence[:n_features].clone()
    eligible = influence > 0
    eligible &= graph.active_features[graph.selected_features, 1] != 0
    if pruned is not None:
        eligible &= pruned.node_mask[:n_features]
    influence[~eligible] = -1
    order = influence.argsort(descending=True, stable=True)
    return order[: min(top_n, int(eligible.sum()))]


# ---- model side ---------------------------------------------------------------------------------
def demeaned_logits(
    model: ReplacementModel, logits: torch.Tensor, targets: Sequence[LogitTarget]
) -> torch.Tensor:
    """(B, vocab) logits at one position -> (B, k): each target's weighted demeaned logit.

    Gemma-2's logit nodes sit before the final soft-cap, which is undone here (atanh).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if model.softcap:
        logits = torch.atanh(logits / model.softcap) * model.softcap
    demeaned = logits - logits.mean(-1, keepdim=True)
    columns = []
    for target in targets:
        weights = torch.tensor(target.weights, dtype=logits.dtype)
        columns.append(demeaned[:, list(target.token_ids)] @ weights)
    return torch.stack(columns, dim=1)


def measure_ablations(
    model: ReplacementModel,
    state: PromptState,
    nodes: Sequence[tuple[int, int, int]],
    targets: Sequence[LogitTarget],
    mode: str,
    batch_size: int = 32,
) -> torch.Tensor:
    """(n_nodes, k): change of each target's demeaned logit when each (layer, pos, feature) is set
    to 0 in `mode`. Each batch carries an unchanged row, the baseline of its own rows.

    `state` is the prompt's `run_prompt` (the frozen modes replay its patterns and scales).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one row is the baseline), got {batch_size}")
    measured = []
    per_batch = batch_size - 1
    for start in range(0, len(nodes), per_batch):
        chunk = nodes[start : start + per_batch]
        batch = [[], *([FeatureChange(lay, pos, feat, value=0.0)] for lay, pos, feat in chunk)]
        ids = state.input_ids[None].expand(len(batch), -1)
        result = run_with_changes(model, state, ids, batch, mode, with_activations=False)
        values = demeaned_logits(model, result.logits[:, -1], targets)  # (B, k)
        measured.append(values[1:] - values[:1])
    return torch.cat(measured)


def _check_graph_fits(graph: Graph, model: ReplacementModel, state: PromptState, nodes) -> None:
    """Fail clearly when the graph's feature activations are not this model's."""
    if graph.n_layers != model.n_layers:
        raise ValueError(
            f"the graph has {graph.n_layers} layers but the model has {model.n_layers}"
        )
    features = graph.active_features[graph.selected_features]
    if features.numel() and int(features[:, 2].max()) >= model.transcoders.d_transcoder:
        raise ValueError(
            f"the graph has feature index {int(features[:, 2].max())} but the transcoder set has "
            f"{model.transcoders.d_transcoder} features per layer"
        )
    stored = graph.activation_values[graph.selected_features[nodes]].double()
    recomputed = torch.stack(
        [state.activations[lay][pos, feat] for lay, pos, feat in features[nodes].tolist()]
    ).double()
    scale = stored.abs().max().clamp_min(1e-30)
    worst = (stored - recomputed).abs().argmax()
    if not torch.allclose(recomputed, stored, rtol=1e-2, atol=1e-3 * float(scale)):
        layer, pos, feat = features[nodes][worst].tolist()
        raise ValueError(
            f"the graph's activation of feature {layer}:{pos}:{feat} is {float(stored[worst]):.6g}"
            f" but this model and transcoder set give {float(recomputed[worst]):.6g}: the graph "
            f"was computed with another model, transcoder set or dtype (graph: model "
            f"{graph.metadata.get('model_id')!r}, transcoders "
            f"{graph.metadata.get('transcoder_set')!r})"
        )


def _prompt_ids(graph: Graph, model: ReplacementModel, prompt) -> torch.Tensor:
    if prompt is None:
        prompt = graph.input_string if graph.input_string is not None else graph.input_tokens
    ids = model.tokenize(prompt)
    if not torch.equal(ids, graph.input_tokens.to(ids.dtype)):
        raise ValueError(
            f"the prompt {prompt!r} tokenizes to {ids.tolist()} but the graph was computed from "
            f"{graph.input_tokens.tolist()}: validate a graph with its own prompt"
        )
    return ids


# ---- the experiment -----------------------------------------------------------------------------
def relative_error(measured: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """|m - p| / max(|m|, |p|), elementwise; 0 where both are 0."""
    scale = torch.maximum(measured.abs(), predicted.abs())
    return torch.where(scale > 0, (measured - predicted).abs() / scale, torch.zeros_like(scale))


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor (float64), ties given their average rank."""
    values = values.double()
    ranks = torch.empty_like(values)
    ranks[values.argsort(stable=True)] = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    _, groups = values.unique(return_inverse=True)
    sums = torch.zeros(int(groups.max()) + 1 if values.numel() else 0, dtype=values.dtype)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, groups, ranks)
    counts.index_add_(0, groups, torch.ones_like(ranks))
    return (sums / counts)[groups]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson on average ranks); NaN if undefined."""
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D tensors of one length, got {x.shape}, {y.shape}")
    if x.numel() < 2:
        return math.nan
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else math.nan


def validate_graph(
    graph: Graph,
    model: ReplacementModel,
    *,
    prompt: str | Sequence[int] | torch.Tensor | None = None,
    top_n: int = 20,
    modes: Sequence[str] = ("direct", "frozen_attention", "full"),
    pruned: PruneResult | None = None,
    batch_size: int = 32,
) -> ValidationReport:
    """Ablate the graph's top-N feature nodes in each mode and compare with its predictions.

    Predicted change of logit l when node s is set to 0: direct `-A[l, s]`, total `-T[l, s]` with
    `T = A_LF (I - D^-1 A_FF)^-1`, D = diag(feature activations) (module docstring). Measured: the
    change of l's demeaned logit at the last position under `FeatureChange(layer, pos, feature,
    value=0)`, batched `batch_size` rows per forward (one row is the unchanged baseline).
    `prompt` defaults to the graph's own (its text, else its tokens) and must tokenize to the
    graph's tokens.
    """
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values of {', '.join(MODES)}, got {list(modes)}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one row is the baseline), got {batch_size}")
    ids = _prompt_ids(graph, model, prompt)
    nodes = select_nodes(graph, top_n, pruned)
    state = model.run_prompt(ids, zero_bos=False)  # records the patterns the frozen modes replay
    if nodes.numel():
        _check_graph_fits(graph, model, state, nodes)
    direct, total = predicted_effects(graph)
    features = graph.active_features[graph.selected_features[nodes]].tolist()
    influence = (graph.node_influence() if pruned is None else pruned.node_influence)[nodes]
    activations = graph.activation_values[graph.selected_features[nodes]]
    targets = graph.logit_targets
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for mode in modes:
        if nodes.numel():
            measured = measure_ablations(model, state, features, targets, mode, batch_size)
        else:
            measured = torch.zeros(0, len(targets))
        measured = measured.T.to(direct.dtype)  # (k, n_nodes)
        predicted = (direct if mode == "direct" else total)[:, nodes]
        errors = relative_error(measured, predicted)
        for i, (layer, pos, feat) in enumerate(features):
            for k, target in enumerate(targets):
                rows.append(
                    {
                        "mode": mode,
                        "node": int(nodes[i]),
                        "layer": layer,
                        "pos": pos,
                        "feature": feat,
                        "activation": float(activations[i]),
                        "influence": float(influence[i]),
                        "target": k,
                        "target_label": target.label,
                        "predicted_direct": float(direct[k, nodes[i]]),
                        "predicted_total": float(total[k, nodes[i]]),
                        "measured": float(measured[k, i]),
                        "relative_error": float(errors[k, i]),
                    }
                )
        summary[mode] = {
            "prediction": "direct" if mode == "direct" else "total",
            "n": errors.numel(),
            "spearman": spearman(predicted.flatten(), measured.flatten()),
            "median_relative_error": float(errors.double().quantile(0.5))
            if errors.numel()
            else math.nan,
        }
    metadata = {
        "model_id": graph.metadata.get("model_id"),
        "transcoder_set": graph.metadata.get("transcoder_set"),
        "prompt": graph.input_string,
        "n_nodes": int(nodes.numel()),
        "top_n": top_n,
        "pruned": pruned is not None,
        "logit_targets": [t.label for t in targets],
        "modes": list(modes),
    }
    return ValidationReport(rows=rows, summary=summary, metadata=metadata)
