"""Adjacency entries equal real direct-effect interventions, for every family x transcoder kind.

The adjacency comes from one backward pass per batch of targets (tracer.attribution.attribute); the check runs
the frozen model *forward* with one source removed (tracer.testing.direct_run: the
real direct-mode intervention, `run_with_changes(mode="direct")`, which replays the prompt's
attention patterns, norm scales and MLP outputs) and reads every target's change:
feature pre-activations (encoder row . read vector) and demeaned logits. Removing source s changes
target t by exactly -A[t, s].

Tolerances, relative to the largest entry of each checked column: 1e-8 in float64, 1e-4 in float32.
"""

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM

from tracer.attribution.attribute import attribute
from tracer.graph.graph import LogitTarget
from tracer.interventions.intervene import ErrorChange, FeatureChange, TokenChange
from tracer.model.replacement import ReplacementModel
from tracer.testing import (
    ALL_FIXTURE_FAMILIES,
    TRANSCODER_KINDS,
    build_model,
    build_transcoders,
    direct_run,
)

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


def make(family, kind, dtype, read_hook="mlp.hook_in", seed=0):
    model = build_model(family, seed=seed).to(dtype)
    ts = build_transcoders(kind, n_layers=2, d_model=32, feature_input_hook=read_hook, seed=seed)
    return ReplacementModel(model, ts)


def unembed_directions(rm, graph):
    """(k, d_model) read vectors of the logit nodes, computed here from the unembedding."""
    unembed = rm.unembedding.to(rm.dtype)
    rows = []
    for target in graph.logit_targets:
        ids = list(target.token_ids)
        w = torch.tensor(target.weights, dtype=rm.dtype)
        rows.append(w @ unembed[ids] - w.sum() * unembed.mean(0))
    return torch.stack(rows)


def target_values(rm, graph, run, b):
    """Every target of the graph measured on batch element b of a direct-effect run."""
    feats = graph.active_features[graph.selected_features].tolist()
    values = [
        run.reads[b, layer, pos] @ rm.transcoders.layer(layer).W_enc[feat]
        for layer, pos, feat in feats
    ]
    values += list(run.final_hidden[b, -1] @ unembed_directions(rm, graph).T)
    return torch.stack(values)


