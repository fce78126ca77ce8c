"""Model families: where each family's MLP reads and writes, which norms sit on the residual path.

This is the one table of per-family quirks. Module paths are relative to the decoder stack (the
`base` attribute of the causal-LM wrapper: `transformer` for GPT-2, `model` for the others) and to one
decoder layer. Transcoder configs name their read/write points with TransformerLens hook names;
`hook_point` maps those onto this table, with TransformerLens's meaning (models loaded with
`fold_ln=False`, as the reference does): `ln2.hook_normalized` is the pre-MLP norm's input
normalised *before* its weight (and LayerNorm's bias), which no Hugging Face module outputs, so it
is a read point with a transform (`normalized`).

Token nodes write the token embedding only (`embed_tokens`): GPT-2's learned position embedding is
added to the residual stream like a bias, a constant of the replacement model (the reference does
the same). Gemma-2's and Gemma-3's `embed_tokens` already multiply by sqrt(d_model), so its output
is what enters the residual stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

NORM_STYLES = ("layernorm", "rms", "rms_one_plus")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base: str  # decoder stack attribute on the *ForCausalLM model
    layers: str  # ModuleList of decoder layers, on the base
    embed_out: str  # module on the base whose output is the residual stream entering layer 0
    embed_tokens: str  # module on the base whose output is the token embedding (token nodes)
    final_norm: str  # on the base
    attention: str  # on a layer
    mlp: str  # on a layer
    pre_mlp_norm: str  # on a layer: its input is resid_mid, its output the MLP input
    mlp_write: str  # on a layer: its output is what the MLP block adds to the residual stream
    residual_norms: tuple[
        str, ...
    ]  # on a layer: norms on the linear path (frozen); not inside the MLP
    norm_style: (
        str  # "layernorm" (mean and scale), "rms" (w * x/rms), "rms_one_plus" ((1 + w) * x/rms)
    )
    final_softcap_attr: str | None = None  # config attribute of a final logit soft-cap
    attn_implementation: str | None = None  # implementation the family must run with
    # the MLP block returns a tuple whose first element is its write (GPT-OSS: router scores too)
    mlp_returns_tuple: bool = False

    def __post_init__(self) -> None:
        assert self.norm_style in NORM_STYLES, self.norm_style


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    base="transformer",
    layers="h",
    embed_out="drop",  # wte + wpe, after (inactive) dropout
    embed_tokens="wte",  # wpe is a constant of the replacement model, like a bias
    final_norm="ln_f",
    attention="attn",
    mlp="mlp",
    pre_mlp_norm="ln_2",
    mlp_write="mlp",
    residual_norms=("ln_1", "ln_2"),
    norm_style="layernorm",
)

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    base="model",
    layers="layers",
    embed_out="embed_tokens",
    embed_tokens="embed_tokens",
    final_norm="norm",
    attention="self_attn",
    mlp="mlp",
    pre_mlp_norm="post_attention_layernorm",
    mlp_write="mlp",
    residual_norms=("input_layernorm", "post_attention_layernorm"),
    norm_style="rms",
)

# Qwen-3 differs from Llama by q/k norms inside attention; they only shape the (frozen) pattern.
QWEN3 = Family(**{**LLAMA.__dict__, "name": "qwen3", "model_types": ("qwen3",)})

# Gemma-2: four norms per block with (1 + w) scaling, embedding scaled by sqrt(d_model) inside
# embed_tokens, attention soft-cap (eager only), final logit soft-cap. The MLP writes through
# post_feedforward_layernorm, which belongs to the replaced MLP block and is not frozen.
GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2",),
    base="model",
    layers="layers",
    embed_out="embed_tokens",
    embed_tokens="embed_tokens",
    final_norm="norm",
    attention="self_attn",
    mlp="mlp",
    pre_mlp_norm="pre_feedforward_layernorm",
    mlp_write="post_feedforward_layernorm",
    residual_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"),
    norm_style="rms_one_plus",
    final_softcap_attr="final_logit_softcapping",
    attn_implementation="eager",
)

# Gemma-3 (`Gemma3ForCausalLM`, model type gemma3_text): Gemma-2's block layout (four norms,
# (1 + w) scaling, post_feedforward_layernorm as the MLP's write) with q/k norms inside attention
# (they only shape the frozen pattern), sliding-window layers with their own RoPE, and the
# sqrt(d_model) scale in embed_tokens (a scaled embedding module). No attention soft-cap, so the
# default (sdpa) attention serves; the final logit soft-cap is honoured when configured.
GEMMA3 = Family(
    **{
        **GEMMA2.__dict__,
        "name": "gemma3",
        "model_types": ("gemma3_text",),
        "attn_implementation": None,
    }
)

# The text model of `Gemma3ForConditionalGeneration` (model type gemma3): the same decoder stack
# under model.language_model; the vision tower never runs on text prompts. Its forward applies
# no final logit soft-cap, whatever the text config says.
GEMMA3_MULTIMODAL = Family(
    **{
        **GEMMA3.__dict__,
        "name": "gemma3_multimodal",
        "model_types": ("gemma3",),
        "base": "model.language_model",
        "final_softcap_attr": None,
    }
)

# GPT-OSS: Llama's block layout with a mixture-of-experts MLP block (router + experts) returning
# (output, router scores). A transcoder replaces the whole block's output; the router belongs to
# the frozen MLP, so the error node absorbs its effect. Attention sinks drop out of the softmax
# pattern, which the frozen attention reads off the family's eager function.
GPT_OSS = Family(
    **{
        **LLAMA.__dict__,
        "name": "gpt_oss",
        "model_types": ("gpt_oss",),
        "attn_implementation": "eager",
        "mlp_returns_tuple": True,
    }
)

FAMILIES = (GPT2, LLAMA, QWEN3, GEMMA2, GEMMA3, GEMMA3_MULTIMODAL, GPT_OSS)


def family_for(model_type: str) -> Family:
    """The family entry for a transformers `config.model_type`."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model type {model_type!r}; supported: {supported}")


