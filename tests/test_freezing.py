"""Attention and norm freezing (tracer.model.freezing) against unmodified models and finite differences.

Float64 throughout. transformers' RMSNorms compute in float32 whatever the input dtype, while the
frozen norms compute in float64; where values are compared to an unmodified model, the reference
model therefore has its residual/final norms evaluated by the formula of `reference_norm` in
float64 (LayerNorm already is), so the comparison can be tight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
import torch
from test_families import reference_norm

from tracer.attribution.attribute import attribute
from tracer.model.families import get_module
from tracer.model.freezing import MODES, Freezer, Recording
from tracer.model.replacement import ReplacementModel
from tracer.testing import FIXTURE_FAMILIES, build_model, build_transcoders, direct_run

IDS = torch.tensor([[0, 5, 9, 17, 3, 22, 41, 8, 30, 11]])  # longer than gemma2's sliding window
OTHER_IDS = torch.tensor([[0, 12, 40, 6, 33, 2, 19, 27, 50, 14]])


@dataclasses.dataclass
class Setup:
    rm: ReplacementModel
    logits_before: torch.Tensor  # (1, n_pos, vocab) of the model before freezing was installed

    @property
    def model(self) -> torch.nn.Module:
        return self.rm.model

    @property
    def base(self) -> torch.nn.Module:
        return self.rm.base


@pytest.fixture(scope="module", params=FIXTURE_FAMILIES)
def setup(request) -> Setup:
    model = build_model(request.param).to(torch.float64)
    with torch.no_grad():
        before = model(IDS).logits
    transcoders = build_transcoders("plt-skip", n_layers=2, d_model=32)
    return Setup(ReplacementModel(model, transcoders), before)


def reference_model(rm: ReplacementModel, *, eager: bool) -> torch.nn.Module:
    """The same weights, residual/final norms evaluated in float64; `eager` attention returns
    its weights."""
    model = build_model(rm.family.name).to(torch.float64)
    if eager:
        model.set_attn_implementation("eager")
    fam = rm.family
    base = get_module(model, fam.base)
    norms = [get_module(base, fam.final_norm)]
    for layer in get_module(base, fam.layers):
        norms += [get_module(layer, name) for name in fam.residual_norms]
    for norm in norms:
        norm.forward = functools.partial(reference_norm, fam.norm_style, norm)
    return model.eval()


def frozen(rm: ReplacementModel, mode: str, recording: Recording | None = None):
    """Plain (untraced) calls of the model inside this block freeze per `mode`."""
    return rm.freezer.frozen(mode, recording=recording)


@contextlib.contextmanager
def hooked(
    rm: ReplacementModel, embed: torch.Tensor | None, mlp_writes: list | None
) -> Iterator[None]:
    """Replace the residual stream entering layer 0 and/or each MLP block's write (forward hooks)."""
    handles = []
    if embed is not None:
        module = get_module(rm.base, rm.family.embed_out)
        handles.append(module.register_forward_hook(lambda _m, _a, _o: embed))
    for i, layer in enumerate(rm.layers if mlp_writes is not None else []):
        module = get_module(layer, rm.family.mlp_write)
        handles.append(module.register_forward_hook(lambda _m, _a, _o, i=i: mlp_writes[i]))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_off_mode_leaves_logits_unchanged(setup: Setup):
    with torch.no_grad():
        logits = setup.model(IDS).logits
    torch.testing.assert_close(logits, setup.logits_before, rtol=0, atol=1e-12)