def source_change(graph, column):
    layout = graph.layout
    if column < layout.n_features:
        layer, pos, feat = graph.active_features[graph.selected_features[column]].tolist()
        return FeatureChange(layer, pos, feat, 0.0)
    column -= layout.n_features
    if column < layout.n_errors:
        return ErrorChange(column // graph.n_pos, column % graph.n_pos, 0.0)
    return TokenChange(column - layout.n_errors, 0.0)


def sample_columns(graph, n_features=24):
    layout = graph.layout
    step = max(1, layout.n_features // n_features)
    features = list(range(0, layout.n_features, step))
    errors = list(range(layout.n_features + graph.n_pos + 1, layout.n_features + layout.n_errors))
    tokens = list(range(layout.n_features + layout.n_errors, layout.n_nodes - layout.n_logits))
    return features + errors + tokens[1:]


def assert_columns_match_interventions(rm, graph, columns, tolerance):
    state = rm.run_prompt(graph.input_tokens)
    clean = direct_run(rm, state, [[]])
    run = direct_run(rm, state, [[source_change(graph, c)] for c in columns])
    base = target_values(rm, graph, clean, 0)
    layout = graph.layout
    target_rows = list(range(layout.n_features)) + list(
        range(layout.n_nodes - layout.n_logits, layout.n_nodes)
    )
    # The measurement is a difference of target values, so it carries their rounding error: allow
    # that much absolute error on top (it matters only for near-zero columns, e.g. a last-layer
    # feature before the last position).
    floor = 64 * torch.finfo(base.dtype).eps * base.abs().max().item()
    checked_nonzero = 0
    for i, column in enumerate(columns):
        measured = base - target_values(rm, graph, run, i)
        predicted = graph.adjacency_matrix[target_rows, column].to(measured.dtype)
        scale = max(predicted.abs().max().item(), measured.abs().max().item())
        assert (measured - predicted).abs().max().item() <= tolerance * scale + floor, (
            f"column {column} ({source_change(graph, column)}) differs from the intervention"
        )
        checked_nonzero += int(scale > floor)
    # the sample really exercises edges of every kind
    assert checked_nonzero >= len(columns) // 2


@pytest.mark.parametrize("kind", TRANSCODER_KINDS)
@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_adjacency_equals_direct_effect_float64(family, kind):
    rm = make(family, kind, torch.float64)
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    assert graph.layout.n_features > 100  # enough active features to matter
    assert graph.adjacency_matrix.dtype == torch.float64
    assert_columns_match_interventions(rm, graph, sample_columns(graph), TOLERANCE[torch.float64])


@pytest.mark.parametrize("kind", TRANSCODER_KINDS)
@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_adjacency_equals_direct_effect_float32(family, kind):
    rm = make(family, kind, torch.float32)
    graph = attribute(PROMPT, rm, batch_size=37, progress=False)
    assert graph.adjacency_matrix.dtype == torch.float32
    assert_columns_match_interventions(rm, graph, sample_columns(graph), TOLERANCE[torch.float32])


@pytest.mark.parametrize("kind", ["plt-jumprelu", "plt-skip", "clt"])
@pytest.mark.parametrize("read_hook", ["hook_resid_mid", "ln2.hook_normalized"])
@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_other_read_points(family, read_hook, kind):
    """Sets that read the un-normalised residual stream (hook_resid_mid) or the pre-MLP norm's
    input normalised before its weight (ln2.hook_normalized: linear in resid_mid through this
    prompt's frozen norm scale) are exact too; a skip term reads there as well."""
    rm = make(family, kind, torch.float64, read_hook=read_hook)
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    assert graph.layout.n_features > 40
    assert_columns_match_interventions(rm, graph, sample_columns(graph), TOLERANCE[torch.float64])


@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_logit_rows_sum_to_demeaned_logit(family):
    """Identity: sum_s A[logit, s] + b = logit - mean_vocab(logit), where b is the demeaned logit
    of the frozen model with every source (features, errors, tokens) switched off — the frozen
    bias terms (attention/norm biases, transcoder b_dec and skip terms, the start token's MLP
    output). The right-hand side is read off the real model's own logits (for the families with
    a final soft-cap, the logits before it, which give the model's own through the soft-cap)."""
    rm = make(family, "clt", torch.float64)
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    state = rm.run_prompt(graph.input_tokens)
    everything_off = [
        *(FeatureChange(*f, 0.0) for f in graph.active_features.tolist()),
        *(
            ErrorChange(layer, pos, 0.0)
            for layer in range(rm.n_layers)
            for pos in range(state.n_pos)
        ),
        *(TokenChange(pos, 0.0) for pos in range(state.n_pos)),
    ]
    off = direct_run(rm, state, [everything_off])
    directions = unembed_directions(rm, graph)
    bias = off.final_hidden[0, -1] @ directions.T
    with torch.no_grad():
        raw = rm.model.get_output_embeddings()(state.final_hidden[-1])  # before any soft-cap
        real = rm.model(graph.input_tokens[None]).logits[0, -1]
    capped = raw if rm.softcap is None else torch.tanh(raw / rm.softcap) * rm.softcap
    # the recording pass's norms compute in float64, transformers' RMSNorms in float32
    torch.testing.assert_close(capped, real, rtol=0, atol=1e-6 * real.abs().max().item())
    demeaned = raw[graph.logit_tokens] - raw.mean()
    row_sums = graph.adjacency_matrix[-graph.layout.n_logits :].sum(1)
    torch.testing.assert_close(row_sums + bias, demeaned, rtol=1e-9, atol=1e-9)


def test_gemma3_multimodal_text_model_gives_the_causal_lm_graph():
    """The text model of Gemma3ForConditionalGeneration (under model.language_model; its forward
    applies no final soft-cap) gives, on a text prompt, the graph of a Gemma3ForCausalLM with the
    same decoder and unembedding weights and no soft-cap."""
    wrapper = build_model("gemma3_multimodal").to(torch.float64)
    config = copy.deepcopy(wrapper.config.text_config)
    assert config.final_logit_softcapping  # configured, yet never applied by the wrapper
    config.final_logit_softcapping = None
    causal = Gemma3ForCausalLM(config).to(torch.float64)
    causal.model.load_state_dict(wrapper.model.language_model.state_dict())
    causal.lm_head.load_state_dict(wrapper.lm_head.state_dict())
    ts = build_transcoders("clt", n_layers=2, d_model=32)
    graph, expected = (
        attribute(PROMPT, ReplacementModel(model, ts), batch_size=64, progress=False)
        for model in (wrapper, causal)
    )
    assert graph.layout.n_features > 100
    assert torch.equal(graph.active_features, expected.active_features)
    assert torch.equal(graph.logit_tokens, expected.logit_tokens)
    torch.testing.assert_close(graph.logit_probabilities, expected.logit_probabilities)
    scale = expected.adjacency_matrix.abs().max().item()
    torch.testing.assert_close(
        graph.adjacency_matrix, expected.adjacency_matrix, rtol=0, atol=1e-12 * scale
    )


def test_custom_direction_target_is_difference_of_token_rows():
    rm = make("llama", "plt-relu", torch.float64)
    a, b = 20, 33
    graph = attribute(
        PROMPT,
        rm,
        targets=[a, b, LogitTarget("a-b", (a, b), (1.0, -1.0), 0.5)],
        progress=False,
    )
    rows = graph.adjacency_matrix[-3:]
    torch.testing.assert_close(rows[2], rows[0] - rows[1], rtol=0, atol=1e-12)
    assert graph.logit_tokens.tolist()[:2] == [a, b]
    assert_columns_match_interventions(rm, graph, sample_columns(graph, 8), 1e-8)


def test_top_logits_reach_desired_probability():
    rm = make("gpt2", "plt-relu", torch.float32)
    graph = attribute(PROMPT, rm, max_n_logits=50, desired_logit_prob=0.5, progress=False)
    probs = torch.softmax(rm.model(graph.input_tokens[None]).logits[0, -1], -1)
    top = probs.sort(descending=True).values
    k = len(graph.logit_targets)
    assert top[:k].sum() >= 0.5 and (k == 1 or top[: k - 1].sum() < 0.5)
    torch.testing.assert_close(graph.logit_probabilities, top[:k])


def test_max_feature_nodes_keeps_influential_features_exactly():
    rm = make("gpt2", "clt", torch.float64)
    full = attribute(PROMPT, rm, batch_size=16, progress=False)
    budget = full.layout.n_features // 3
    small = attribute(PROMPT, rm, batch_size=16, max_feature_nodes=budget, progress=False)
    assert small.layout.n_features == budget
    assert torch.equal(small.active_features, full.active_features)
    # rows and columns of the kept features are the full graph's entries
    keep = small.selected_features
    n_full, n_small = full.layout.n_features, small.layout.n_features
    rest_full = torch.arange(n_full, full.layout.n_nodes)
    rest_small = torch.arange(n_small, small.layout.n_nodes)
    idx_full = torch.cat([keep, rest_full])
    idx_small = torch.cat([torch.arange(n_small), rest_small])
    torch.testing.assert_close(
        small.adjacency_matrix[idx_small][:, idx_small],
        full.adjacency_matrix[idx_full][:, idx_full],
        rtol=0,
        atol=1e-12,
    )
    # greedy exploration by influence beats an arbitrary choice of the same size
    influence = full.node_influence()[:n_full]
    assert influence[keep].sum() > influence.sort(descending=True).values[-budget:].sum() * 2
    assert influence[keep].sum() >= 0.6 * influence.sort(descending=True).values[:budget].sum()
