"""Freeze attention patterns and norm scales, for gradients or for values.

Modes per component:
- "off":    the model runs as usual (our recomputed norms are value-identical up to rounding);
- "detach": values as usual, but no gradient flows through the pattern or the norm scale
            (the residual stream becomes linear in its sources);
- "record": values as usual, and the attention patterns and norm scales of this prompt are stored;
- "replay": the stored patterns and norm scales are used whatever the input is (attribution's
            linear pass and direct-effect interventions: the frozen model run forward). On a
            longer input (generation) only the recorded prompt positions are frozen.

Attention goes through a function registered with transformers' `AttentionInterface`. The pattern
is read off the family's *own* implementation by passing it an identity matrix as the values
(output = pattern @ I), so RoPE, grouped-query attention, q/k norms, soft-caps and sliding windows
stay the family's own; the frozen output is then `pattern @ values`, which saves for backward only
the (heads, n_pos, n_pos) pattern instead of the family kernel's batch-sized buffers. The matching
mask function is registered under the same name, or the model would silently run with no causal
mask. Norms are frozen by replacing their forward with one whose scale is frozen; it computes
in float32 or wider (transformers' RMSNorms always use float32, so float64 models differ from
their unmodified selves by float32 rounding there).
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tracer.model.families import Family, get_module

MODES = ("off", "detach", "record", "replay")

# attention module -> its layer's state; weak so a freed model leaves nothing behind
_ATTENTION_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _AttentionState:
    inner: object  # the family's own attention function
    mode: str = "off"
    pattern: torch.Tensor | None = None  # (1, heads, n_pos, n_pos) recorded


@dataclass
class _NormState:
    style: str
    original: object  # the module's own forward
    mode: str = "off"
    scale: torch.Tensor | None = None  # (1, n_pos, 1) recorded 1/denominator


@torch.no_grad()
def _pattern(state: _AttentionState, module, query, key, attention_mask, kwargs) -> torch.Tensor:
    """(batch, heads, q_len, k_len) softmax pattern computed by the family's own function."""
    batch, kv_heads, k_len = key.shape[0], key.shape[1], key.shape[2]
    eye = torch.eye(k_len, dtype=query.dtype, device=query.device).expand(
        batch, kv_heads, k_len, k_len
    )
    out, _ = state.inner(module, query, key, eye, attention_mask, **kwargs)
    return out.transpose(1, 2)  # (batch, q_len, heads, k_len) -> (batch, heads, q_len, k_len)


def _apply_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """pattern (1 or B, heads, q, k) @ values (B, kv_heads, k, d) -> (B, q, heads, d)."""
    groups = pattern.shape[1] // value.shape[1]
    if groups > 1:
        value = value.repeat_interleave(groups, dim=1)
    if pattern.shape[0] == 1:
        return torch.einsum("hqk,bhkd->bqhd", pattern[0].to(value.dtype), value)
    return torch.einsum("bhqk,bhkd->bqhd", pattern.to(value.dtype), value)


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    state = _ATTENTION_STATE[module]
    if state.mode == "off":
        return state.inner(module, query, key, value, attention_mask, **kwargs)
    if state.mode == "record":
        state.pattern = _pattern(state, module, query, key, attention_mask, kwargs)
        return state.inner(module, query, key, value, attention_mask, **kwargs)
    if state.mode == "detach":
        pattern = _pattern(state, module, query, key, attention_mask, kwargs)
    else:
        pattern = _replayed(state.pattern, key.shape[-2], "attention")
        if pattern.shape[-1] < key.shape[-2]:  # generation: positions after the prompt are live
            live = _pattern(state, module, query, key, attention_mask, kwargs)
            n = pattern.shape[-1]
            live[:, :, :n, :n] = pattern.to(live.dtype)
            pattern = live
    return _apply_pattern(pattern, value), None


