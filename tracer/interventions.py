"""Interventions on the replacement model.

`direct_effect_run` is the direct-effect mode of DESIGN.md section 3: attention patterns and norm
scales are replayed from the clean prompt, MLP outputs are held at their clean values (a transcoder's
skip term responds, being linear), and only the chosen sources change. Every downstream quantity is
then exactly linear in the change, which is what an attribution graph's adjacency claims; this is
the forward computation the backward-pass attribution is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tracer.replacement import PromptState, ReplacementModel


@dataclass(frozen=True)
class FeatureChange:
    """Set feature `feature` of `layer` at `pos` to `value` (its decoded output changes with it)."""

    layer: int
    pos: int
    feature: int
    value: float


@dataclass(frozen=True)
class ErrorChange:
    """Scale the error vector of (layer, pos) by `scale` (0 removes it)."""

    layer: int
    pos: int
    scale: float


@dataclass(frozen=True)
class TokenChange:
    """Scale the token vector (residual stream entering layer 0) at `pos` by `scale`."""

    pos: int
    scale: float


Change = FeatureChange | ErrorChange | TokenChange


@dataclass
class DirectRun:
    reads: torch.Tensor  # (batch, n_layers, n_pos, d_model): what each transcoder reads
    final_hidden: torch.Tensor  # (batch, n_pos, d_model)

    def feature_pre_activations(self, model: ReplacementModel, layer: int) -> torch.Tensor:
        """(batch, n_pos, d_transcoder) pre-activations of layer's features."""
        return model.transcoders.pre_activations(layer, self.reads[:, layer])


def _check_change(model: ReplacementModel, state: PromptState, change: Change) -> None:
    if not 0 <= change.pos < state.n_pos:
        raise ValueError(f"position {change.pos} out of range [0, {state.n_pos})")
    if isinstance(change, TokenChange):
        return
    if not 0 <= change.layer < model.n_layers:
        raise ValueError(f"layer {change.layer} out of range [0, {model.n_layers})")
    if isinstance(change, FeatureChange):
        d = model.transcoders.d_transcoder
        if not 0 <= change.feature < d:
            raise ValueError(f"feature {change.feature} out of range [0, {d})")
        if not torch.isfinite(torch.tensor(change.value)):
            raise ValueError(f"feature value must be finite, got {change.value}")


def _write_deltas(
    model: ReplacementModel, state: PromptState, batch: Sequence[Sequence[Change]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed delta (B, n_pos, d), write deltas (B, n_layers, n_pos, d)) of each change set."""
    ts, dtype = model.transcoders, state.embeddings.dtype
    embed = torch.zeros(len(batch), state.n_pos, model.d_model, dtype=dtype)
    writes = torch.zeros(len(batch), model.n_layers, state.n_pos, model.d_model, dtype=dtype)
    for b, changes in enumerate(batch):
        for change in changes:
            _check_change(model, state, change)
            if isinstance(change, TokenChange):
                embed[b, change.pos] += (change.scale - 1) * state.embeddings[change.pos]
            elif isinstance(change, ErrorChange):
                error = state.errors[change.layer][change.pos]
                writes[b, change.layer, change.pos] += (change.scale - 1) * error
            else:
                old = state.activations[change.layer][change.pos, change.feature]
                delta = change.value - old
                targets = range(change.layer, model.n_layers) if ts.cross_layer else [change.layer]
                for target in targets:
                    decoder = ts.decoder(change.layer, target)[change.feature]
                    writes[b, target, change.pos] += delta * decoder
    return embed, writes


@torch.no_grad()
def direct_effect_run(
    model: ReplacementModel, state: PromptState, batch: Sequence[Sequence[Change]]
) -> DirectRun:
    """Run the frozen model once per change set (batched) and return what the targets read."""
    if not batch:
        raise ValueError("no intervention sets given")
    ts = model.transcoders
    embed_delta, write_delta = _write_deltas(model, state, batch)
    ids = state.input_ids[None].expand(len(batch), -1)
    model.freezer.set_mode("replay")
    try:
        reads = []
        with model.envoy.trace(ids):
            model._embed_envoy().output = state.embeddings + embed_delta
            for layer in range(model.n_layers):
                read = model._read_envoy(layer).save()
                constant = state.mlp_outputs[layer] + write_delta[:, layer]
                if ts.has_skip:
                    constant = constant - ts.skip(layer, state.reads[layer]) + ts.skip(layer, read)
                model._replace_mlp(layer, constant)
                reads.append(read)
            final = model.envoy.output[0].save()
    finally:
        model.freezer.set_mode("off")
    return DirectRun(reads=torch.stack(reads, dim=1), final_hidden=final)


def feature_intervention(
    model: ReplacementModel,
    prompt,
    changes: Sequence[Change],
    *,
    zero_bos: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct-effect intervention on a prompt: (new logits at the last position, clean ones).

    Attention, norms and MLP outputs are frozen to the clean prompt's; see `direct_effect_run`.
    """
    if not changes:
        raise ValueError(
            "changes is empty; give at least one FeatureChange/ErrorChange/TokenChange"
        )
    state = model.run_prompt(model.tokenize(prompt), zero_bos=zero_bos)
    run = direct_effect_run(model, state, [changes])
    return model.logits_from_hidden(run.final_hidden[0, -1]), state.logits[-1]
