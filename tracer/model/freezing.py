"""Freeze attention patterns and norm scales, for gradients or for values.

Modes per component:
- "off":    the model runs as usual (our recomputed norms are value-identical up to rounding);
- "detach": values as usual, but no gradient flows through the pattern or the norm scale
            (the residual stream becomes linear in its sources);
- "record": values as usual, and the pass's attention patterns and norm scales are written into
            the `Recording` it was given (the prompt's: `PromptState.recording`);
- "replay": the patterns and norm scales of a given `Recording` are used whatever the input is
            (attribution's linear pass and direct-effect interventions: the frozen model run
            forward). On a longer input (generation) only the recorded prompt positions are frozen.

What is installed on a model (`Freezer.install`, undone by `Freezer.uninstall`) holds nothing of
any prompt. The modes and the recording belong to a pass: `Freezer.frozen(...)` sets them in a
`contextvars.ContextVar` for the code it wraps, so passes in two threads (each thread has its own
context) see their own, and a plain call of the model outside such a block runs unfrozen. NNSight
0.8 runs the model's forward in the thread and greenlet that enters the trace, while the trace
body runs in a worker greenlet whose context is empty: set the freezing *around* a trace, never
inside its body.

Attention goes through a function registered with transformers' `AttentionInterface` (once per
original implementation, process-wide; it keeps no data). The pattern is read off the family's
*own* implementation by passing it an identity matrix as the values (output = pattern @ I), so
RoPE, grouped-query attention, q/k norms, soft-caps and sliding windows stay the family's own; the
frozen output is then `pattern @ values`, which saves for backward only the (heads, n_pos, n_pos)
pattern instead of the family kernel's batch-sized buffers. The matching mask function is
registered under the same name, or the model would silently run with no causal mask. Norms are
frozen by replacing their forward with one whose scale is frozen; it computes in float32 or wider
(transformers' RMSNorms always use float32, so float64 models differ from their unmodified selves
by float32 rounding there).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tracer.model.families import Family, get_module, norm_eps, normalize_wide

MODES = ("off", "detach", "record", "replay")
PREFIX = "tracer_frozen_"


@dataclass
class Recording:
    """Attention patterns and norm scales of one prompt: a "record" pass writes them, "replay"
    passes read them. It belongs to the prompt's state, never to the model."""

    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (1, heads, n, n)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm path -> (1, n, 1)

    def prefix(self, n: int) -> Recording:
        """The recording of the prompt's first `n` positions (views, no copies): patterns are
        causal, so those of a prefix are the top-left corners of the prompt's."""
        return Recording(
            patterns={layer: p[..., :n, :n] for layer, p in self.patterns.items()},
            scales={name: s[..., :n, :] for name, s in self.scales.items()},
        )


@dataclass(frozen=True)
class _Pass:
    """The freezing of the passes that run inside one `Freezer.frozen` block."""

    freezer: Freezer
    attention: str
    norms: str
    recording: Recording | None


# per context (so per thread): the freezing of the pass running there; None = everything off
_PASS: ContextVar[_Pass | None] = ContextVar("tracer_freezing", default=None)


def _family_attention(module: torch.nn.Module, original: str) -> Callable:
    """The attention function `module` runs without freezing (`original` implementation)."""
    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


@torch.no_grad()
def _pattern(inner, module, query, key, attention_mask, kwargs) -> torch.Tensor:
    """(batch, heads, q_len, k_len) softmax pattern computed by the family's own function."""
    batch, kv_heads, k_len = key.shape[0], key.shape[1], key.shape[2]
    eye = torch.eye(k_len, dtype=query.dtype, device=query.device).expand(
        batch, kv_heads, k_len, k_len
    )
    out, _ = inner(module, query, key, eye, attention_mask, **kwargs)
    return out.transpose(1, 2)  # (batch, q_len, heads, k_len) -> (batch, heads, q_len, k_len)


def _apply_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """pattern (1 or B, heads, q, k) @ values (B, kv_heads, k, d) -> (B, q, heads, d)."""
    groups = pattern.shape[1] // value.shape[1]
    if groups > 1:
        value = value.repeat_interleave(groups, dim=1)
    if pattern.shape[0] == 1:
        return torch.einsum("hqk,bhkd->bqhd", pattern[0].to(value.dtype), value)
    return torch.einsum("bhqk,bhkd->bqhd", pattern.to(value.dtype), value)