def _replayed(recorded: torch.Tensor | None, length: int, what: str) -> torch.Tensor:
    """A recorded (.., n_recorded, ..) tensor for a sequence of `length` >= n_recorded positions."""
    if recorded is None:
        raise RuntimeError(f"{what} replay needs a recorded prompt first")
    if recorded.shape[-2] > length:
        raise RuntimeError(
            f"{what} replay recorded {recorded.shape[-2]} positions but the input has {length}"
        )
    return recorded


def _implementation_name(original: str) -> str:
    name = f"tracer_frozen_{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _frozen_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _frozen_norm_forward(
    module: torch.nn.Module, state: _NormState, x: torch.Tensor
) -> torch.Tensor:
    """The norm's output with its scale frozen per `state.mode`, in the input's dtype.

    Replaces the module's forward (not a hook), so the original computation never runs and
    nothing batch-sized is kept for the backward pass but what the frozen formula needs.
    """
    if state.mode == "off":
        return state.original(x)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = module.variance_epsilon
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if state.style == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    if state.mode == "replay":
        scale = _replayed(state.scale, x.shape[-2], "norm")
        if scale.shape[-2] < x.shape[-2]:  # generation: positions after the prompt are live
            with torch.no_grad():
                live = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            live[..., : scale.shape[-2], :] = scale.to(live.dtype)
            scale = live
    else:
        with torch.no_grad():
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if state.mode == "record":
            state.scale = scale
    normed = xf * scale.to(xf.dtype)
    if state.style == "layernorm":
        out = normed * module.weight.to(xf.dtype)
        if module.bias is not None:
            out = out + module.bias.to(xf.dtype)
        return out.to(x.dtype)
    if state.style == "rms_one_plus":
        return (normed * (1.0 + module.weight.to(xf.dtype))).to(x.dtype)
    return module.weight * normed.to(x.dtype)


@dataclass
class Freezer:
    """Attention/norm freezing installed on one model; switch modes with `set_mode`."""

    family: Family
    model: torch.nn.Module  # the *ForCausalLM model
    _attention: list[_AttentionState] = field(default_factory=list)
    _norms: list[_NormState] = field(default_factory=list)

    @classmethod
    def install(cls, model: torch.nn.Module, family: Family) -> Freezer:
        existing = getattr(model, "_tracer_freezer", None)
        if existing is not None:  # one model, several transcoder sets: share the freezing
            return existing
        freezer = cls(family=family, model=model)
        original = model.config._attn_implementation
        if original.startswith("tracer_frozen_"):
            raise RuntimeError("model has tracer freezing from elsewhere; load a fresh copy")
        base = get_module(model, family.base)
        layers = get_module(base, family.layers)
        module_source = sys.modules[type(get_module(layers[0], family.attention)).__module__]
        inner = (
            module_source.eager_attention_forward
            if original == "eager"
            else ALL_ATTENTION_FUNCTIONS[original]
        )
        for layer in layers:
            state = _AttentionState(inner=inner)
            _ATTENTION_STATE[get_module(layer, family.attention)] = state
            freezer._attention.append(state)
            for name in family.residual_norms:
                freezer._hook_norm(get_module(layer, name))
        freezer._hook_norm(get_module(base, family.final_norm))
        model.set_attn_implementation(_implementation_name(original))
        model._tracer_freezer = freezer
        return freezer

    def _hook_norm(self, module: torch.nn.Module) -> None:
        state = _NormState(style=self.family.norm_style, original=module.forward)
        self._norms.append(state)
        module.forward = functools.partial(_frozen_norm_forward, module, state)

    def set_mode(self, attention: str = "off", norms: str | None = None) -> None:
        """Set the freezing mode of every attention layer and norm (norms default to `attention`)."""
        norms = attention if norms is None else norms
        for mode in (attention, norms):
            if mode not in MODES:
                raise ValueError(f"freezing mode must be one of {MODES}, got {mode!r}")
        for state in self._attention:
            state.mode = attention
        for state in self._norms:
            state.mode = norms
