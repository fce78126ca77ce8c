"""Tests for tracer/graph/pruning.py against independent brute-force references on tiny random DAGs.

The references below use numpy and plain Python loops: influence by dynamic programming in
topological order or by a matrix inverse, thresholds by a running sum, pruning by removing one
node at a time, and scores by enumerating every path to the logits. Larger graphs, read in many
row blocks, are compared to the straightforward dense computation (whole matrices, full sorts),
and the working memory of pruning and scoring is measured in a fresh process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import tracer.graph.pruning as pruning
from tracer.graph import row_blocks
from tracer.graph.pruning import (
    NodeLayout,
    cumulative_threshold,
    graph_scores,
    node_influence,
    prune,
)

# ---------------------------------------------------------------------------- random graphs


def random_graph(
    seed: int,
    n_features: int = 14,
    n_layers: int = 2,
    n_pos: int = 3,
    n_logits: int = 3,
    density: float = 0.45,
    source_feature_prob: float = 0.15,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, NodeLayout, torch.Tensor, list[int]]:
    """A random DAG in the layout's node order: (A (N, N), layout, w (N,), topological order).

    Errors and tokens have no inputs, logits no outputs, features are ordered by a random
    permutation; some features have no inputs and some edges are negative.
    """
    g = torch.Generator().manual_seed(seed)
    layout = NodeLayout(n_features, n_layers * n_pos, n_pos, n_logits)
    n = layout.n_nodes
    rank = torch.zeros(n)  # errors and tokens: rank 0, they are pure sources
    rank[layout.feature_slice] = 1 + torch.randperm(n_features, generator=g).float()
    rank[layout.logit_slice] = n_features + 1
    allowed = rank[None, :] < rank[:, None]  # [target, source]: source earlier in the order
    present = torch.rand(n, n, generator=g) < density
    adjacency = torch.randn(n, n, generator=g, dtype=torch.float64) * (allowed & present)
    inputless = torch.rand(n_features, generator=g) < source_feature_prob
    adjacency[layout.feature_slice][inputless] = 0
    for logit in range(layout.logit_slice.start, n):  # every logit reads something
        if not adjacency[logit].any():
            adjacency[logit, layout.token_slice.start] = 1.0
    probs = torch.rand(n_logits, generator=g, dtype=torch.float64) + 0.05
    weights = torch.zeros(n, dtype=torch.float64)
    weights[layout.logit_slice] = 0.9 * probs / probs.sum()
    order = sorted(range(n), key=lambda i: (float(rank[i]), i))
    return adjacency.to(dtype), layout, weights.to(dtype), order


def tokens_and_logits(layout: NodeLayout) -> set[int]:
    return set(range(layout.token_slice.start, layout.n_nodes))


# ---------------------------------------------------------------------------- references


def ref_normalize(adjacency: np.ndarray) -> np.ndarray:
    out = np.zeros_like(adjacency)
    for r in range(adjacency.shape[0]):
        total = sum(abs(x) for x in adjacency[r])
        if total > 0:
            out[r] = [abs(x) / total for x in adjacency[r]]
    return out


def ref_influence_dp(matrix: np.ndarray, weights: np.ndarray, order: list[int]) -> np.ndarray:
    """Influence by dynamic programming: a node's influence is what its targets pass back."""
    influence = np.zeros(len(weights))
    for v in reversed(order):
        influence[v] = sum(
            (influence[t] + weights[t]) * matrix[t, v] for t in range(len(weights)) if matrix[t, v]
        )
    return influence


def ref_threshold(values: list[float], fraction: float) -> float:
    ordered = sorted(values, reverse=True)
    total = 0.0
    for v in ordered:
        total += v
    running = 0.0
    for v in ordered:
        running += v
        if total > 0 and running / total >= fraction:
            return v
    return ordered[-1]


