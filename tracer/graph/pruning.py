"""Influence, pruning and scores of an attribution graph: pure tensor maths, no model.

Nodes are ordered `[features | error nodes | tokens | logits]` (see `NodeLayout`). `A` is the
(N, N) adjacency with `A[target, source]` = direct effect of source on target (rows are targets);
the graph is a DAG. `w` (N,) holds the logit probabilities on the logit nodes and zero elsewhere.

Definitions (what every function here computes):

- Normalised graph: `B` is |A| with each row divided by its sum; all-zero rows
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

Memory: graphs reach N ~ 60,000, an adjacency of 14 GB in float32, so nothing here copies it.
B, P and K are read from A one block of rows at a time (`tracer.graph.row_blocks`), the threshold of
the N^2 edge scores is found by a radix select over their bits instead of a sort, and the only
(N, N) allocation is the boolean edge mask. Sorting is for 1-D vectors only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tracer.graph.row_blocks import RowBlocks

# Sorted scores are summed in float64 chunks of this many elements, not in one (n,) float64 copy.
_CUMSUM_CHUNK = 1 << 22
# The edge threshold is selected this many bits of the scores' bit patterns per pass.
_RADIX_BITS = 16


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


def node_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Influence of every node on the logits. A (N, N), w (N,) -> (N,)."""
    _check_vector(logit_weights, _check_square(adjacency, "adjacency"), "logit_weights")
    graph = RowBlocks(adjacency)
    weights = logit_weights.to(device=adjacency.device, dtype=graph.dtype)
    return _influence(graph, graph.divisors(), weights)


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

    graph = RowBlocks(adjacency)
    influence = _influence(graph, graph.divisors(), weights)
    always_kept = _kind_mask(layout, (layout.token_slice, layout.logit_slice), adjacency.device)
    node_mask = (influence >= cumulative_threshold(influence, node_threshold)) | always_kept

    # Pruned graph P: |A| without the dropped rows and columns, renormalised.
    pruned = RowBlocks(adjacency, node_mask=node_mask)
    divisors = pruned.divisors()
    reach = _influence(pruned, divisors, weights) + weights

    def edge_scores() -> Iterator[tuple[slice, Tensor]]:  # (rows, N) blocks of P * reach
        for part in pruned.parts:
            yield part, pruned.read(part).div_(divisors[part, None]).mul_(reach[part, None])

    n = layout.n_nodes
    edge_mask = torch.zeros((n, n), dtype=torch.bool, device=adjacency.device)
    threshold = _positive_threshold(edge_scores, edge_threshold, pruned.dtype)
    if threshold is not None:
        for part, scores in edge_scores():
            torch.ge(scores, threshold, out=edge_mask[part])

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
    keep = torch.ones(n, dtype=torch.bool, device=adjacency.device)
    if node_mask is not None:
        _check_mask(node_mask, (n,), "node_mask")
        node_mask = keep = node_mask.to(adjacency.device)
    if edge_mask is not None:
        _check_mask(edge_mask, (n, n), "edge_mask")
        edge_mask = edge_mask.to(adjacency.device)

    # Row sums of |A| (B's divisors) and of its kept part K, in all and over the error columns.
    kept = RowBlocks(adjacency, node_mask, edge_mask)
    full_sums, kept_sums, error_sums = [], [], []
    for part in kept.parts:
        block = kept.read_unmasked(part)
        full_sums.append(block.sum(dim=1))
        kept.mask_(part, block)
        kept_sums.append(block.sum(dim=1))
        error_sums.append(block[:, layout.error_slice].sum(dim=1))
    full_mass = torch.cat(full_sums)
    divisors = full_mass.masked_fill(full_mass == 0, 1)
    # Differences of unnormalised sums: exactly zero for a row whose edges are all kept.
    dropped = ((full_mass - torch.cat(kept_sums)) / divisors).clamp_(min=0) * keep  # (N,) d_r

    influence = _influence(kept, divisors, weights)
    reach = (influence + weights) * keep  # (N,) mass each kept node passes to the logits
    token = influence[layout.token_slice].sum()
    error = influence[layout.error_slice].sum() + (reach * dropped).sum()
    if not float(token + error) > 0:
        raise ValueError("no influence reaches the logits from tokens or errors: scores undefined")
    non_error = (1 - torch.cat(error_sums) / divisors - dropped).clamp_(min=0)
    completeness = (non_error * reach).sum() / reach.sum()
    return GraphScores(replacement=float(token / (token + error)), completeness=float(completeness))


