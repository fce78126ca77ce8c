"""The family table's claims, checked with torch hooks on *unmodified* Hugging Face models.

Nothing of tracer runs in the forward passes here: the tiny models are plain transformers models,
and each claim of `tracer.model.families` (where the MLP reads and writes, which module feeds layer 0,
which norm is final, how each norm scales) is compared to what the model really computes.
"""

from __future__ import annotations

import pytest
import torch

from tracer.model.families import (
    FAMILIES,
    READ_HOOKS,
    WRITE_HOOKS,
    Family,
    HookPoint,
    family_for,
    get_module,
    hook_point,
    norm_eps,
    normalize,
    text_config,
)
from tracer.testing import ALL_FIXTURE_FAMILIES, build_model

IDS = torch.tensor([[0, 5, 9, 17, 3, 22, 41, 8, 30, 11]])  # longer than gemma2's sliding window
ATOL = 1e-12  # float64; the only rounding is one residual addition

# Where the residual stream receives attention's and the MLP's contribution, from DESIGN.md
# sections 4 and 7 and the transformers sources of the decoder layers (written independently of
# the table): (attention write, MLP read, MLP write).
GEMMA_POINTS = (
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
EXPECTED_POINTS = {
    "gpt2": ("attn", "ln_2", "mlp"),
    "llama": ("self_attn", "post_attention_layernorm", "mlp"),
    "qwen3": ("self_attn", "post_attention_layernorm", "mlp"),
    "gemma2": GEMMA_POINTS,
    "gemma3": GEMMA_POINTS,
    "gemma3_multimodal": GEMMA_POINTS,
    "gpt_oss": ("self_attn", "post_attention_layernorm", "mlp"),  # the whole MoE block
}
# families whose token embedding module multiplies by sqrt(d_model)
SCALED_EMBEDDING = ("gemma2", "gemma3", "gemma3_multimodal")


def first(value):
    return value[0] if isinstance(value, tuple) else value


class Capture:
    """Forward hooks recording inputs and outputs of named modules of one model."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.tuples: dict[str, bool] = {}  # whether the module returned a tuple
        self.handles: list = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            self.inputs[name] = x.detach().clone()
            self.outputs[name] = first(output).detach().clone()
            self.tuples[name] = isinstance(output, tuple)

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


@pytest.fixture(scope="module", params=ALL_FIXTURE_FAMILIES)
def traced(request):
    """(family, model, capture, output) for one forward of IDS through an unmodified model."""
    fam = family(request.param)
    model = build_model(request.param).to(torch.float64)
    base = get_module(model, fam.base)
    layers = get_module(base, fam.layers)
    cap = Capture()
    cap.watch("embed_out", get_module(base, fam.embed_out))
    cap.watch("embed_tokens", get_module(base, fam.embed_tokens))
    cap.watch("final_norm", get_module(base, fam.final_norm))
    for i, layer in enumerate(layers):
        cap.watch(f"{i}.layer", layer)
        for attr in ("pre_mlp_norm", "mlp", "mlp_write", *fam.residual_norms):
            name = getattr(fam, attr, attr)
            cap.watch(f"{i}.{name}", get_module(layer, name))
        for name in EXPECTED_POINTS[fam.name]:
            cap.watch(f"{i}.{name}", get_module(layer, name))
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
    cap.remove()
    return fam, model, cap, out


def test_family_matches_fixture_model_type(traced):
    fam, model, _, _ = traced
    assert family_for(model.config.model_type) is fam


def n_layers(model) -> int:
    return text_config(model.config).num_hidden_layers


def test_pre_mlp_norm_output_is_mlp_input(traced):
    fam, model, cap, _ = traced
    for i in range(n_layers(model)):
        assert torch.equal(cap.outputs[f"{i}.{fam.pre_mlp_norm}"], cap.inputs[f"{i}.{fam.mlp}"])


def test_pre_mlp_norm_input_is_residual_after_attention(traced):
    fam, model, cap, _ = traced
    attn_write, _, _ = EXPECTED_POINTS[fam.name]
    for i in range(n_layers(model)):
        resid_mid = cap.inputs[f"{i}.layer"] + cap.outputs[f"{i}.{attn_write}"]
        torch.testing.assert_close(
            cap.inputs[f"{i}.{fam.pre_mlp_norm}"], resid_mid, rtol=0, atol=ATOL
        )


def test_mlp_write_output_is_what_the_mlp_block_adds(traced):
    """The write module's output (its first element for a block returning a tuple, as GPT-OSS's
    mixture of experts returns its router scores too) is what the block adds."""
    fam, model, cap, _ = traced
    for i in range(n_layers(model)):
        added = cap.outputs[f"{i}.layer"] - cap.inputs[f"{i}.{fam.pre_mlp_norm}"]
        torch.testing.assert_close(cap.outputs[f"{i}.{fam.mlp_write}"], added, rtol=0, atol=ATOL)
        assert added.abs().max() > 1e-3  # the MLP contributes something
        assert cap.tuples[f"{i}.{fam.mlp}"] is fam.mlp_returns_tuple


def test_embed_out_output_enters_layer_zero(traced):
    fam, _, cap, out = traced
    assert torch.equal(cap.outputs["embed_out"], cap.inputs["0.layer"])
    assert torch.equal(cap.outputs["embed_out"], out.hidden_states[0])


def test_embed_tokens_output_is_the_token_embedding_alone(traced):
    """Token nodes write `embed_tokens`' output: the embedding row of each token (Gemma-2 and -3:
    times sqrt(d_model), the scale their residual stream receives); what else enters layer 0 is
    GPT-2's learned position embedding, and nothing for the others."""
    fam, model, cap, _ = traced
    rows = model.get_input_embeddings().weight[IDS]  # (1, n_pos, d_model)
    rtol = 0.0
    if fam.name in SCALED_EMBEDDING:  # a float32 buffer: sqrt(d_model) to float32 precision
        rows, rtol = rows * text_config(model.config).hidden_size ** 0.5, 1e-7
    torch.testing.assert_close(cap.outputs["embed_tokens"], rows, rtol=rtol, atol=ATOL)
    rest = cap.outputs["embed_out"] - cap.outputs["embed_tokens"]
    if fam.name == "gpt2":
        positions = model.transformer.wpe.weight[: IDS.shape[1]]
        torch.testing.assert_close(rest[0], positions, rtol=0, atol=ATOL)
        assert positions.abs().max() > 1e-3  # a real difference between the two points
    else:
        assert torch.equal(rest, torch.zeros_like(rest))


