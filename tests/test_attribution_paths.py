"""Attribution's ways of computing rows give one graph.

Rows of a batch of targets run through the shortest linear pass of a prompt prefix that holds
them (tracer.attribution.rows): these tests force every prefix, check the rows against real
direct-effect interventions, and check that the graph does not depend on the batch size or on
which prefixes exist. With a node budget the greedy order must pick the features that a dense
re-computation of the influence picks from the full graph's rows.
"""

import itertools
import random

import pytest
import torch
from test_attribution_exactness import (
    PROMPT,
    assert_columns_match_interventions,
    make,
    sample_columns,
)

import tracer.attribution.attribute as attribution
from tracer.attribution.attribute import attribute
from tracer.attribution.rows import FORWARD_OVERHEAD, plan_prefix_lengths
from tracer.model.replacement import ReplacementModel


def every_prefix(sources, batch, n_layers):
    return list(range(1, sources.n_pos + 1))


def only_the_prompt(sources, batch, n_layers):
    return None


def spy_pass_lengths(monkeypatch) -> list[int]:
    """The prompt lengths of the linear passes attribution builds from now on."""
    lengths = []
    linear_forward = ReplacementModel.linear_forward

    def recording(self, state, *args, **kwargs):
        lengths.append(state.n_pos)
        return linear_forward(self, state, *args, **kwargs)

    monkeypatch.setattr(ReplacementModel, "linear_forward", recording)
    return lengths


@pytest.mark.parametrize(
    "family, kind", [("llama", "clt"), ("gpt2", "plt-skip"), ("gemma2", "plt-jumprelu")]
)
def test_rows_through_prefix_passes_equal_direct_effects(monkeypatch, family, kind):
    rm = make(family, kind, torch.float64)
    monkeypatch.setattr(attribution, "prefix_lengths", every_prefix)
    lengths = spy_pass_lengths(monkeypatch)
    graph = attribute(PROMPT, rm, batch_size=5, progress=False)
    n_pos = graph.n_pos
    assert sorted(lengths) == list(range(1, n_pos + 1))
    assert_columns_match_interventions(rm, graph, sample_columns(graph), 1e-8)


def test_graph_independent_of_batch_size_and_prefixes(monkeypatch):
    rm = make("llama", "clt", torch.float32)
    graphs = {}
    for batch, plan in [(64, only_the_prompt), (7, every_prefix), (1, attribution.prefix_lengths)]:
        monkeypatch.setattr(attribution, "prefix_lengths", plan)
        graphs[batch] = attribute(PROMPT, rm, batch_size=batch, progress=False)
    reference = graphs.pop(64).adjacency_matrix
    assert reference.shape[0] > 60
    scale = reference.abs().max().item()
    for graph in graphs.values():
        torch.testing.assert_close(graph.adjacency_matrix, reference, rtol=0, atol=1e-5 * scale)


def test_planned_prefixes_shorten_the_passes(monkeypatch):
    """With many batches the plan builds a pass shorter than the prompt and rows use it."""
    rm = make("gpt2", "clt", torch.float64)
    lengths = spy_pass_lengths(monkeypatch)
    graph = attribute(list(range(5, 45)), rm, batch_size=8, progress=False)
    assert min(lengths) < graph.n_pos == max(lengths)
    monkeypatch.setattr(attribution, "prefix_lengths", only_the_prompt)
    full = attribute(list(range(5, 45)), rm, batch_size=8, progress=False)
    scale = full.adjacency_matrix.abs().max().item()
    torch.testing.assert_close(
        graph.adjacency_matrix, full.adjacency_matrix, rtol=0, atol=1e-12 * scale
    )


def greedy_selection(full, budget: int, batch: int, update_interval: int = 4) -> list[int]:
    """The features the greedy exploration visits, re-computed densely from the full graph.

    Every `update_interval` batches the influence on the logits of every column node is
    w B (I - M)^-1 over the rows known so far (B: |rows| normalised to sum 1, M: the feature
    rows among them as a square matrix over the columns), then the next unvisited features are
    taken in decreasing influence.
    """
    n_active, k = full.layout.n_features, full.layout.n_logits
    a = full.adjacency_matrix.double()
    n_columns = a.shape[0] - k
    logit_rows, feature_rows = a[-k:, :n_columns], a[:n_active, :n_columns]
    weights = full.logit_probabilities.double()
    visited: list[int] = []
    queue: list[int] = []
    while len(visited) < budget:
        if (len(visited) // batch) % update_interval == 0:
            known = torch.cat([logit_rows, feature_rows[visited]]).abs()
            b = known / known.sum(1, keepdim=True).clamp_min(1e-30)
            m = torch.zeros(n_columns, n_columns, dtype=torch.float64)
            m[visited] = b[k:]
            first = weights @ b[:k]
            influence = torch.linalg.solve(torch.eye(n_columns, dtype=m.dtype) - m.T, first)
            influence = influence[:n_active].clone()
            influence[visited] = -1.0
            queue = influence.argsort(descending=True)[: budget - len(visited)].tolist()
        take, queue = queue[: min(batch, budget - len(visited))], queue[batch:]
        visited += take
    return sorted(visited)


def test_greedy_order_picks_the_most_influential_features():
    rm = make("gpt2", "clt", torch.float64)
    full = attribute(PROMPT, rm, batch_size=4, progress=False)
    budget = full.layout.n_features // 2
    small = attribute(PROMPT, rm, batch_size=4, max_feature_nodes=budget, progress=False)
    assert budget > 12  # several influence updates
    expected = greedy_selection(full, budget, batch=4)
    assert small.selected_features.tolist() == expected


def modelled_cost(needs, lengths, n_layers):
    build = sum(1.75 * n_layers * (length + FORWARD_OVERHEAD) for length in lengths)
    runs = sum(depth * min(n for n in lengths if n >= length) for length, depth in needs)
    return build + runs


def test_plan_is_the_least_modelled_cost_of_all_choices():
    rng = random.Random(0)
    for _ in range(20):
        n_pos, n_layers = rng.randint(2, 40), rng.randint(1, 6)
        needs = [
            (rng.randint(1, n_pos), rng.randint(1, n_layers)) for _ in range(rng.randint(1, 9))
        ]
        plan = plan_prefix_lengths(needs, n_pos, n_layers, forward_cost=1.75)
        assert plan[-1] == n_pos and plan == sorted(set(plan))
        optional = sorted({length for length, _ in needs} - {n_pos})
        best = min(
            modelled_cost(needs, [*chosen, n_pos], n_layers)
            for r in range(len(optional) + 1)
            for chosen in itertools.combinations(optional, r)
        )
        assert modelled_cost(needs, plan, n_layers) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_prefix_state_runs_the_prompt_restricted_to_it(family):
    rm = make(family, "plt-skip", torch.float64)
    state = rm.run_prompt(rm.tokenize(PROMPT))
    whole = rm.linear_forward(state, 1).final_hidden.detach()
    for n in (1, 3, state.n_pos - 1):
        prefix = rm.linear_forward(state.prefix(n), 1).final_hidden.detach()
        torch.testing.assert_close(prefix[0], whole[0, :n], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prefix length"):
        state.prefix(state.n_pos + 1)
