"""Influence, pruning and scores of an attribution graph: pure tensor maths, no model.

Nodes are ordered `[features | error nodes | tokens | logits]` (see `NodeLayout`). `A` is the
(N, N) adjacency with `A[target, source]` = direct effect of source on target (rows are targets);
the graph is a DAG. `w` (N,) holds the logit probabilities on the logit nodes and zero elsewhere.

Definitions (what every function here computes):

- Normalised graph: `B = normalize_rows(A)` is |A| with each row divided by its sum; all-zero rows
  (source nodes: tokens, errors, features with no inputs) stay zero.
- Influence: `inf = w @ (B + B^2 + ...)`, the total weight of all paths from a node to the logits
  (a path weighs the product of its normalised edges times the logit's weight). Logits get 0.
- Cumulative threshold of non-negative scores s_1 >= ... >= s_n (sorted descending) with running
  sums c_k, added in that order in float64: the first s_k with `c_k / c_n >= fraction`, else s_n
  (all scores zero). Keeping every score >= it keeps at least `fraction` of the total.
- Pruning (`prune`):
  1. keep nodes with `inf >= cumulative_threshold(inf, node_threshold)`; tokens and logits always;
  2. zero the rows and columns of dropped nodes in |A|, renormalise the rows -> P, compute the
     influence `inf_P` of P; edge score = `P[t, s] * (inf_P[t] + w[t])`;
  3. keep edges with score >= the cumulative threshold (edge_threshold) of the *non-zero* scores
     (a zero score never survives);
  4. until nothing changes: drop feature and error nodes with no kept outgoing edge and features
     with no kept incoming edge, and the edges touching them. Tokens and logits always stay.
- Scores of the full graph (`graph_scores` without masks), both in [0, 1], higher is better:
  replacement = tok / (tok + err), tok and err the summed influence of token and error nodes;
  completeness = sum_r (1 - sum_{e error} B[r, e]) * (inf[r] + w[r]) / sum_r (inf[r] + w[r]),
  i.e. the share of each node's incoming normalised mass not from errors (1 for source nodes),
  weighted by the mass that node passes to the logits.
- Scores of a subgraph (node and/or edge masks: a pruned graph, or pinned nodes with everything
  else merged into error): B is still the *full* graph's normalised matrix. K = B restricted to the
  kept edges between kept nodes, `inf_K` its influence, and for a kept row r the dropped mass
  `d_r = sum of B[r, s] over edges (r, s) not in K`. Dropped mass counts as error:
  replacement = tok_K / (tok_K + err_K + sum_r (inf_K[r] + w[r]) * d_r);
  completeness = sum_r (1 - sum_{e error} K[r, e] - d_r) * (inf_K[r] + w[r]) / sum_r (...),
  both sums over kept rows r. For a row with incoming mass the completeness term is the mass of
  its kept non-error inputs; it is 1 for a source row, as in the full-graph score. With all-True
  masks the subgraph scores equal the full-graph scores exactly.

Memory: graphs can be ~20k x 20k, so each function holds one (N, N) float buffer of its own
(updated in place) plus boolean masks, and sorts only 1-D vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Sorted scores are summed in float64 chunks of this many elements, not in one (n,) float64 copy.
_CUMSUM_CHUNK = 1 << 22


@dataclass(frozen=True)
class NodeLayout:
    """Node counts in the interchange order `[features | errors | tokens | logits]`."""

    n_features: int
    n_errors: int  # n_layers * n_pos, layer-major
    n_tokens: int  # n_pos
    n_logits: int

    def __post_init__(self) -> None:
        for name in ("n_features", "n_errors", "n_tokens", "n_logits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def feature_slice(self) -> slice:
        return slice(0, self.n_features)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_tokens)

    @property
    def logit_slice(self) -> slice:
        return slice(self.n_nodes - self.n_logits, self.n_nodes)


@dataclass(frozen=True)
class PruneResult:
    """Which nodes and edges survive pruning, and the influence they were chosen by."""

    node_mask: Tensor  # (N,) bool
    edge_mask: Tensor  # (N, N) bool, [target, source]
    node_influence: Tensor  # (N,) influence on the unpruned graph


@dataclass(frozen=True)
class GraphScores:
    """Replacement and completeness scores, both in [0, 1] (see the module docstring)."""

    replacement: float
    completeness: float


def normalize_rows(adjacency: Tensor) -> Tensor:
    """|A| with each row divided by its sum; all-zero rows stay zero. (N, N) -> new (N, N)."""
    _check_square(adjacency, "adjacency")
    return _normalize_rows_(adjacency.abs())


def propagate_influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """Influence `weights @ (B + B^2 + ...)` of every node. B (N, N), weights (N,) -> (N,).

    On a DAG the terms vanish exactly after at most N steps; a term still non-zero after N + 1
    steps means a cycle reachable from the weighted nodes, and raises ValueError.
    """
    n = _check_square(normalized, "normalized")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    term = weights.to(normalized) @ normalized  # (N,): weight of paths of length 1
    total = torch.zeros_like(term)
    for _ in range(n + 1):
        if not bool(term.any()):
            return total
        if not bool(torch.isfinite(term).all()):
            raise ValueError("influence is not finite: normalized or weights hold inf or nan")
        total += term
        term = term @ normalized
    raise ValueError(
        f"influence did not vanish after {n + 1} steps: the graph has a cycle reachable from "
        "the weighted nodes (the adjacency must be a DAG)"
    )


def node_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Influence of every node on the logits. A (N, N), w (N,) -> (N,)."""
    return propagate_influence(normalize_rows(adjacency), logit_weights)


