"""Interventions (tracer/interventions/intervene.py) checked against independent computations.

The references are hand-built: a second, untouched copy of the Hugging Face model (same seed, so the
same weights; the replacement model's copy carries tracer's freezing) run with plain torch hooks.
- A feature change is a forward pre-hook on the layer's MLP (the transcoder reads the MLP input,
  `mlp.hook_in`) that computes the feature's live activation from the transcoder weights, and a
  forward hook on the module that writes the MLP output (the families table's `mlp_write`) adding
  (new - live) x the decoder row there; a cross-layer transcoder adds it to every layer >= its own.
- Frozen attention replaces each attention module's output by o_proj(clean pattern @ values).
- Direct effects are checked against the attribution graph's adjacency (tracer.attribution.attribute).

Everything runs in float64. Tolerances: 1e-10 absolute on logits for hand-built forwards; 1e-8
relative (to the largest entry of a column) for adjacency entries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from transformers import PreTrainedModel

from tracer.attribution.attribute import attribute
from tracer.graph.graph import Graph
from tracer.interventions.intervene import (
    ErrorChange,
    FeatureChange,
    TokenChange,
    ablate_supernodes,
    generate,
    intervene,
    run_with_changes,
)
from tracer.model.families import Family, family_for, get_module
from tracer.model.replacement import ReplacementModel
from tracer.testing import FIXTURE_FAMILIES, build_model, build_transcoders
from tracer.transcoders.sets import TranscoderSet

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]  # the start token 0 is prepended: 9 positions
N_POS = len(PROMPT) + 1
HAND_BUILT_TOLERANCE = 1e-10
ADJACENCY_TOLERANCE = 1e-8


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add synchronisation (seconds on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- models ------------------------------------------------------------------------------------
@functools.cache
def replacement(family: str, kind: str, attention: str | None = None) -> ReplacementModel:
    """A float64 replacement model; `attention` overrides the attention implementation."""
    model = build_model(family).to(torch.float64)
    if attention is not None:
        model.set_attn_implementation(attention)
    return ReplacementModel(model, build_transcoders(kind, n_layers=2, d_model=32))


@functools.cache
def plain(family: str) -> PreTrainedModel:
    """An untouched copy of the fixture model: no freezing, no NNSight."""
    model = build_model(family).to(torch.float64)
    model.generation_config.eos_token_id = None  # generate every requested token
    return model


@functools.cache
def graph(family: str, kind: str) -> Graph:
    return attribute(PROMPT, replacement(family, kind), progress=False)


def prompt_ids() -> torch.Tensor:
    return torch.tensor([0, *PROMPT])


def clean_activations(rm: ReplacementModel) -> list[torch.Tensor]:
    """Per layer (n_pos, d_transcoder) activations of the clean prompt (used to pick features)."""
    return rm.run_prompt(prompt_ids(), zero_bos=False).activations


def top_feature(rm: ReplacementModel, layer: int, pos: int) -> int:
    acts = clean_activations(rm)[layer][pos]
    assert acts.max() > 0, f"no active feature at layer {layer}, position {pos}"
    return int(acts.argmax())


def without_softcap(rm: ReplacementModel, logits: torch.Tensor) -> torch.Tensor:
    """Undo a final logit soft-cap (Gemma-2): the adjacency is linear in the logits before it."""
    if not rm.softcap:
        return logits
    return rm.softcap * torch.atanh(logits / rm.softcap)


# ---- the hand-built reference ------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """A feature change for the reference: the live activation at `positions` -> value/scaled."""

    layer: int
    feature: int
    positions: slice | list[int]
    value: float | None = None
    scale: float | None = None

    def new(self, live: torch.Tensor) -> torch.Tensor:
        return live * self.scale if self.value is None else torch.full_like(live, self.value)


def live_activations(ts: TranscoderSet, layer: int, x: torch.Tensor) -> torch.Tensor:
    """(..., d_model) MLP input -> (..., d_transcoder) activations, from the weights alone."""
    w = ts.layer(layer)
    pre = torch.einsum("...d,fd->...f", x, w.W_enc) + w.b_enc
    if ts.activation == "relu":
        return pre.clamp(min=0)
    if ts.activation == "jumprelu":
        return torch.where(pre > w.threshold, pre, torch.zeros_like(pre))
    top = pre.clamp(min=0).topk(ts.top_k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def decoder_row(ts: TranscoderSet, source: int, target: int, feature: int) -> torch.Tensor:
    w = ts.layer(source).W_dec
    return w[feature, target - source] if ts.cross_layer else w[feature]


def layer_modules(model: PreTrainedModel) -> tuple[Family, torch.nn.ModuleList]:
    family = family_for(model.config.model_type)
    return family, get_module(get_module(model, family.base), family.layers)


@contextmanager
def edited(
    model: PreTrainedModel,
    ts: TranscoderSet,
    edits: list[Edit],
    reads: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Hooks that apply `edits` on every forward of `model`; `reads` collects each MLP input."""
    family, layers = layer_modules(model)
    deltas: dict[int, torch.Tensor] = {}  # edit index -> (batch, n_positions) activation change

    def read_hook(layer: int) -> Callable:
        def hook(module, args):
            x = args[0]  # (batch, n_pos, d_model)
            if reads is not None:
                reads[layer] = x.detach().clone()
            for i, edit in enumerate(edits):
                if edit.layer == layer:
                    live = live_activations(ts, layer, x[:, edit.positions])[..., edit.feature]
                    deltas[i] = edit.new(live) - live

        return hook

    def write_hook(layer: int) -> Callable:
        def hook(module, args, output):
            output = output.clone()
            for i, edit in enumerate(edits):
                writes_here = edit.layer <= layer if ts.cross_layer else edit.layer == layer
                if writes_here:
                    row = decoder_row(ts, edit.layer, layer, edit.feature)
                    output[:, edit.positions] += deltas[i][..., None] * row
            return output

        return hook

    handles = []
    for layer, block in enumerate(layers):
        handles.append(get_module(block, family.mlp).register_forward_pre_hook(read_hook(layer)))
        write = get_module(block, family.mlp_write)
        handles.append(write.register_forward_hook(write_hook(layer)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen_patterns(model: PreTrainedModel, patterns: list[torch.Tensor]) -> Iterator[None]:
    """Each attention module outputs out_proj(pattern @ values) with its layer's fixed pattern."""
    family, layers = layer_modules(model)

    def hook_for(pattern: torch.Tensor) -> Callable:  # pattern (1, heads, n_pos, n_pos)
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, n_pos, d_model = hidden.shape
            if family.name == "gpt2":  # fused q|k|v projection
                values, out_proj = module.c_attn(hidden)[..., 2 * d_model :], module.c_proj
            else:
                values, out_proj = module.v_proj(hidden), module.o_proj
            values = values.view(batch, n_pos, -1, module.head_dim).transpose(1, 2)
            values = values.repeat_interleave(pattern.shape[1] // values.shape[1], dim=1)
            mixed = (pattern @ values).transpose(1, 2).reshape(batch, n_pos, -1)
            return (out_proj(mixed), *output[1:])

        return hook

    handles = [
        get_module(block, family.attention).register_forward_hook(hook_for(p), with_kwargs=True)
        for block, p in zip(layers, patterns, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def clean_patterns(family_name: str) -> list[torch.Tensor]:
    """Attention weights of the clean prompt from an eager copy, with float64 residual norms.

    Hugging Face's RMSNorm rounds through float32 even in a float64 model; tracer records patterns
    with exact float64 norms, so the copy's residual-stream norms are recomputed in float64 here.
    """
    model = build_model(family_name).to(torch.float64)
    model.set_attn_implementation("eager")
    family, layers = layer_modules(model)

    def exact_rms(module, args, output):
        x = args[0]
        eps = getattr(module, "eps", None) or module.variance_epsilon
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if family.norm_style == "rms_one_plus":
            return normed * (1 + module.weight)
        return module.weight * normed

    if family.norm_style != "layernorm":  # torch's LayerNorm is exact in float64 already
        for block in layers:
            for name in family.residual_norms:
                get_module(block, name).register_forward_hook(exact_rms)
    with torch.no_grad():
        return list(model(prompt_ids()[None], output_attentions=True).attentions)


@torch.no_grad()
def reference_logits(
    family: str,
    ts: TranscoderSet,
    edits: list[Edit],
    ids: torch.Tensor | None = None,
    reads: dict[int, torch.Tensor] | None = None,
    patterns: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n_pos, vocab) logits of the plain model with `edits` (and frozen `patterns`) applied."""
    model = plain(family)
    ids = prompt_ids() if ids is None else ids
    with edited(model, ts, edits, reads):
        if patterns is None:
            return model(ids[None]).logits[0]
        with frozen_patterns(model, patterns):
            return model(ids[None]).logits[0]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error <= HAND_BUILT_TOLERANCE, f"{what}: max |difference| {error:.3g}"


# ---- 1. full mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plt-jumprelu", "clt"])
@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_full_mode_equals_hand_built_forward(family, kind):
    rm = replacement(family, kind)
    ts = rm.transcoders
    f0, f1 = top_feature(rm, 0, 3), top_feature(rm, 1, 5)
    batch = [[FeatureChange(0, 3, f0, value=-1.5)], [FeatureChange(1, 5, f1, scale=-2.0)]]
    edits = [[Edit(0, f0, [3], value=-1.5)], [Edit(1, f1, [5], scale=-2.0)]]
    result = intervene(rm, PROMPT, batch, mode="full")
    assert result.logits.shape == (2, N_POS, rm.vocab_size)
    for b in range(2):
        reads: dict[int, torch.Tensor] = {}
        expected = reference_logits(family, ts, edits[b], reads=reads)
        assert_logits_close(result.logits[b], expected, f"change set {b}")
        # the change is real: later positions move, earlier ones do not
        moved = (result.logits[b] - plain(family)(prompt_ids()[None]).logits[0]).abs().amax(-1)
        first = batch[b][0].pos
        assert moved[:first].max() < 1e-6 and moved[first:].max() > 1e-3
        # reported activations: the live ones (downstream features respond), the changed one set
        for layer in range(rm.n_layers):
            live = live_activations(ts, layer, reads[layer][0])
            change = batch[b][0]
            if change.layer == layer:
                live[change.pos, change.feature] = edits[b][0].new(live[change.pos, change.feature])
            reported = result.activations[layer].to_dense()[b]
            torch.testing.assert_close(reported, live, rtol=0, atol=HAND_BUILT_TOLERANCE)


@pytest.mark.parametrize("kind", ["plt-relu", "plt-jumprelu", "plt-topk", "clt"])
def test_skipping_activations_changes_nothing(kind):
    """`with_activations=False` evaluates only the changed features; the logits are the same."""
    rm = replacement("llama", kind)
    ids = prompt_ids()
    state = rm.run_prompt(ids, zero_bos=False)
    batch = [[FeatureChange(0, None, top_feature(rm, 0, 4), scale=3.0)]]
    kwargs = dict(model=rm, state=state, ids=ids[None], batch=batch)
    full = run_with_changes(**kwargs, with_activations=True)
    lean = run_with_changes(**kwargs, with_activations=False)
    assert lean.activations == []
    torch.testing.assert_close(lean.logits, full.logits, rtol=0, atol=1e-12)


# ---- 2 and 5. direct mode reproduces the adjacency ---------------------------------------------
DIRECT_CASES = [
    ("gpt2", "plt-skip"),
    ("llama", "clt"),
    ("gemma2", "plt-jumprelu"),
    ("qwen3", "plt-topk"),
]


def graph_columns(g: Graph) -> dict[int, FeatureChange | ErrorChange | TokenChange]:
    """Adjacency column -> the ablation of its source: features, errors and tokens (pos >= 1)."""
    layout = g.layout
    columns: dict[int, FeatureChange | ErrorChange | TokenChange] = {}
    features = g.active_features[g.selected_features]
    later = (features[:, 1] >= 1).nonzero(as_tuple=True)[0]
    for column in later[:: max(1, len(later) // 12)].tolist():
        layer, pos, feature = features[column].tolist()
        columns[column] = FeatureChange(layer, pos, feature, scale=0.0)
    for layer in range(g.n_layers):
        for pos in (1, g.n_pos // 2, g.n_pos - 1):
            columns[layout.n_features + layer * g.n_pos + pos] = ErrorChange(layer, pos, 0.0)
    for pos in range(1, g.n_pos):
        columns[layout.n_features + layout.n_errors + pos] = TokenChange(pos, 0.0)
    return columns


@pytest.mark.parametrize(("family", "kind"), DIRECT_CASES)
def test_direct_mode_reproduces_adjacency(family, kind):
    rm, g = replacement(family, kind), graph(family, kind)
    columns = graph_columns(g)
    result = intervene(rm, PROMPT, [[c] for c in columns.values()], mode="direct")
    tokens = g.logit_tokens
    raw = without_softcap(rm, result.logits[:, -1])  # (batch, vocab)
    clean = without_softcap(rm, result.clean_logits[-1])
    demeaned = raw[:, tokens] - raw.mean(-1, keepdim=True)
    clean_demeaned = clean[tokens] - clean.mean()
    logit_rows = g.adjacency_matrix[-len(g.logit_targets) :]
    # a zero entry (a last-layer feature before the last position) is measured as rounding noise
    floor = 1e-11 * max(logit_rows.abs().max().item(), clean.abs().max().item())
    kinds_seen = set()
    for b, (column, change) in enumerate(columns.items()):
        measured = demeaned[b] - clean_demeaned
        predicted = -logit_rows[:, column]
        scale = max(measured.abs().max().item(), predicted.abs().max().item())
        error = (measured - predicted).abs().max().item()
        assert error <= ADJACENCY_TOLERANCE * scale + floor, f"{change}: {error:.3g} of {scale:.3g}"
        if scale > 1e-6:
            kinds_seen.add(type(change))
    assert kinds_seen == {FeatureChange, ErrorChange, TokenChange}  # real edges of every kind


# ---- 3. generation -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_generation_without_changes_is_huggingface_greedy(family):
    rm = replacement(family, "clt")
    out = generate(rm, PROMPT, max_new_tokens=8)
    ids = prompt_ids()[None]
    with torch.no_grad():
        expected = plain(family).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    assert out.n_prompt == N_POS and out.texts is None
    assert out.tokens.tolist() == expected.tolist()


def greedy_reference(family: str, ts: TranscoderSet, edits_for: Callable, n_new: int) -> list:
    """Hand-built greedy loop: full forwards of the plain model, edits from `edits_for(n_pos)`."""
    ids = prompt_ids()
    for _ in range(n_new):
        logits = reference_logits(family, ts, edits_for(ids.shape[0]), ids=ids)
        ids = torch.cat([ids, logits[-1].argmax()[None]])
    return ids.tolist()


@pytest.mark.parametrize("on_new_tokens", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_generation_with_a_zeroed_feature_matches_greedy_loop(family, on_new_tokens):
    rm = replacement(family, "clt")
    acts = clean_activations(rm)[0]
    feature = int(acts.sum(0).argmax())  # active at many positions
    n_new = 6
    out = generate(
        rm,
        PROMPT,
        [FeatureChange(0, None, feature, value=0.0)],
        max_new_tokens=n_new,
        on_new_tokens=on_new_tokens,
    )

    def edits_for(n_pos: int) -> list[Edit]:
        return [Edit(0, feature, slice(0, n_pos if on_new_tokens else N_POS), value=0.0)]

    expected = greedy_reference(family, rm.transcoders, edits_for, n_new)
    assert out.tokens[0].tolist() == expected
    if on_new_tokens:  # the feature matters: the continuation is not the clean one
        clean = greedy_reference(family, rm.transcoders, lambda n: [], n_new)
        assert expected != clean


@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_generation_rows_equal_single_runs(do_sample):
    rm = replacement("llama", "plt-relu")
    sets = [[FeatureChange(0, None, 3, value=0.0)], [FeatureChange(1, 2, 4, scale=-2.0)]]
    kwargs = dict(max_new_tokens=6, on_new_tokens=True, do_sample=do_sample, seed=3)
    together = generate(rm, PROMPT, sets, **kwargs).tokens
    for b, changes in enumerate(sets):
        assert together[b].tolist() == generate(rm, PROMPT, changes, **kwargs).tokens[0].tolist()


def test_an_empty_change_set_generates_the_unchanged_prompt_beside_the_others():
    rm = replacement("llama", "plt-relu")
    changes = [FeatureChange(0, None, 3, value=0.0)]
    together = generate(rm, PROMPT, [[], changes], max_new_tokens=6, on_new_tokens=True).tokens
    alone = generate(rm, PROMPT, max_new_tokens=6).tokens[0]
    assert together[0].tolist() == alone.tolist()
    changed = generate(rm, PROMPT, changes, max_new_tokens=6, on_new_tokens=True).tokens[0]
    assert together[1].tolist() == changed.tolist()
    with pytest.raises(ValueError, match="intervention set is empty"):
        intervene(rm, PROMPT, [[], changes])  # a measurement needs something to change


def test_seeded_sampling_is_reproducible():
    rm = replacement("llama", "plt-relu")
    changes = [FeatureChange(0, None, 3, value=0.0)]
    kwargs = dict(max_new_tokens=8, on_new_tokens=True, do_sample=True)
    first = generate(rm, PROMPT, changes, seed=7, **kwargs).tokens
    assert torch.equal(first, generate(rm, PROMPT, changes, seed=7, **kwargs).tokens)
    assert not torch.equal(first, generate(rm, PROMPT, changes, seed=8, **kwargs).tokens)


def test_direct_mode_applies_changes_on_new_tokens():
    rm = replacement("llama", "plt-relu")
    ids = prompt_ids()
    state = rm.run_prompt(ids, zero_bos=False)
    longer = torch.cat([ids, torch.tensor([20, 21, 22])])[None]
    feature = top_feature(rm, 0, 4)
    change = [[FeatureChange(0, None, feature, scale=3.0)]]
    untouched = run_with_changes(rm, state, longer, [[TokenChange(0, 1.0)]], "direct")
    assert untouched.activations[0].to_dense()[0, N_POS:, feature].max() > 0.1  # active there
    on, off = (
        run_with_changes(rm, state, longer, change, "direct", on_new_tokens=flag)
        for flag in (True, False)
    )
    # scaling the feature at the generated positions must move their logits
    assert (on.logits[0, N_POS:] - off.logits[0, N_POS:]).abs().max() > 1e-6


# ---- 4. supernodes -----------------------------------------------------------------------------
def supernode_members(rm: ReplacementModel) -> list[tuple[int, int, int]]:
    return [
        (0, 2, top_feature(rm, 0, 2)),
        (0, 5, top_feature(rm, 0, 5)),
        (1, 7, top_feature(rm, 1, 7)),
    ]


@pytest.mark.parametrize(("family", "kind"), [("gpt2", "plt-relu"), ("llama", "clt")])
def test_supernode_ablation_is_one_joint_intervention(family, kind):
    rm = replacement(family, kind)
    members = supernode_members(rm)
    groups = {"group": members, **{f"single{i}": [m] for i, m in enumerate(members)}}
    full = ablate_supernodes(rm, PROMPT, groups, mode="full")
    assert list(full) == list(groups)
    for name, result in full.items():
        assert result.logits.shape == (1, N_POS, rm.vocab_size)
        for layer, pos, feature in groups[name]:
            assert result.activations[layer].to_dense()[0, pos, feature] == 0
    joint = intervene(rm, PROMPT, [FeatureChange(*m, value=0.0) for m in members], mode="full")
    torch.testing.assert_close(full["group"].logits, joint.logits, rtol=0, atol=1e-12)
    edits = [Edit(layer, feature, [pos], value=0.0) for layer, pos, feature in members]
    expected = reference_logits(family, rm.transcoders, edits)
    assert_logits_close(full["group"].logits[0], expected, "supernode")

    def interaction(results: dict, clean: torch.Tensor) -> torch.Tensor:
        singles = sum(results[f"single{i}"].logits[0] - clean for i in range(3))
        return (results["group"].logits[0] - clean) - singles

    # the real model is not linear in its features ...
    real_clean = reference_logits(family, rm.transcoders, [])
    assert interaction(full, real_clean).abs().max() > 1e-6
    # ... the frozen direct-effect model is (its clean run replays the recorded prompt)
    direct = ablate_supernodes(rm, PROMPT, groups, mode="direct")
    assert interaction(direct, direct["group"].clean_logits).abs().max() < 1e-9


# ---- 6. frozen attention -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_frozen_attention_equals_hand_built_forward_with_clean_patterns(family):
    # the replacement model runs eager too, so that the pattern it records (through the family's
    # own attention function) is the one eager's `output_attentions` gives: eager's softmax rounds
    # through float32, sdpa's does not
    rm = replacement(family, "plt-jumprelu", attention="eager")
    feature = top_feature(rm, 0, 2)
    result = intervene(
        rm, PROMPT, [FeatureChange(0, 2, feature, value=-3.0)], mode="frozen_attention"
    )
    edits = [Edit(0, feature, [2], value=-3.0)]
    expected = reference_logits(family, rm.transcoders, edits, patterns=clean_patterns(family))
    assert_logits_close(result.logits[0], expected, "frozen attention")


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_frozen_attention_differs_from_full_only_through_later_attention(family):
    """Full and frozen-attention runs differ only where a later attention layer's pattern would
    move: not at all for a last-layer change (no attention after it); for a layer-0 change at the
    last position only at that position (its own query); for an early change from its position on.
    Tracer records patterns with float64 norms, Hugging Face's RMSNorm rounds through float32:
    'equal' allows 1e-7, 'differs' asks for 1e-6."""
    rm = replacement(family, "plt-jumprelu")
    last = N_POS - 1

    def gap(layer: int, pos: int) -> torch.Tensor:  # (n_pos,) max |full - frozen| per position
        change = [FeatureChange(layer, pos, top_feature(rm, layer, pos), value=-10.0)]
        full = intervene(rm, PROMPT, change, mode="full").logits[0]
        frozen = intervene(rm, PROMPT, change, mode="frozen_attention").logits[0]
        return (full - frozen).abs().amax(-1)

    assert gap(1, 2).max() < 1e-7
    at_last = gap(0, last)
    assert at_last[:last].max() < 1e-7 and at_last[last] > 1e-6
    early = gap(0, 2)
    assert early[:2].max() < 1e-7 and early[3:].max() > 1e-6


# ---- 7. bad input ------------------------------------------------------------------------------
BAD_INPUTS = {
    "unknown layer": (
        lambda rm: intervene(rm, PROMPT, [FeatureChange(2, 1, 0, value=0.0)]),
        "layer 2 out of range",
    ),
    "error layer": (
        lambda rm: intervene(rm, PROMPT, [ErrorChange(-1, 1, 0.0)]),
        "layer -1 out of range",
    ),
    "feature too large": (
        lambda rm: intervene(rm, PROMPT, [FeatureChange(0, 1, 48, value=0.0)]),
        "feature 48 out of range",
    ),
    "negative feature": (
        lambda rm: intervene(rm, PROMPT, [FeatureChange(0, 1, -1, value=0.0)]),
        "feature -1 out of range",
    ),
    "position": (
        lambda rm: intervene(rm, PROMPT, [FeatureChange(0, N_POS, 0, value=0.0)]),
        "position 9 out of range",
    ),
    "token position": (
        lambda rm: intervene(rm, PROMPT, [TokenChange(-1, 0.0)]),
        "position -1 out of range",
    ),
    "nan value": (lambda rm: FeatureChange(0, 1, 0, value=math.nan), "must be finite"),
    "inf scale": (lambda rm: FeatureChange(0, 1, 0, scale=math.inf), "must be finite"),
    "nan error scale": (
        lambda rm: intervene(rm, PROMPT, [ErrorChange(0, 1, math.nan)]),
        "must be finite",
    ),
    "inf token scale": (
        lambda rm: intervene(rm, PROMPT, [TokenChange(1, -math.inf)]),
        "must be finite",
    ),
    "value and scale": (lambda rm: FeatureChange(0, 1, 0, value=1.0, scale=1.0), "exactly one"),
    "neither value nor scale": (lambda rm: FeatureChange(0, 1, 0), "exactly one"),
    "empty change list": (lambda rm: intervene(rm, PROMPT, []), "no interventions"),
    "empty set in a batch": (
        lambda rm: intervene(rm, PROMPT, [[FeatureChange(0, 1, 0, value=0.0)], []]),
        "intervention set is empty",
    ),
    "unknown mode": (
        lambda rm: intervene(rm, PROMPT, [TokenChange(1, 0.0)], mode="fast"),
        "mode must be one of",
    ),
    "unknown generation mode": (
        lambda rm: generate(rm, PROMPT, mode="fast", max_new_tokens=2),
        "mode must be one of",
    ),
    "no supernodes": (lambda rm: ablate_supernodes(rm, PROMPT, {}), "no supernodes"),
    "empty supernode": (lambda rm: ablate_supernodes(rm, PROMPT, {"a": []}), "'a' has no members"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(replacement("gpt2", "plt-relu"))


def test_generation_checks_input_even_with_no_new_tokens():
    rm = replacement("gpt2", "plt-relu")
    with pytest.raises(ValueError, match="mode must be one of"):
        generate(rm, PROMPT, mode="fast", max_new_tokens=0)