def test_record_mode_keeps_the_models_values(setup: Setup):
    with frozen(setup.rm, "record", Recording()), torch.no_grad():
        logits = setup.model(IDS).logits
    reference = reference_model(setup.rm, eager=False)
    with torch.no_grad():
        expected = reference(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    # against the untouched model, up to its float32 RMSNorm rounding
    torch.testing.assert_close(logits, setup.logits_before, rtol=0, atol=1e-6)


def test_recorded_patterns_are_the_models_eager_attention_weights(setup: Setup):
    recording = Recording()
    with frozen(setup.rm, "record", recording), torch.no_grad():
        setup.model(IDS)
    patterns = [recording.patterns[layer] for layer in range(setup.rm.n_layers)]

    reference = reference_model(setup.rm, eager=True)
    weights: list[torch.Tensor] = []
    for layer in get_module(get_module(reference, setup.rm.family.base), setup.rm.family.layers):
        attention = get_module(layer, setup.rm.family.attention)
        attention.register_forward_hook(lambda _m, _a, out: weights.append(out[1]))
    with torch.no_grad():
        reference(IDS)
    assert len(weights) == len(patterns) == setup.rm.n_layers
    n = IDS.shape[1]
    # Llama's and Qwen-3's eager attention take the softmax in float32 (the tracer model runs
    # sdpa in float64); GPT-2's is float64 and Gemma-2 runs the same eager function in both
    atol = 1e-6 if setup.rm.family.name in ("llama", "qwen3") else 1e-12
    for pattern, expected in zip(patterns, weights, strict=True):
        assert pattern.shape == expected.shape == (1, setup.model.config.num_attention_heads, n, n)
        torch.testing.assert_close(pattern, expected, rtol=0, atol=atol)
        assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))  # causal
    if setup.rm.family.name == "gemma2":  # layer 0 slides over 4 positions, layer 1 does not
        window = setup.model.config.sliding_window
        assert torch.equal(patterns[0].tril(-window), torch.zeros_like(patterns[0]))
        assert patterns[1].tril(-window).abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_causal_mask_holds_in_every_mode(setup: Setup, mode: str):
    changed = IDS.clone()
    changed[0, -1] = 40
    recording = Recording()
    with torch.no_grad():
        with frozen(setup.rm, "record", recording):
            setup.base(IDS)  # what replay replays
        with frozen(setup.rm, mode, recording if mode == "replay" else Recording()):
            clean = setup.base(IDS).last_hidden_state
            other = setup.base(changed).last_hidden_state
    torch.testing.assert_close(other[:, :-1], clean[:, :-1], rtol=0, atol=1e-12)
    assert (other[:, -1] - clean[:, -1]).abs().max() > 1e-3


def test_replay_of_the_recorded_prompt_reproduces_it(setup: Setup):
    recording = Recording()
    with torch.no_grad():
        with frozen(setup.rm, "record", recording):
            recorded = setup.base(IDS).last_hidden_state
        with frozen(setup.rm, "replay", recording):
            replayed = setup.base(IDS).last_hidden_state
            other = setup.base(OTHER_IDS).last_hidden_state
        with frozen(setup.rm, "off"):
            other_unfrozen = setup.base(OTHER_IDS).last_hidden_state
    torch.testing.assert_close(replayed, recorded, rtol=0, atol=1e-10)
    # another input of the same length runs with this prompt's patterns and scales
    assert (other - other_unfrozen).abs().max() > 1e-3


def test_replay_of_a_shorter_input_is_refused(setup: Setup):
    recording = Recording()
    with torch.no_grad():
        with frozen(setup.rm, "record", recording):
            setup.base(IDS)
        with (
            frozen(setup.rm, "replay", recording),
            pytest.raises(RuntimeError, match="recorded 10 .* has 9"),
        ):
            setup.base(IDS[:, :-1])


def test_replay_of_a_longer_input_runs_new_positions_live(setup: Setup):
    """Generation: the recorded prompt as prefix, one more token; its position is not frozen."""
    longer = torch.cat([IDS, torch.tensor([[7]])], dim=1)
    recording = Recording()
    with torch.no_grad():
        with frozen(setup.rm, "record", Recording()):
            expected = setup.base(longer).last_hidden_state  # live everywhere, float64 norms
        with frozen(setup.rm, "record", recording):
            setup.base(IDS)  # what replay replays
        with frozen(setup.rm, "replay", recording):
            replayed = setup.base(longer).last_hidden_state
    torch.testing.assert_close(replayed, expected, rtol=0, atol=1e-10)