def test_final_norm_output_is_last_hidden_state(traced):
    fam, model, cap, out = traced
    assert torch.equal(cap.outputs["final_norm"], out.hidden_states[-1])
    n = n_layers(model)
    assert torch.equal(cap.inputs["final_norm"], cap.outputs[f"{n - 1}.layer"])
    with torch.no_grad():
        last = get_module(model, fam.base)(IDS).last_hidden_state
    assert torch.equal(cap.outputs["final_norm"], last)


def test_logits_are_unembedded_final_norm_output(traced):
    fam, model, cap, out = traced
    unembed = model.get_output_embeddings().weight  # (vocab, d_model)
    logits = torch.einsum("bnd,vd->bnv", cap.outputs["final_norm"], unembed)
    if fam.final_softcap_attr:
        cap_value = getattr(text_config(model.config), fam.final_softcap_attr)
        assert cap_value  # the gemma fixtures have a soft-cap: the branch is exercised
        logits = torch.tanh(logits / cap_value) * cap_value
    if fam.name == "gemma3_multimodal":  # configured, but its forward never applies it
        assert text_config(model.config).final_logit_softcapping
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=ATOL)


def reference_norm(style: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
    assert eps is not None
    if style == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        var = centred.pow(2).mean(-1, keepdim=True)
        return centred / torch.sqrt(var + eps) * module.weight + module.bias
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1 + module.weight if style == "rms_one_plus" else module.weight)


def test_norm_style_matches_every_residual_and_final_norm(traced):
    fam, model, cap, _ = traced
    base = get_module(model, fam.base)
    layers = get_module(base, fam.layers)
    checked = [("final_norm", get_module(base, fam.final_norm))]
    for i, layer in enumerate(layers):
        checked += [(f"{i}.{name}", get_module(layer, name)) for name in fam.residual_norms]
    # transformers' RMSNorms compute in float32 whatever the input dtype; LayerNorm stays float64
    atol = 1e-12 if fam.norm_style == "layernorm" else 1e-5
    for key, module in checked:
        expected = reference_norm(fam.norm_style, module, cap.inputs[key])
        torch.testing.assert_close(cap.outputs[key], expected, rtol=0, atol=atol)