@dataclass(frozen=True)
class HookPoint:
    """A TransformerLens hook resolved for one family: a module of a decoder layer, its input or
    output, and for `normalized` the (norm) module's input normalised before its weight."""

    module: str  # on a layer
    side: str  # "input" | "output"
    normalized: bool = False


# TransformerLens hook names used by published transcoder sets -> (family attribute, side, normalized)
_HOOKS = {
    "hook_resid_mid": ("pre_mlp_norm", "input", False),  # the norm's input, un-normalised
    "ln2.hook_normalized": ("pre_mlp_norm", "input", True),  # x / scale, before the weight
    "mlp.hook_in": ("mlp", "input", False),  # the norm's output
    "hook_mlp_out": ("mlp_write", "output", False),
    "mlp.hook_out": ("mlp_write", "output", False),
}
READ_HOOKS = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in")
WRITE_HOOKS = ("hook_mlp_out", "mlp.hook_out")


def check_hook(hook: str, *, write: bool) -> str:
    """The hook's name without a `blocks.{i}.` prefix; a clear error for a name we do not map."""
    prefixed = re.fullmatch(r"blocks\.\d+\.(.+)", hook)
    name = prefixed.group(1) if prefixed else hook
    valid = WRITE_HOOKS if write else READ_HOOKS
    if name not in valid:
        kind = "feature_output_hook" if write else "feature_input_hook"
        raise ValueError(f"{kind} {hook!r} is not supported; valid: {', '.join(valid)}")
    return name


def text_config(config):
    """The decoder stack's config: a multimodal wrapper's text config (Gemma-3), else `config`."""
    return config.get_text_config(decoder=True)


def hook_point(family: Family, hook: str, *, write: bool) -> HookPoint:
    """Map a TransformerLens hook name (optionally `blocks.{i}.`-prefixed) to a point of a layer."""
    attr, side, normalized = _HOOKS[check_hook(hook, write=write)]
    return HookPoint(getattr(family, attr), side, normalized)


def norm_eps(module: torch.nn.Module) -> float:
    """The epsilon of a LayerNorm / RMSNorm module (attribute names differ between families)."""
    for name in ("eps", "variance_epsilon"):
        eps = getattr(module, name, None)
        if eps is not None:
            return eps
    raise ValueError(f"{type(module).__name__} has no eps / variance_epsilon: not a known norm")


def normalize(
    x: torch.Tensor, style: str, eps: float, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm's input normalised before its weight, TransformerLens's `hook_normalized`.

    x (..., n_pos, d_model): `(x - mean) * rsqrt(var + eps)` for LayerNorm, `x * rsqrt(mean(x^2)
    + eps)` for RMSNorm (Gemma's `1 + w` is the weight: not applied). `scale` (n, 1), if given, is
    used at the first n positions (a frozen prompt: linear in x, no gradient through it), the live
    scale elsewhere. Returned in x's dtype, with the scale used (..., n_pos, 1).
    """
    normed, scale = normalize_wide(x, style, eps, scale)
    return normed.to(x.dtype), scale


def normalize_wide(
    x: torch.Tensor, style: str, eps: float, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalize` computed and returned in float32 or wider: the one formula of a norm's scale,
    shared with the frozen norms' forward (tracer.model.freezing), which applies the weight."""
    assert style in NORM_STYLES, style
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if style == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    n_pos = x.shape[-2]
    if scale is not None and scale.shape[-2] > n_pos:
        raise ValueError(f"norm scale of {scale.shape[-2]} positions for an input of {n_pos}")
    if scale is None or scale.shape[-2] < n_pos:
        with torch.no_grad():
            live = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if scale is not None:  # generation: positions after the frozen prompt are live
            live[..., : scale.shape[-2], :] = scale.to(live.dtype)
        scale = live
    return xf * scale.to(xf.dtype), scale


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root