def _frozen_attention(original: str) -> Callable:
    """The attention function registered for models whose own implementation is `original`."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _family_attention(module, original)
        current = _PASS.get()
        mode = "off" if current is None else current.attention
        if mode == "off":
            return inner(module, query, key, value, attention_mask, **kwargs)
        if mode == "detach":
            pattern = _pattern(inner, module, query, key, attention_mask, kwargs)
            return _apply_pattern(pattern, value), None
        layer = current.freezer.attention_layer(module)
        if mode == "record":
            pattern = _pattern(inner, module, query, key, attention_mask, kwargs)
            current.recording.patterns[layer] = pattern
            return inner(module, query, key, value, attention_mask, **kwargs)
        recorded = current.recording.patterns.get(layer)
        pattern = _replayed(recorded, key.shape[-2], f"attention of layer {layer}")
        if pattern.shape[-1] < key.shape[-2]:  # generation: positions after the prompt are live
            live = _pattern(inner, module, query, key, attention_mask, kwargs)
            n = pattern.shape[-1]
            live[:, :, :n, :n] = pattern.to(live.dtype)
            pattern = live
        return _apply_pattern(pattern, value), None

    return attention


def _replayed(recorded: torch.Tensor | None, length: int, what: str) -> torch.Tensor:
    """A recorded (.., n_recorded, ..) tensor for a sequence of `length` >= n_recorded positions."""
    if recorded is None:
        raise RuntimeError(
            f"{what}: replay needs a recording of the prompt (ReplacementModel.run_prompt)"
        )
    if recorded.shape[-2] > length:
        raise RuntimeError(
            f"{what}: replay recorded {recorded.shape[-2]} positions but the input has {length}"
        )
    return recorded


def _implementation_name(original: str) -> str:
    name = f"{PREFIX}{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:  # a one-time registration per implementation
        AttentionInterface.register(name, _frozen_attention(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _frozen_norm_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output with its scale frozen per the current pass, in the input's dtype.

    Replaces the module's forward (not a hook), so the original computation never runs and
    nothing batch-sized is kept for the backward pass but what the frozen formula needs. Bound
    to the module as a method, so that a deep copy of the model (NNSight's controller included)
    binds it to the copy.
    """
    current = _PASS.get()
    mode = "off" if current is None else current.norms
    if mode == "off":
        return type(module).forward(module, x)
    style = current.freezer.family.norm_style
    recorded = None
    if mode == "replay":  # on a longer input (generation) the positions past it run live
        name = current.freezer.norm_name(module)
        recorded = _replayed(current.recording.scales.get(name), x.shape[-2], f"norm {name}")
    # float32 or wider: the weight is applied at that precision
    normed, scale = normalize_wide(x, style, norm_eps(module), recorded)
    if mode == "record":
        current.recording.scales[current.freezer.norm_name(module)] = scale
    if style == "layernorm":
        out = normed * module.weight.to(normed.dtype)
        if module.bias is not None:
            out = out + module.bias.to(normed.dtype)
        return out.to(x.dtype)
    if style == "rms_one_plus":
        return (normed * (1.0 + module.weight.to(normed.dtype))).to(x.dtype)
    return module.weight * normed.to(x.dtype)


@dataclass(eq=False)
class Freezer:
    """Attention/norm freezing installed on one model; passes choose their modes with `frozen`.

    Holds only what is fixed per model (which module is which layer or norm, what to restore);
    the patterns and scales of a prompt live in that prompt's `Recording`.
    """

    family: Family
    model: torch.nn.Module  # the *ForCausalLM model
    original: str  # the model's attention implementation before install
    _attention_layers: dict[torch.nn.Module, int] = field(default_factory=dict)
    _norm_names: dict[torch.nn.Module, str] = field(default_factory=dict)

    @classmethod
    def install(cls, model: torch.nn.Module, family: Family) -> Freezer:
        """Route the model's attention and residual/final norms through the freezing functions.

        Changes the model (its attention implementation and the forwards of those norms) until
        `uninstall`; with no `frozen` block active it computes what it computed before.
        """
        original = model.config._attn_implementation
        if original.startswith(PREFIX):
            raise RuntimeError("model has tracer freezing from elsewhere; load a fresh copy")
        freezer = cls(family=family, model=model, original=original)
        base = get_module(model, family.base)
        for i, layer in enumerate(get_module(base, family.layers)):
            freezer._attention_layers[get_module(layer, family.attention)] = i
            for name in family.residual_norms:
                freezer._norm_names[get_module(layer, name)] = f"{family.layers}.{i}.{name}"
        freezer._norm_names[get_module(base, family.final_norm)] = family.final_norm
        for module, name in freezer._norm_names.items():
            if "forward" in vars(module):  # a wrapper's: freezing would bypass or double it
                raise RuntimeError(
                    f"norm {name} has a forward of its own; tracer needs plain norms"
                )
        for module in freezer._norm_names:
            module.forward = types.MethodType(_frozen_norm_forward, module)
        model.set_attn_implementation(_implementation_name(original))
        return freezer

    def uninstall(self) -> None:
        """Give the model back its own attention implementation and norm forwards."""
        for module in self._norm_names:
            vars(module).pop("forward", None)
        self.model.set_attn_implementation(self.original)

    def attention_layer(self, module: torch.nn.Module) -> int:
        """The layer index of an attention module of this model."""
        if module not in self._attention_layers:
            raise RuntimeError("a frozen pass of one model ran the attention of another")
        return self._attention_layers[module]

    def norm_name(self, module: torch.nn.Module) -> str:
        """The path (from the decoder stack) of a frozen norm of this model."""
        if module not in self._norm_names:
            raise RuntimeError("a frozen pass of one model ran a norm of another")
        return self._norm_names[module]

    @contextlib.contextmanager
    def frozen(
        self,
        attention: str = "off",
        norms: str | None = None,
        recording: Recording | None = None,
    ) -> Iterator[None]:
        """Passes of the model inside this block, in this thread only, freeze per the modes.

        `norms` defaults to `attention`. "record" writes into `recording`, "replay" reads it.
        """
        norms = attention if norms is None else norms
        for mode in (attention, norms):
            if mode not in MODES:
                raise ValueError(f"freezing mode must be one of {MODES}, got {mode!r}")
        if recording is None and {"record", "replay"} & {attention, norms}:
            raise ValueError(f"modes {attention!r}/{norms!r} need a Recording, got none")
        token = _PASS.set(_Pass(self, attention, norms, recording))
        try:
            yield
        finally:
            _PASS.reset(token)