# ---- hook names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FIXTURE_FAMILIES)
@pytest.mark.parametrize("prefix", ["", "blocks.3."])
def test_hook_point_maps_transformer_lens_names(name: str, prefix: str):
    """TransformerLens's meaning (DESIGN.md section 4): resid_mid is the pre-MLP norm's input,
    ln2.hook_normalized that input normalised before the norm's weight, mlp.hook_in the norm's
    output (the MLP input)."""
    fam = family(name)
    _, pre_mlp_norm, mlp_write = EXPECTED_POINTS[name]
    read = dict(write=False)
    assert hook_point(fam, prefix + "hook_resid_mid", **read) == HookPoint(pre_mlp_norm, "input")
    assert hook_point(fam, prefix + "ln2.hook_normalized", **read) == HookPoint(
        pre_mlp_norm, "input", normalized=True
    )
    assert hook_point(fam, prefix + "mlp.hook_in", **read) == HookPoint("mlp", "input")
    for hook in ("hook_mlp_out", "mlp.hook_out"):
        assert hook_point(fam, prefix + hook, write=True) == HookPoint(mlp_write, "output")


def hand_normalized(style: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """TransformerLens's hook_normalized, written out: x / scale before the weight."""
    if style == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_normalize_is_the_pre_mlp_norm_before_its_weight(traced):
    """`normalize` of resid_mid is the pre-MLP norm's input divided by its scale, and the real
    norm's output is that times its weight (plus LayerNorm's bias; Gemma's weight is 1 + w)."""
    fam, model, cap, _ = traced
    layers = get_module(get_module(model, fam.base), fam.layers)
    atol = 1e-12 if fam.norm_style == "layernorm" else 1e-5  # transformers' RMSNorm: float32
    for i, layer in enumerate(layers):
        norm = get_module(layer, fam.pre_mlp_norm)
        x = cap.inputs[f"{i}.{fam.pre_mlp_norm}"]
        expected = hand_normalized(fam.norm_style, x, norm_eps(norm))
        got, scale = normalize(x, fam.norm_style, norm_eps(norm))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        assert scale.shape == (*x.shape[:-1], 1)
        weight = 1 + norm.weight if fam.norm_style == "rms_one_plus" else norm.weight
        bias = norm.bias if fam.norm_style == "layernorm" else 0
        out = cap.outputs[f"{i}.{fam.pre_mlp_norm}"]
        torch.testing.assert_close(out, expected * weight + bias, rtol=0, atol=atol)
        assert (out - expected).abs().max() > 0.05  # the weight is not the identity


def test_normalize_uses_a_given_scale_on_the_first_positions():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    live, scale = normalize(x, "layernorm", 1e-5)
    frozen = torch.full((3, 1), 2.0, dtype=torch.float64)
    got, used = normalize(x, "layernorm", 1e-5, frozen)
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(got[:, :3], 2.0 * centred[:, :3], rtol=0, atol=1e-15)
    torch.testing.assert_close(got[:, 3:], live[:, 3:], rtol=0, atol=0)
    assert torch.equal(used[:, 3:], scale[:, 3:])
    with pytest.raises(ValueError, match="6 positions for an input of 5"):
        normalize(x, "rms", 1e-5, torch.ones(6, 1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("hook", "write", "valid"),
    [
        ("hook_resid_pre", False, READ_HOOKS),
        ("blocks.0.hook_attn_out", True, WRITE_HOOKS),
        ("hook_mlp_out", False, READ_HOOKS),  # a write point used as a read point
        ("blocks.2.mlp.hook_in", True, WRITE_HOOKS),  # a read point used as a write point
        ("hook_resid_mid", True, WRITE_HOOKS),
    ],
)
def test_hook_point_rejects_unknown_or_wrong_direction_names(hook, write, valid):
    with pytest.raises(ValueError) as info:
        hook_point(family("gpt2"), hook, write=write)
    message = str(info.value)
    assert repr(hook) in message
    assert ("feature_output_hook" if write else "feature_input_hook") in message
    for name in valid:
        assert name in message
    assert set(READ_HOOKS) | set(WRITE_HOOKS) == {
        "hook_resid_mid",
        "ln2.hook_normalized",
        "mlp.hook_in",
        "hook_mlp_out",
        "mlp.hook_out",
    }


def test_family_for_rejects_unknown_model_type_naming_supported_ones():
    with pytest.raises(ValueError) as info:
        family_for("mamba")
    message = str(info.value)
    assert "'mamba'" in message
    for model_type in ("gpt2", "llama", "qwen3", "gemma2", "gemma3_text", "gemma3", "gpt_oss"):
        assert model_type in message


def test_every_family_has_a_fixture_and_a_cli_choice():
    """The family table, the fixture builder and `tracer fixture --family` name the same
    families, so every family runs through the per-family tests above."""
    from tracer.cli.parser import build_parser

    assert {f.name for f in FAMILIES} == set(ALL_FIXTURE_FAMILIES)
    fixture = build_parser()._subparsers._group_actions[0].choices["fixture"]
    (family_option,) = [a for a in fixture._actions if "--family" in a.option_strings]
    assert set(family_option.choices) == set(ALL_FIXTURE_FAMILIES)