def ref_prune(
    adjacency: np.ndarray,
    layout: NodeLayout,
    weights: np.ndarray,
    order: list[int],
    node_threshold: float,
    edge_threshold: float,
) -> tuple[set[int], set[tuple[int, int]]]:
    n = layout.n_nodes
    features = set(range(layout.n_features))
    errors = set(range(layout.error_slice.start, layout.error_slice.stop))
    influence = ref_influence_dp(ref_normalize(adjacency), weights, order)
    cut = ref_threshold(list(influence), node_threshold)
    nodes = {i for i in range(n) if influence[i] >= cut} | tokens_and_logits(layout)

    pruned = np.array(
        [
            [adjacency[t, s] if t in nodes and s in nodes else 0.0 for s in range(n)]
            for t in range(n)
        ]
    )
    normalized = ref_normalize(pruned)
    pruned_influence = ref_influence_dp(normalized, weights, order)
    score = {
        (t, s): normalized[t, s] * (pruned_influence[t] + weights[t])
        for t in range(n)
        for s in range(n)
        if normalized[t, s] * (pruned_influence[t] + weights[t]) > 0
    }
    edges: set[tuple[int, int]] = set()
    if score:
        edge_cut = ref_threshold(list(score.values()), edge_threshold)
        edges = {e for e, v in score.items() if v >= edge_cut}

    removed = True
    while removed:  # one node at a time
        removed = False
        for v in sorted(nodes):
            no_out = not any(s == v for _, s in edges)
            no_in = not any(t == v for t, _ in edges)
            if (v in features | errors and no_out) or (v in features and no_in):
                nodes.discard(v)
                edges = {(t, s) for t, s in edges if v not in (t, s)}
                removed = True
                break
    return nodes, edges


def ref_path_scores(
    adjacency: np.ndarray,
    layout: NodeLayout,
    weights: np.ndarray,
    node_mask: np.ndarray,
    edge_mask: np.ndarray,
) -> tuple[float, float]:
    """Scores by enumerating every maximal path from each kept logit down to a source node.

    A path ending at a token (error) with all edges kept adds its weight to tok (err); a path
    that leaves the kept edges somewhere adds its weight to the dropped mass, counted as error.
    """
    n = layout.n_nodes
    normalized = ref_normalize(adjacency)
    tokens = range(layout.token_slice.start, layout.token_slice.stop)
    errors = range(layout.error_slice.start, layout.error_slice.stop)

    def is_kept(t: int, s: int) -> bool:
        return bool(node_mask[t] and node_mask[s] and edge_mask[t, s])

    totals = {"token": 0.0, "error": 0.0, "dropped": 0.0}
    reach = np.zeros(n)  # mass of kept paths arriving at each node (inf_K + w)

    def walk(v: int, mass: float, inside: bool) -> None:
        if inside:
            reach[v] += mass
        inputs = [s for s in range(n) if normalized[v, s] != 0]
        if not inputs:
            if not inside:
                totals["dropped"] += mass
            elif v in tokens:
                totals["token"] += mass
            elif v in errors:
                totals["error"] += mass
            return
        for s in inputs:
            walk(s, mass * normalized[v, s], inside and is_kept(v, s))

    for logit in range(layout.logit_slice.start, n):
        if node_mask[logit] and weights[logit] > 0:
            walk(logit, weights[logit], True)

    replacement = totals["token"] / (totals["token"] + totals["error"] + totals["dropped"])
    numerator = denominator = 0.0
    for r in range(n):
        if not node_mask[r]:
            continue
        if normalized[r].any():
            share = sum(
                normalized[r, s] for s in range(n) if is_kept(r, s) and s not in errors
            )  # kept non-error inputs
        else:
            share = 1.0  # a source node is complete by definition
        numerator += share * reach[r]
        denominator += reach[r]
    return replacement, numerator / denominator


def ref_full_scores(adjacency: np.ndarray, layout: NodeLayout, weights: np.ndarray):
    """Full-graph scores with the influence from a matrix inverse: w @ ((I - B)^-1 - I)."""
    normalized = ref_normalize(adjacency)
    n = layout.n_nodes
    influence = weights @ (np.linalg.inv(np.eye(n) - normalized) - np.eye(n))
    token = influence[layout.token_slice].sum()
    error = influence[layout.error_slice].sum()
    share = 1 - normalized[:, layout.error_slice].sum(axis=1)
    reach = influence + weights
    return token / (token + error), float((share * reach).sum() / reach.sum())