def _influence(graph: RowBlocks, divisors: Tensor, weights: Tensor) -> Tensor:
    """Influence on the blocks' graph normalised by `divisors` (N,): `weights @ (B + B^2 + ...)`."""

    def step(vector: Tensor) -> Tensor:
        return graph.vecmat(vector / divisors)

    return influence_series(step, step(weights), weights.shape[0] + 1)


def influence_series(step: Callable[[Tensor], Tensor], first: Tensor, max_terms: int) -> Tensor:
    """`first + step(first) + step(step(first)) + ...`: the one influence power series.

    `step(v) = v @ M` for a normalised graph M; on a DAG the terms vanish exactly after at most
    `max_terms`; a term still non-zero then means a cycle (ValueError), as does inf or nan.
    """
    term, total = first, torch.zeros_like(first)
    for _ in range(max_terms):
        if not bool(term.any()):
            return total
        if not bool(torch.isfinite(term).all()):
            raise ValueError("influence is not finite: the graph or the weights hold inf or nan")
        total += term
        term = step(term)
    raise ValueError(
        f"influence did not vanish after {max_terms} steps: the graph has a cycle reachable from "
        "the weighted nodes (the adjacency must be a DAG)"
    )


def _positive_threshold(
    blocks: Callable[[], Iterator[tuple[slice, Tensor]]], fraction: float, dtype: torch.dtype
) -> float | None:
    """`cumulative_threshold` of the positive entries of all `blocks()`; None if there are none.

    A radix select instead of a sort: non-negative floats order like their bit patterns read as
    integers, so each pass over the blocks sums the scores by their next 16 bits under the prefix
    chosen so far, and keeps the bin where the descending running sum crosses `fraction`; the
    last pass leaves one exact value. Blocks have dtype `dtype`. Equal to sorting and
    summing but for the order of the float64 additions (rounding-level, where the sum crosses).
    """
    width = torch.finfo(dtype).bits
    as_int = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    n_bins = 1 << _RADIX_BITS
    prefix, above, total = 0, 0.0, 0.0  # bits chosen so far; sum of the scores above them
    for shift in range(width - _RADIX_BITS, -1, -_RADIX_BITS):
        sums = None  # by digit
        for _, block in blocks():
            if sums is None:
                sums = torch.zeros(n_bins, dtype=torch.float64, device=block.device)
            values = block[block > 0]
            bits = values.view(as_int)
            if shift + _RADIX_BITS < width:  # only the scores under the chosen prefix
                inside = (bits >> (shift + _RADIX_BITS)) == prefix
                values, bits = values[inside], bits[inside]
            digits = (bits >> shift).long() & (n_bins - 1)
            sums.index_add_(0, digits, values.double())
        if sums is None:  # no blocks at all
            return None
        descending = sums.flip(0)
        running = _running_sums(descending, above)
        if shift + _RADIX_BITS == width:
            total = float(running[-1])
            if total == 0:
                return None
        nonempty = descending > 0
        crossed = nonempty & (running / total >= fraction)
        if bool(crossed.any()):
            k = int(crossed.to(torch.uint8).argmax())
        else:  # the bin's parts, summed in another order, fell short of the crossing
            k = int(nonempty.nonzero()[-1])
        above = float(running[k - 1]) if k > 0 else above
        prefix = (prefix << _RADIX_BITS) | (n_bins - 1 - k)
    return float(torch.tensor(prefix, dtype=as_int).view(dtype))


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
    """Validate A against the layout and w; return w on A's device in the computing dtype."""
    n = _check_square(adjacency, "adjacency")
    if n != layout.n_nodes:
        raise ValueError(f"adjacency is {n} x {n} but the layout has {layout.n_nodes} nodes")
    _check_vector(logit_weights, n, "logit_weights")
    # float16/bfloat16 storage is computed with in float32, as RowBlocks reads it
    dtype = torch.promote_types(adjacency.dtype, torch.float32)
    weights = logit_weights.to(device=adjacency.device, dtype=dtype)
    if not bool((weights >= 0).all()):
        raise ValueError("logit_weights must be non-negative (logit probabilities)")
    return weights


def _check_vector(vector: Tensor, n: int, name: str) -> None:
    if vector.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(vector.shape)}")


def _check_mask(mask: Tensor, shape: tuple[int, ...], name: str) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
        )