def test_linear_forward_is_affine_in_the_embeddings(setup: Setup):
    """Replay freezes patterns and scales: with MLP writes constant, the output is affine."""
    state = setup.rm.run_prompt(IDS[0], zero_bos=False)
    e1 = state.embeddings
    e2 = torch.randn(e1.shape, generator=torch.Generator().manual_seed(0), dtype=e1.dtype)
    e2 = e2 * e1.norm(dim=-1, keepdim=True) / e2.norm(dim=-1, keepdim=True)

    def final(embeddings: torch.Tensor) -> torch.Tensor:
        run = setup.rm.linear_forward(dataclasses.replace(state, embeddings=embeddings), 1)
        return run.final_hidden[0].detach()

    torch.testing.assert_close(final(e1), state.final_hidden, rtol=0, atol=1e-10)
    a = 0.3
    mixed = final(a * e1 + (1 - a) * e2)
    torch.testing.assert_close(mixed, a * final(e1) + (1 - a) * final(e2), rtol=0, atol=1e-10)


def test_detach_gradient_equals_finite_difference_of_replay(setup: Setup):
    """d(r . final_hidden)/d(embedding) under "detach" vs central differences under "replay",
    MLP writes held at their recorded values in both."""
    rm = setup.rm
    gen = torch.Generator().manual_seed(1)
    n = IDS.shape[1]
    embed: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    handles = [
        get_module(rm.base, rm.family.embed_out).register_forward_hook(
            lambda _m, _a, out: embed.append(out)
        ),
        *(
            get_module(layer, rm.family.mlp_write).register_forward_hook(
                lambda _m, _a, out: writes.append(out)
            )
            for layer in rm.layers
        ),
    ]
    recording = Recording()
    with torch.no_grad(), frozen(rm, "record", recording):
        rm.base(IDS)
    for handle in handles:
        handle.remove()
    e0 = embed[0]  # (1, n_pos, d_model)
    r = torch.randn(1, n, rm.d_model, generator=gen, dtype=torch.float64)

    def gradient(mode: str) -> torch.Tensor:
        e = e0.clone().requires_grad_(True)
        with frozen(rm, mode), hooked(rm, e, writes):  # detach / off: nothing recorded
            hidden = rm.base(IDS).last_hidden_state
        return torch.autograd.grad((hidden * r).sum(), e)[0]

    k, h = 4, 1e-2
    directions = torch.randn(k, n, rm.d_model, generator=gen, dtype=torch.float64)
    batch_ids = IDS.expand(2 * k, -1)
    points = torch.cat([e0 + h * directions, e0 - h * directions])
    with (
        torch.no_grad(),
        frozen(rm, "replay", recording),
        hooked(rm, points, [w.expand(2 * k, -1, -1) for w in writes]),
    ):
        values = (rm.base(batch_ids).last_hidden_state * r).sum((1, 2))
    finite_difference = (values[:k] - values[k:]) / (2 * h)

    grad = gradient("detach")
    directional = (grad * directions).sum((1, 2))
    torch.testing.assert_close(directional, finite_difference, rtol=1e-7, atol=0)
    # the freezing matters: the unfrozen gradient is a different one
    unfrozen = (gradient("off") * directions).sum((1, 2))
    assert (unfrozen - finite_difference).abs().max() > 1e-3 * finite_difference.abs().max()


def test_frozen_rejects_unknown_modes_and_a_missing_recording(setup: Setup):
    for kwargs in ({"attention": "frozen"}, {"attention": "off", "norms": "freeze"}):
        with pytest.raises(ValueError) as info, setup.rm.freezer.frozen(**kwargs):
            pass
        for mode in ("off", "detach", "record", "replay"):
            assert mode in str(info.value)
    for kwargs in ({"attention": "record"}, {"attention": "replay", "norms": "off"}):
        with pytest.raises(ValueError, match="need a Recording"), setup.rm.freezer.frozen(**kwargs):
            pass


def test_replay_without_a_recorded_layer_is_refused(setup: Setup):
    with (
        torch.no_grad(),
        frozen(setup.rm, "replay", Recording()),
        pytest.raises(RuntimeError, match="replay needs a recording"),
    ):
        setup.base(IDS)


def test_several_replacement_models_share_the_wrapping_of_the_model(setup: Setup):
    other = ReplacementModel(setup.model, build_transcoders("clt", n_layers=2, d_model=32))
    assert other.freezer is setup.rm.freezer
    other.close()  # not the last user: the model stays wrapped for setup.rm
    assert setup.model.config._attn_implementation.startswith("tracer_frozen_")
    state = setup.rm.run_prompt(IDS[0], zero_bos=False)
    assert len(state.recording.patterns) == setup.rm.n_layers
    with torch.no_grad():
        logits = setup.model(IDS).logits
    torch.testing.assert_close(logits, setup.logits_before, rtol=0, atol=1e-12)