def random_masks(seed: int, layout: NodeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = layout.n_nodes
    node_mask = torch.rand(n, generator=g) < 0.7
    node_mask[layout.token_slice.start :] = True
    edge_mask = torch.rand(n, n, generator=g) < 0.7
    return node_mask, edge_mask


def layered_graph(
    seed: int,
    n_features: int,
    n_layers: int,
    n_pos: int,
    n_logits: int,
    density: float = 0.8,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, NodeLayout, torch.Tensor]:
    """An attribution-like random DAG (A (N, N), layout, w (N,)), built a few rows at a time.

    Features sit at random (layer, position) cells in layer-major order and read a `density`
    share of the features and errors of earlier layers and of the tokens, at the same or earlier
    positions; logits read all but logits. Errors and tokens have no inputs. Edge weights are
    cubed Gaussians, so scores span many orders of magnitude. Peak memory: A plus a few rows.
    """
    g = torch.Generator().manual_seed(seed)
    layout = NodeLayout(n_features, n_layers * n_pos, n_pos, n_logits)
    n = layout.n_nodes
    cells = torch.randint(n_layers * n_pos, (n_features,), generator=g).sort().values
    layer = torch.cat(
        [
            cells // n_pos,
            torch.arange(n_layers).repeat_interleave(n_pos),  # errors, layer-major
            torch.full((n_pos,), -1),  # tokens come before every layer
            torch.full((n_logits,), n_layers),
        ]
    )
    pos = torch.cat(
        [
            cells % n_pos,
            torch.arange(n_pos).repeat(n_layers),
            torch.arange(n_pos),
            torch.full((n_logits,), n_pos - 1),
        ]
    )
    has_inputs = torch.zeros(n, dtype=torch.bool)
    has_inputs[layout.feature_slice] = has_inputs[layout.logit_slice] = True
    adjacency = torch.zeros(n, n, dtype=dtype)
    for start in range(0, n, 256):
        rows = slice(start, min(start + 256, n))
        allowed = (layer[None, :] < layer[rows, None]) & (pos[None, :] <= pos[rows, None])
        allowed &= has_inputs[rows, None] & (torch.rand(allowed.shape, generator=g) < density)
        values = torch.randn(allowed.shape, generator=g, dtype=dtype).pow_(3)
        adjacency[rows] = values.mul_(allowed)
    probs = torch.rand(n_logits, generator=g, dtype=torch.float64) + 0.05
    weights = torch.zeros(n, dtype=torch.float64)
    weights[layout.logit_slice] = 0.9 * probs / probs.sum()
    return adjacency, layout, weights.to(dtype)


# The straightforward dense computation of the module docstring, in A's dtype: whole (N, N)
# matrices, a power series of vector-matrix products, a full sort for each threshold.


def dense_normalize(adjacency: torch.Tensor) -> torch.Tensor:
    absolute = adjacency.abs()
    sums = absolute.sum(dim=1, keepdim=True)
    return absolute.div_(sums.masked_fill_(sums == 0, 1))


def dense_influence(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(weights)
    term = weights @ normalized
    for _ in range(len(weights) + 1):
        if not term.any():
            return total
        total += term
        term = term @ normalized
    raise AssertionError("the test graph has a cycle")


def dense_threshold(values: torch.Tensor, fraction: float) -> float:
    ordered = values.reshape(-1).sort(descending=True).values
    running = ordered.double().cumsum(0)
    if running[-1] == 0:
        return float(ordered[-1])
    return float(ordered[int((running / running[-1] >= fraction).nonzero()[0])])


@dataclass
class DensePrune:
    """Each step of the dense pruning: influence, node mask, edge scores and threshold, masks."""

    influence: torch.Tensor
    node_threshold: float
    node_mask: torch.Tensor  # step 1
    scores: torch.Tensor  # (N, N) edge scores of step 2
    edge_threshold: float
    edge_mask: torch.Tensor  # step 3
    final_nodes: torch.Tensor  # step 4
    final_edges: torch.Tensor


def dense_prune(
    adjacency: torch.Tensor,
    layout: NodeLayout,
    weights: torch.Tensor,
    node_threshold: float,
    edge_threshold: float,
    node_mask: torch.Tensor | None = None,
) -> DensePrune:
    """Dense pruning; `node_mask`, if given, replaces the node mask of step 1."""
    influence = dense_influence(dense_normalize(adjacency), weights)
    node_cut = dense_threshold(influence, node_threshold)
    if node_mask is None:
        node_mask = influence >= node_cut
        node_mask[layout.token_slice.start :] = True
    pruned = dense_normalize(adjacency * node_mask[:, None] * node_mask[None, :])
    scores = pruned * (dense_influence(pruned, weights) + weights)[:, None]
    positive = scores[scores > 0]
    edge_cut = dense_threshold(positive, edge_threshold) if len(positive) else math.inf
    edge_mask = scores >= edge_cut
    final_nodes, final_edges = dense_drop_dangling(node_mask, edge_mask, layout)
    return DensePrune(
        influence, node_cut, node_mask, scores, edge_cut, edge_mask, final_nodes, final_edges
    )


def dense_drop_dangling(
    node_mask: torch.Tensor, edge_mask: torch.Tensor, layout: NodeLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, edges = node_mask.clone(), edge_mask.clone()
    index = torch.arange(layout.n_nodes, device=node_mask.device)
    is_feature = index < layout.n_features
    needs_output = index < layout.error_slice.stop
    while True:
        drop = nodes & (needs_output & ~edges.any(dim=0) | is_feature & ~edges.any(dim=1))
        if not drop.any():
            return nodes, edges
        nodes &= ~drop
        edges &= ~drop[:, None] & ~drop[None, :]


def dense_scores(
    adjacency: torch.Tensor,
    layout: NodeLayout,
    weights: torch.Tensor,
    node_mask: torch.Tensor,
    edge_mask: torch.Tensor,
) -> tuple[float, float]:
    """(replacement, completeness) of the subgraph, with K and d_r as whole matrices."""
    full = dense_normalize(adjacency)
    kept = full * edge_mask * node_mask[:, None] * node_mask[None, :]
    dropped = (full.sum(dim=1) - kept.sum(dim=1)).clamp(min=0) * node_mask
    influence = dense_influence(kept, weights)
    reach = (influence + weights) * node_mask
    token = influence[layout.token_slice].sum()
    error = influence[layout.error_slice].sum() + (reach * dropped).sum()
    non_error = (1 - kept[:, layout.error_slice].sum(dim=1) - dropped).clamp(min=0)
    return float(token / (token + error)), float((non_error * reach).sum() / reach.sum())


# ---------------------------------------------------------------------------- layout, normalise


def test_layout_slices_partition_nodes_in_order():
    layout = NodeLayout(n_features=5, n_errors=6, n_tokens=3, n_logits=2)
    parts = [layout.feature_slice, layout.error_slice, layout.token_slice, layout.logit_slice]
    indices = [i for part in parts for i in range(layout.n_nodes)[part]]
    assert indices == list(range(16)) and layout.n_nodes == 16
    assert [len(range(16)[p]) for p in parts] == [5, 6, 3, 2]
    with pytest.raises(ValueError, match="n_tokens must be a non-negative int"):
        NodeLayout(1, 1, -1, 1)


# ---------------------------------------------------------------------------- influence


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_equals_inverse_series(seed):
    adjacency, _, weights, _ = random_graph(seed)
    normalized = ref_normalize(adjacency.numpy())
    identity = torch.eye(len(weights), dtype=torch.float64)
    resolvent = torch.linalg.solve(identity - torch.from_numpy(normalized), identity)
    expected = weights @ (resolvent - identity)
    got = node_influence(adjacency, weights)
    assert expected.abs().max() > 0.1  # the comparison is not trivially between zeros
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_influence_float32_close_to_float64():
    adjacency, _, weights, _ = random_graph(3)
    got = node_influence(adjacency.float(), weights.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), node_influence(adjacency, weights), rtol=1e-5, atol=1e-6
    )


def test_influence_on_a_chain_by_hand():
    # node 2 reads 0.25 from node 1 and 0.75 from node 0; node 1 reads all from node 0 (rows
    # already sum to 1, so the adjacency is its own normalisation)
    normalized = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.75, 0.25, 0.0]])
    got = node_influence(normalized, torch.tensor([0.0, 0.0, 2.0]))
    torch.testing.assert_close(got, torch.tensor([2 * (0.75 + 0.25), 2 * 0.25, 0.0]))
    # a cycle that no weighted node reaches does not change any influence
    with_cycle = torch.zeros(5, 5)
    with_cycle[:3, :3] = normalized
    with_cycle[3, 4] = with_cycle[4, 3] = 1.0
    got = node_influence(with_cycle, torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([2.0, 0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"logit_weights must have shape \(3,\)"):
        node_influence(normalized, torch.ones(4))


def test_cycle_raises_clear_error():
    adjacency, layout, weights, _ = random_graph(4)
    a, b = 0, 1  # two features feeding each other, and a logit reading one of them
    adjacency[a, b] = adjacency[b, a] = 1.0
    adjacency[layout.logit_slice.start, a] = 1.0
    with pytest.raises(ValueError, match="cycle"):
        node_influence(adjacency, weights)
    with pytest.raises(ValueError, match="cycle"):
        prune(adjacency, layout, weights)


# ---------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.8, 0.98, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cumulative_threshold_matches_loop(fraction, dtype):
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(300, generator=g, dtype=torch.float64).to(dtype) ** 3
    scores[::7] = 0  # zeros, as nodes that do not reach the logits
    scores[1::11] = scores[2]  # ties
    expected = ref_threshold([float(v) for v in scores], fraction)
    assert cumulative_threshold(scores, fraction) == expected
    kept = scores[scores >= expected].double().sum() / scores.double().sum()
    assert kept >= fraction - 1e-12


def test_cumulative_threshold_chunks_continue_the_running_sum(monkeypatch):
    import tracer.graph.pruning as pruning

    monkeypatch.setattr(pruning, "_CUMSUM_CHUNK", 16)
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(200, generator=g) ** 2
    for fraction in (0.0, 0.3, 0.77, 1.0):
        assert cumulative_threshold(scores, fraction) == ref_threshold(scores.tolist(), fraction)


def test_cumulative_threshold_edge_cases():
    assert cumulative_threshold(torch.zeros(4), 0.5) == 0.0
    assert cumulative_threshold(torch.tensor([3.0, 1.0, 0.0]), 1.0) == 1.0
    assert cumulative_threshold(torch.tensor([3.0, 1.0, 0.0]), 0.0) == 3.0
    with pytest.raises(ValueError, match="non-negative"):
        cumulative_threshold(torch.tensor([1.0, -0.5]), 0.5)
    with pytest.raises(ValueError, match="empty"):
        cumulative_threshold(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 2"):
        cumulative_threshold(torch.ones(3), 2)


# ---------------------------------------------------------------------------- pruning


def as_sets(result) -> tuple[set[int], set[tuple[int, int]]]:
    nodes = set(torch.nonzero(result.node_mask).flatten().tolist())
    edges = {tuple(e) for e in torch.nonzero(result.edge_mask).tolist()}
    return nodes, edges


@pytest.mark.parametrize(
    ("seed", "node_threshold", "edge_threshold"),
    [
        (10, 0.8, 0.98),
        (11, 0.8, 0.98),
        (12, 0.5, 0.9),
        (13, 0.95, 0.7),
        (14, 1.0, 1.0),
        (15, 0.0, 0.0),
        (16, 1.0, 0.5),
        (17, 0.6, 1.0),
    ],
)
def test_prune_matches_reference(seed, node_threshold, edge_threshold):
    adjacency, layout, weights, order = random_graph(seed)
    before = adjacency.clone()
    result = prune(adjacency, layout, weights, node_threshold, edge_threshold)
    assert torch.equal(adjacency, before)  # the input is not modified

    nodes, edges = as_sets(result)
    ref_nodes, ref_edges = ref_prune(
        adjacency.numpy(), layout, weights.numpy(), order, node_threshold, edge_threshold
    )
    assert nodes == ref_nodes
    assert edges == ref_edges
    assert tokens_and_logits(layout) <= nodes
    assert all(t in nodes and s in nodes and adjacency[t, s] != 0 for t, s in edges)
    for f in range(layout.n_features):
        if f in nodes:
            assert any(s == f for _, s in edges) and any(t == f for t, _ in edges)
    for e in range(layout.error_slice.start, layout.error_slice.stop):
        if e in nodes:
            assert any(s == e for _, s in edges)
    torch.testing.assert_close(result.node_influence, node_influence(adjacency, weights))


def test_prune_thresholds_change_the_result():
    adjacency, layout, weights, _ = random_graph(18, n_features=20)
    loose = as_sets(prune(adjacency, layout, weights, 1.0, 1.0))
    default = as_sets(prune(adjacency, layout, weights))
    tight = as_sets(prune(adjacency, layout, weights, 0.3, 0.5))
    assert len(tight[0]) < len(default[0]) < len(loose[0])
    assert tight[0] <= default[0] <= loose[0]


def test_prune_float32_matches_reference():
    adjacency, layout, weights, order = random_graph(19, dtype=torch.float32)
    result = prune(adjacency, layout, weights)
    assert result.node_mask.dtype == torch.bool and result.edge_mask.shape == adjacency.shape
    expected = ref_prune(
        adjacency.double().numpy(), layout, weights.double().numpy(), order, 0.8, 0.98
    )
    assert as_sets(result) == expected


@pytest.mark.parametrize(("name", "value"), [("node_threshold", 1.5), ("edge_threshold", -0.1)])
def test_prune_rejects_threshold_outside_unit_interval(name, value):
    adjacency, layout, weights, _ = random_graph(0)
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\], got {value}"):
        prune(adjacency, layout, weights, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be in"):
        prune(adjacency, layout, weights, **{name: math.nan})


def test_prune_rejects_shape_mismatch():
    adjacency, layout, weights, _ = random_graph(0)
    with pytest.raises(ValueError, match="layout has"):
        prune(adjacency[:-1, :-1], layout, weights[:-1])
    with pytest.raises(ValueError, match="logit_weights must have shape"):
        prune(adjacency, layout, weights[:-1])


# ---------------------------------------------------------------------------- scores


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_full_scores_match_inverse(seed):
    adjacency, layout, weights, _ = random_graph(seed)
    scores = graph_scores(adjacency, layout, weights)
    replacement, completeness = ref_full_scores(adjacency.numpy(), layout, weights.numpy())
    assert 0 < scores.replacement < 1 and 0 < scores.completeness < 1
    assert scores.replacement == pytest.approx(replacement, rel=1e-12)
    assert scores.completeness == pytest.approx(completeness, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_true_masks_equal_full_scores_exactly(dtype):
    adjacency, layout, weights, _ = random_graph(23, dtype=dtype)
    n = layout.n_nodes
    full = graph_scores(adjacency, layout, weights)
    all_nodes = torch.ones(n, dtype=torch.bool)
    all_edges = torch.ones(n, n, dtype=torch.bool)
    assert graph_scores(adjacency, layout, weights, all_nodes, all_edges) == full
    assert graph_scores(adjacency, layout, weights, node_mask=all_nodes) == full
    assert graph_scores(adjacency, layout, weights, edge_mask=all_edges) == full


@pytest.mark.parametrize("seed", [30, 31, 32, 33])
def test_subgraph_scores_match_path_enumeration(seed):
    adjacency, layout, weights, _ = random_graph(
        seed, n_features=4, n_layers=1, n_pos=2, n_logits=2, density=0.6
    )
    a, w = adjacency.numpy(), weights.numpy()
    n = layout.n_nodes
    everything = (np.ones(n, dtype=bool), np.ones((n, n), dtype=bool))
    node_mask, edge_mask = random_masks(seed, layout)
    no_logit = node_mask.clone()
    no_logit[layout.logit_slice.start] = False
    pruned = prune(adjacency, layout, weights, 0.7, 0.8)
    cases = [
        (everything, graph_scores(adjacency, layout, weights)),
        (
            (node_mask.numpy(), edge_mask.numpy()),
            graph_scores(adjacency, layout, weights, node_mask, edge_mask),
        ),
        (
            (node_mask.numpy(), everything[1]),
            graph_scores(adjacency, layout, weights, node_mask=node_mask),
        ),
        (
            (pruned.node_mask.numpy(), pruned.edge_mask.numpy()),
            graph_scores(adjacency, layout, weights, pruned.node_mask, pruned.edge_mask),
        ),
        (  # a logit left out of the subgraph: its weight reaches nothing
            (no_logit.numpy(), edge_mask.numpy()),
            graph_scores(adjacency, layout, weights, no_logit, edge_mask),
        ),
    ]
    for (nodes, edges), got in cases:
        replacement, completeness = ref_path_scores(a, layout, w, nodes, edges)
        assert got.replacement == pytest.approx(replacement, rel=1e-12)
        assert got.completeness == pytest.approx(completeness, rel=1e-12)
        assert 0 <= got.replacement <= 1 and 0 <= got.completeness <= 1
    # dropped mass joins the error: replacement can only go down (completeness is reweighted)
    assert cases[1][1].replacement <= cases[0][1].replacement


def test_full_scores_match_path_enumeration():
    adjacency, layout, weights, _ = random_graph(34, n_features=5, n_layers=1, n_pos=2)
    n = layout.n_nodes
    scores = graph_scores(adjacency, layout, weights)
    everything = (np.ones(n, dtype=bool), np.ones((n, n), dtype=bool))
    replacement, completeness = ref_path_scores(
        adjacency.numpy(), layout, weights.numpy(), *everything
    )
    assert scores.replacement == pytest.approx(replacement, rel=1e-12)
    assert scores.completeness == pytest.approx(completeness, rel=1e-12)


def test_scores_are_one_without_errors():
    adjacency, layout, weights, _ = random_graph(35)
    adjacency[:, layout.error_slice] = 0
    full = graph_scores(adjacency, layout, weights)
    assert full.replacement == pytest.approx(1.0, abs=1e-15)
    assert full.completeness == pytest.approx(1.0, abs=1e-15)
    with_errors = graph_scores(random_graph(35)[0], layout, weights)
    assert with_errors.replacement < 1 and with_errors.completeness < 1


def test_pruned_replacement_does_not_exceed_full():
    adjacency, layout, weights, _ = random_graph(36, n_features=20)
    result = prune(adjacency, layout, weights)
    full = graph_scores(adjacency, layout, weights)
    pruned = graph_scores(adjacency, layout, weights, result.node_mask, result.edge_mask)
    assert 0 < pruned.replacement <= full.replacement
    assert 0 < pruned.completeness <= 1


def test_scores_reject_bad_masks():
    adjacency, layout, weights, _ = random_graph(0)
    n = layout.n_nodes
    with pytest.raises(ValueError, match="node_mask must be a bool tensor"):
        graph_scores(adjacency, layout, weights, node_mask=torch.ones(n))
    with pytest.raises(ValueError, match="edge_mask must be a bool tensor"):
        graph_scores(adjacency, layout, weights, edge_mask=torch.ones(n, dtype=torch.bool))


# ---------------------------------------------------------------------------- row blocks = dense

DENSE_CASES = {  # name: graph builder and its arguments, all but the dtype
    "layered": (layered_graph, dict(seed=50, n_features=300, n_layers=4, n_pos=6, n_logits=10)),
    "permuted": (random_graph, dict(seed=51, n_features=80, n_layers=2, n_pos=4, n_logits=5)),
    "one-logit": (
        layered_graph,
        dict(seed=52, n_features=150, n_layers=3, n_pos=4, n_logits=1, density=0.3),
    ),
    "no-errors": (random_graph, dict(seed=53, n_features=60, n_layers=0, n_pos=3)),
}
# Blockwise and dense sum in different orders: influence and scores agree to about this, relative.
ROUNDING = {torch.float32: 1e-6, torch.float64: 1e-12}


def within_rounding(values: torch.Tensor, value: float, threshold: float, rtol: float) -> bool:
    """Whether rounding can flip the decision `value >= threshold`.

    True when the two are within `rtol`, or when the values between them carry no more of the
    total than float64 rounding does (the running sum crosses the fraction there).
    """
    low, high = sorted((value, threshold))
    between = values[(values >= low) & (values <= high)].double().sum()
    return abs(value - threshold) <= rtol * threshold or between <= 1e-12 * values.double().sum()


@pytest.mark.parametrize("block_rows", [1, 7, None])  # None: the whole graph in one block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_blockwise_pruning_and_scores_match_dense(case, dtype, block_rows, monkeypatch):
    build, arguments = DENSE_CASES[case]
    adjacency, layout, weights = build(**arguments, dtype=dtype)[:3]
    n = layout.n_nodes
    monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", (block_rows or n) * n)
    before = adjacency.clone()
    steps = []  # the masks of steps 1 and 3, as prune hands them to step 4
    drop_dangling = pruning._drop_dangling_

    def recording(node_mask, edge_mask, layout):
        steps.append((node_mask.clone(), edge_mask.clone()))
        drop_dangling(node_mask, edge_mask, layout)

    monkeypatch.setattr(pruning, "_drop_dangling_", recording)
    rounding = ROUNDING[dtype]
    flips = 0
    for node_threshold, edge_threshold in [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0), (0.3, 0.0)]:
        result = prune(adjacency, layout, weights, node_threshold, edge_threshold)
        nodes, edges = steps.pop()
        dense = dense_prune(adjacency, layout, weights, node_threshold, edge_threshold)
        torch.testing.assert_close(result.node_influence, dense.influence, rtol=rounding, atol=0)

        # Masks equal apart from decisions that rounding can flip: few, and each at the threshold.
        for i in torch.nonzero(nodes != dense.node_mask).flatten().tolist():
            assert within_rounding(
                dense.influence, float(dense.influence[i]), dense.node_threshold, 10 * rounding
            )
            flips += 1
        if not torch.equal(nodes, dense.node_mask):  # compare the edges on the same nodes
            dense = dense_prune(adjacency, layout, weights, 0, edge_threshold, node_mask=nodes)
        positive = dense.scores[dense.scores > 0]
        for t, s in torch.nonzero(edges != dense.edge_mask).tolist():
            score = float(dense.scores[t, s])
            assert within_rounding(positive, score, dense.edge_threshold, 10 * rounding)
            flips += 1
        assert int(edges.sum()) > 0
        final_nodes, final_edges = dense_drop_dangling(nodes, edges, layout)
        assert torch.equal(result.node_mask, final_nodes)
        assert torch.equal(result.edge_mask, final_edges)

        everything = (torch.ones(n, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool))
        for masks in (everything, (result.node_mask, result.edge_mask), random_masks(54, layout)):
            got = graph_scores(adjacency, layout, weights, *masks)
            replacement, completeness = dense_scores(adjacency, layout, weights, *masks)
            assert got.replacement == pytest.approx(replacement, rel=0, abs=rounding)
            assert got.completeness == pytest.approx(completeness, rel=0, abs=rounding)
        assert graph_scores(adjacency, layout, weights) == graph_scores(
            adjacency, layout, weights, *everything
        )
    assert flips <= 2  # over all four threshold pairs
    torch.testing.assert_close(
        node_influence(adjacency, weights), dense.influence, rtol=rounding, atol=0
    )
    assert torch.equal(adjacency, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_edge_threshold_radix_select_equals_sort(dtype):
    g = torch.Generator().manual_seed(60)
    # Multiples of 2^-28 below 2^8 over 20 binades: float64 sums them exactly in any order, so the
    # radix select must give exactly the threshold of sorting and summing.
    mantissas = torch.randint(1, 256, (5000,), generator=g).double()
    scores = (mantissas * 2.0 ** -torch.randint(0, 21, (5000,), generator=g)).to(dtype)
    scores[::3] = 0  # zero scores never count
    scores[1::7] = scores[1]  # ties
    rows = scores.reshape(50, 100)

    def blocks():
        return ((slice(i, i + 5), rows[i : i + 5]) for i in range(0, 50, 5))

    for fraction in (0.0, 0.1, 0.5, 0.8, 0.98, 1.0):
        expected = cumulative_threshold(scores[scores > 0], fraction)
        assert pruning._positive_threshold(blocks, fraction, scores.dtype) == expected
    zeros = torch.zeros(4, 4, dtype=dtype)
    assert (
        pruning._positive_threshold(lambda: iter([(slice(0, 4), zeros)]), 0.5, zeros.dtype) is None
    )


MEMORY_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_pruning import layered_graph
from tracer.memory import peak_growth, return_freed_memory
from tracer.graph.pruning import graph_scores, prune

def prune_and_score():
    result = prune(adjacency, layout, weights)
    graph_scores(adjacency, layout, weights)
    graph_scores(adjacency, layout, weights, result.node_mask, result.edge_mask)

return_freed_memory()
adjacency, layout, weights = layered_graph(0, 3446, 16, 32, 10)  # 4,000 nodes, 64 MB
print(peak_growth(prune_and_score) / (adjacency.numel() * adjacency.element_size()))
"""


def test_prune_and_scores_work_in_under_one_adjacency_of_memory():
    """Whole-process peak at most 2x the adjacency: growth over the process holding A < 1x."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    growth = float(run.stdout.strip().splitlines()[-1])
    assert 0 < growth < 1.0
