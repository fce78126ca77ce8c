"""ReplacementModel.close() gives the user's model back exactly as it was (tracer.model.wrapping).

The reference is an untouched deep copy taken before wrapping: after close() the wrapped model
must match it in its outputs (bitwise), its attention implementation, every module's instance
attributes (no NNSight controller, no frozen norm forward, the same training flags), hooks and
`requires_grad` flags.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.interventions.intervene import FeatureChange, intervene
from tracer.interventions.modes import MODES
from tracer.model.replacement import ReplacementModel
from tracer.testing import ALL_FIXTURE_FAMILIES, build_model, build_transcoders

IDS = torch.tensor([[0, 5, 9, 17, 3, 22, 41, 8]])
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def user_model(family: str) -> torch.nn.Module:
    """A model as a user may hand it over: training mode, some parameters trainable, some not."""
    model = build_model(family).train()
    for i, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(i % 3 != 0)
    return model


def assert_same_model(model: torch.nn.Module, untouched: torch.nn.Module) -> None:
    assert model.config._attn_implementation == untouched.config._attn_implementation
    assert model.config.to_dict() == untouched.config.to_dict()
    modules = list(model.named_modules())
    reference = list(untouched.named_modules())
    assert [name for name, _ in modules] == [name for name, _ in reference]
    for (name, module), (_, other) in zip(modules, reference, strict=True):
        assert vars(module).keys() == vars(other).keys(), name
        assert module.training == other.training, name
        assert "forward" not in vars(module), name
        for hooks in HOOK_DICTS:
            assert len(getattr(module, hooks)) == len(getattr(other, hooks)), (name, hooks)
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    assert grads == [(n, p.requires_grad) for n, p in untouched.named_parameters()]
    state, expected = model.state_dict(), untouched.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    for training in (True, False):  # in training mode, the same dropout masks from the same seed
        model.train(training), untouched.train(training)
        with torch.no_grad():
            torch.manual_seed(0)
            logits = model(IDS).logits
            torch.manual_seed(0)
            assert torch.equal(logits, untouched(IDS).logits)
    model.train(), untouched.train()


@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_close_restores_the_model_exactly(family: str):
    model = user_model(family)
    untouched = copy.deepcopy(model)
    rm = ReplacementModel(model, build_transcoders("plt-skip", n_layers=2, d_model=32))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    attribute(IDS[0].tolist(), rm, progress=False, batch_size=8)
    change = [FeatureChange(1, 3, 0, scale=0.0)]
    for mode in MODES:
        intervene(rm, IDS[0], change, mode=mode)
    rm.close()
    assert rm.closed
    assert_same_model(model, untouched)
    rm.close()  # idempotent


def test_a_closed_replacement_model_refuses_to_run():
    with ReplacementModel(
        build_model("gpt2"), build_transcoders("clt", n_layers=2, d_model=32)
    ) as rm:
        attribute(IDS[0].tolist(), rm, progress=False)
    assert rm.closed
    for run in (
        lambda: attribute(IDS[0].tolist(), rm, progress=False),
        lambda: rm.run_prompt(IDS[0]),
        lambda: intervene(rm, IDS[0], [FeatureChange(1, 3, 0, value=0.0)]),
        lambda: rm.envoy,
    ):
        with pytest.raises(RuntimeError, match="closed .* make a new ReplacementModel"):
            run()


def test_the_last_of_several_replacement_models_restores_the_model():
    model = user_model("llama")
    untouched = copy.deepcopy(model)
    first = ReplacementModel(model, build_transcoders("plt-relu", n_layers=2, d_model=32))
    with ReplacementModel(model, build_transcoders("clt", n_layers=2, d_model=32)) as second:
        assert second.freezer is first.freezer
        expected = attribute(IDS[0].tolist(), first, progress=False).adjacency_matrix
    # the second one closed; the first still traces with its freezing intact
    assert torch.equal(attribute(IDS[0].tolist(), first, progress=False).adjacency_matrix, expected)
    first.close()
    assert_same_model(model, untouched)
    # and the model can be wrapped again
    with ReplacementModel(model, build_transcoders("clt", n_layers=2, d_model=32)) as again:
        attribute(IDS[0].tolist(), again, progress=False)
    assert_same_model(model, untouched)


def test_the_callers_transcoder_set_is_not_cast():
    transcoders = build_transcoders("plt-skip", n_layers=2, d_model=32)
    weights = {i: transcoders.layer(i).W_enc for i in range(2)}
    with ReplacementModel(build_model("gpt2").to(torch.float64), transcoders) as rm:
        assert rm.transcoders.dtype == torch.float64
        assert rm.transcoders.layer(0).W_skip.dtype == torch.float64
        attribute(IDS[0].tolist(), rm, progress=False)
    assert transcoders.dtype == torch.float32
    for i, w_enc in weights.items():
        assert transcoders.layer(i).W_enc is w_enc
        assert transcoders.layer(i).W_skip.dtype == torch.float32
    # a set already in the model's dtype is used as it is (offloading then frees its weights)
    with ReplacementModel(build_model("gpt2"), transcoders) as rm:
        assert rm.transcoders is transcoders


def test_a_deep_copy_of_a_wrapped_model_is_its_own():
    """The copy computes with its own weights (norms and NNSight controllers included), can be
    traced by a ReplacementModel of its own, and closing that restores the copy alone."""
    model = user_model("gpt2")
    untouched = copy.deepcopy(model)
    rm = ReplacementModel(model, build_transcoders("clt", n_layers=2, d_model=32))
    twin = copy.deepcopy(model)
    twin_untouched = copy.deepcopy(untouched)
    for changed in (twin, twin_untouched):
        with torch.no_grad():
            changed.transformer.ln_f.weight.mul_(2.0)
    twin_untouched.eval()
    with ReplacementModel(twin, build_transcoders("clt", n_layers=2, d_model=32)) as rm_twin:
        assert rm_twin.freezer is not rm.freezer
        state = rm_twin.run_prompt(IDS[0], zero_bos=False)
    with torch.no_grad():
        expected = twin_untouched.transformer(IDS).last_hidden_state[0]
    torch.testing.assert_close(state.final_hidden, expected, rtol=0, atol=1e-5)
    twin_untouched.train()
    assert_same_model(twin, twin_untouched)
    assert model.config._attn_implementation.startswith("tracer_frozen_")  # still rm's
    rm.run_prompt(IDS[0])
    rm.close()
    assert_same_model(model, untouched)