def cumulative_threshold(scores: Tensor, fraction: float) -> float:
    """Smallest of the top scores whose sum first reaches `fraction` of the total. Any shape.

    Scores must be non-negative. Sorted descending with running float64 sums c_k (in order),
    returns the first s_k with `c_k / c_n >= fraction`, else the last (smallest) score.
    """
    _check_fraction("fraction", fraction)
    flat = scores.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("scores must not be empty")
    lowest = float(flat.min())
    if not lowest >= 0:
        raise ValueError(f"scores must be non-negative and not nan, got minimum {lowest}")
    chunks = torch.sort(flat, descending=True).values.split(_CUMSUM_CHUNK)
    ends: list[float] = []  # running sum at the end of each chunk
    for chunk in chunks:
        ends.append(float(_running_sums(chunk, ends[-1] if ends else 0.0)[-1]))
    total = ends[-1]
    if total > 0:
        for i, end in enumerate(ends):
            if end / total >= fraction:
                sums = _running_sums(chunks[i], ends[i - 1] if i else 0.0)
                first = int((sums / total >= fraction).to(torch.uint8).argmax())
                return float(chunks[i][first])
    return float(chunks[-1][-1])


def prune(
    adjacency: Tensor,
    layout: NodeLayout,
    logit_weights: Tensor,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Keep the nodes and edges carrying most influence (module docstring, steps 1-4).

    A (N, N) and w (N,) are not modified; masks are on A's device.
    """
    _check_fraction("node_threshold", node_threshold)
    _check_fraction("edge_threshold", edge_threshold)
    weights = _check_graph(adjacency, layout, logit_weights)

    work = normalize_rows(adjacency)  # the one (N, N) float buffer, reused below
    influence = propagate_influence(work, weights)
    always_kept = _kind_mask(layout, (layout.token_slice, layout.logit_slice), adjacency.device)
    node_mask = (influence >= cumulative_threshold(influence, node_threshold)) | always_kept

    # Pruned graph P: |A| without the dropped rows and columns, renormalised.
    torch.abs(adjacency, out=work)
    work.masked_fill_(~node_mask[:, None], 0).masked_fill_(~node_mask[None, :], 0)
    _normalize_rows_(work)
    pruned_influence = propagate_influence(work, weights)
    scores = work.mul_((pruned_influence + weights)[:, None])  # (N, N) edge scores
    positive = scores[scores > 0]
    if positive.numel() > 0:
        edge_mask = scores >= cumulative_threshold(positive, edge_threshold)
    else:
        edge_mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    del work, scores, positive

    _drop_dangling_(node_mask, edge_mask, layout)
    return PruneResult(node_mask=node_mask, edge_mask=edge_mask, node_influence=influence)


def graph_scores(
    adjacency: Tensor,
    layout: NodeLayout,
    logit_weights: Tensor,
    node_mask: Tensor | None = None,
    edge_mask: Tensor | None = None,
) -> GraphScores:
    """Replacement and completeness of the full graph, or of a subgraph given by masks.

    A (N, N), w (N,), node_mask (N,) bool, edge_mask (N, N) bool [target, source]. A missing
    mask keeps everything; with both missing these are the full-graph scores.
    """
    weights = _check_graph(adjacency, layout, logit_weights)
    n = layout.n_nodes
    kept = normalize_rows(adjacency)  # B, then masked in place to K
    keep = torch.ones(n, dtype=torch.bool, device=kept.device)
    dropped = torch.zeros(n, dtype=kept.dtype, device=kept.device)  # (N,) d_r
    if node_mask is not None or edge_mask is not None:
        if node_mask is not None:
            _check_mask(node_mask, (n,), "node_mask")
            keep = node_mask.to(kept.device)
        full_mass = kept.sum(dim=1)
        if edge_mask is not None:
            _check_mask(edge_mask, (n, n), "edge_mask")
            kept.mul_(edge_mask.to(kept.device))
        kept.mul_(keep[:, None]).mul_(keep[None, :])
        # Rows of B sum to 1, so the difference is accurate; clamp rounding below zero.
        dropped = (full_mass - kept.sum(dim=1)).clamp_(min=0) * keep

    influence = propagate_influence(kept, weights)
    reach = (influence + weights) * keep  # (N,) mass each kept node passes to the logits
    token = influence[layout.token_slice].sum()
    error = influence[layout.error_slice].sum() + (reach * dropped).sum()
    if not float(token + error) > 0:
        raise ValueError("no influence reaches the logits from tokens or errors: scores undefined")
    non_error = (1 - kept[:, layout.error_slice].sum(dim=1) - dropped).clamp_(min=0)
    completeness = (non_error * reach).sum() / reach.sum()
    return GraphScores(replacement=float(token / (token + error)), completeness=float(completeness))


def _drop_dangling_(node_mask: Tensor, edge_mask: Tensor, layout: NodeLayout) -> None:
    """Drop, until stable, features/errors without kept outputs and features without inputs."""
    features = _kind_mask(layout, (layout.feature_slice,), node_mask.device)
    need_output = _kind_mask(layout, (layout.feature_slice, layout.error_slice), node_mask.device)
    while True:
        no_output = ~edge_mask.any(dim=0)  # column s: no kept edge leaves s
        no_input = ~edge_mask.any(dim=1)  # row t: no kept edge enters t
        drop = node_mask & ((need_output & no_output) | (features & no_input))
        if not bool(drop.any()):
            return
        node_mask &= ~drop
        edge_mask.masked_fill_(drop[:, None], False).masked_fill_(drop[None, :], False)


def _normalize_rows_(matrix: Tensor) -> Tensor:
    """Divide each row of a non-negative (N, N) matrix by its sum, in place; zero rows stay."""
    row_sums = matrix.sum(dim=1, keepdim=True)
    return matrix.div_(row_sums.masked_fill_(row_sums == 0, 1))


def _running_sums(chunk: Tensor, start: float) -> Tensor:
    """float64 running sums of `chunk`, continuing from `start`, added strictly left to right."""
    sums = chunk.to(torch.float64, copy=True)
    sums[0] += start  # seeding the first element keeps the additions in sequence order
    return sums.cumsum_(0)


def _kind_mask(layout: NodeLayout, slices: tuple[slice, ...], device: torch.device) -> Tensor:
    mask = torch.zeros(layout.n_nodes, dtype=torch.bool, device=device)
    for part in slices:
        mask[part] = True
    return mask


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:  # also rejects nan
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_square(matrix: Tensor, name: str) -> int:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {matrix.dtype}")
    return matrix.shape[0]


def _check_graph(adjacency: Tensor, layout: NodeLayout, logit_weights: Tensor) -> Tensor:
    """Validate A against the layout and w; return w in A's dtype and device."""
    n = _check_square(adjacency, "adjacency")
    if n != layout.n_nodes:
        raise ValueError(f"adjacency is {n} x {n} but the layout has {layout.n_nodes} nodes")
    if logit_weights.shape != (n,):
        raise ValueError(f"logit_weights must have shape ({n},), got {tuple(logit_weights.shape)}")
    weights = logit_weights.to(adjacency)
    if not bool((weights >= 0).all()):
        raise ValueError("logit_weights must be non-negative (logit probabilities)")
    return weights


def _check_mask(mask: Tensor, shape: tuple[int, ...], name: str) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
        )