def test_run_prompt_records_every_layer_and_norm_into_its_state(setup: Setup):
    """The forward runs in the calling thread's context (NNSight runs only the trace body in a
    worker greenlet): every attention layer and frozen norm of the pass reaches the recording."""
    rm = setup.rm
    state = rm.run_prompt(IDS[0], zero_bos=False)
    n, heads = IDS.shape[1], setup.model.config.num_attention_heads
    assert sorted(state.recording.patterns) == list(range(rm.n_layers))
    for pattern in state.recording.patterns.values():
        assert pattern.shape == (1, heads, n, n)
    n_norms = rm.n_layers * len(rm.family.residual_norms) + 1
    assert len(state.recording.scales) == n_norms
    assert rm.family.final_norm in state.recording.scales
    for scale in state.recording.scales.values():
        assert scale.shape == (1, n, 1)


def test_a_state_replays_its_own_prompt_after_another_was_recorded(setup: Setup):
    """Patterns and scales belong to the state that recorded them: recording another prompt of
    the same length in between changes nothing of the first state's replays."""
    rm = setup.rm
    first = rm.run_prompt(IDS[0], zero_bos=False)
    alone = rm.linear_forward(first, 1).final_hidden[0].detach()
    alone_direct = direct_run(rm, first, [[]]).final_hidden[0]
    second = rm.run_prompt(OTHER_IDS[0], zero_bos=False)
    assert (second.final_hidden - first.final_hidden).abs().max() > 1e-3
    after = rm.linear_forward(first, 1).final_hidden[0].detach()
    direct = direct_run(rm, first, [[]]).final_hidden[0]
    assert torch.equal(after, alone) and torch.equal(direct, alone_direct)
    torch.testing.assert_close(after, first.final_hidden, rtol=0, atol=1e-10)
    torch.testing.assert_close(direct, first.final_hidden, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        rm.linear_forward(second, 1).final_hidden[0].detach(),
        second.final_hidden,
        rtol=0,
        atol=1e-10,
    )


def test_freezing_is_set_for_the_calling_thread_only(setup: Setup):
    """A plain call of the model in another thread runs unfrozen while this thread replays."""
    recording = Recording()
    with torch.no_grad():
        with frozen(setup.rm, "record", recording):
            setup.base(IDS)
        plain = setup.base(OTHER_IDS).last_hidden_state
        seen = {}
        with frozen(setup.rm, "replay", recording):
            replayed = setup.base(OTHER_IDS).last_hidden_state

            def other_thread() -> None:
                with torch.no_grad():
                    seen["hidden"] = setup.base(OTHER_IDS).last_hidden_state

            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
    assert torch.equal(seen["hidden"], plain)
    assert (replayed - plain).abs().max() > 1e-3


def test_nothing_of_a_prompt_stays_alive_after_attribute(setup: Setup, monkeypatch):
    """No pattern, norm scale or other tensor of the prompt's state is held by the model, its
    freezer or NNSight once attribute() has returned."""
    rm, alive = setup.rm, []
    run_prompt = rm.run_prompt

    def spy(*args, **kwargs):
        state = run_prompt(*args, **kwargs)
        held = [*state.recording.patterns.values(), *state.recording.scales.values()]
        held += [state.embeddings, state.final_hidden, *state.reads, *state.mlp_outputs]
        alive.extend(weakref.ref(t) for t in held)
        return state

    monkeypatch.setattr(rm, "run_prompt", spy)
    graph = attribute(IDS[0].tolist(), rm, progress=False, batch_size=8)
    gc.collect()
    assert graph.adjacency_matrix.shape[0] > 0
    assert len(alive) > 2 * rm.n_layers
    assert [ref for ref in alive if ref() is not None] == []


def test_model_frozen_elsewhere_is_refused(setup: Setup):
    name = setup.model.config._attn_implementation
    assert name.startswith("tracer_frozen_")
    fresh = build_model(setup.rm.family.name).to(torch.float64)
    fresh.set_attn_implementation(name)
    with pytest.raises(RuntimeError, match="fresh copy"):
        Freezer.install(fresh, setup.rm.family)
