"""Interventions on the replacement model: set features, scale errors and tokens, generate.

Modes (DESIGN.md section 3):
- "full": everything downstream is recomputed. Each MLP writes its real output plus the change of
  the intervened features' decoded output (for a cross-layer transcoder, into every layer it writes);
  other features respond through the real model.
- "frozen_attention": as full, with the attention patterns of the prompt frozen.
- "direct": attention patterns, norm scales and MLP outputs frozen to the clean prompt's (a
  transcoder's skip term responds, being linear); only the changed sources move. Every downstream
  quantity is then exactly linear in the change: what an attribution graph's adjacency claims.

Frozen parts always cover the prompt positions only; positions generated later run live.
Feature values are absolute (`value`) or relative to the activation they replace (`scale`:
0 ablates, -2 flips and doubles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tracer.interventions.modes import MODES
from tracer.model.replacement import PromptState, ReplacementModel

_FREEZING = {
    "full": ("off", "off"),
    "frozen_attention": ("replay", "off"),
    "direct": ("replay", "replay"),
}


@dataclass(frozen=True)
class FeatureChange:
    """Set feature `feature` of `layer` at `pos` (None: every position) to `value`, or scale it."""

    layer: int
    pos: int | None
    feature: int
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ValueError(f"{self}: give exactly one of value= or scale=")
        number = self.value if self.value is not None else self.scale
        if not math.isfinite(number):
            raise ValueError(f"feature value/scale must be finite, got {number}")

    def target(self, current: torch.Tensor) -> torch.Tensor:
        return current * self.scale if self.value is None else torch.full_like(current, self.value)


@dataclass(frozen=True)
class ErrorChange:
    """Scale the error vector of (layer, pos) by `scale` (0 removes it)."""

    layer: int
    pos: int | None
    scale: float


@dataclass(frozen=True)
class TokenChange:
    """Scale the token embedding at `pos` by `scale` (0 removes the token node); what else enters
    layer 0 there (GPT-2's position embedding) stays, as the token node does not write it."""

    pos: int
    scale: float


Change = FeatureChange | ErrorChange | TokenChange


def check_changes(model: ReplacementModel, n_pos: int, changes: Sequence[Change]) -> None:
    """Raise a clear error for a change outside the model, the set or the prompt."""
    for change in changes:
        if not isinstance(change, FeatureChange | ErrorChange | TokenChange):
            raise TypeError(f"not an intervention: {change!r}")
        if change.pos is not None and not 0 <= change.pos < n_pos:
            raise ValueError(f"{change}: position {change.pos} out of range [0, {n_pos})")
        if not math.isfinite(getattr(change, "scale", None) or 0.0):
            raise ValueError(f"{change}: scale must be finite")
        if isinstance(change, TokenChange):
            continue
        if not 0 <= change.layer < model.n_layers:
            raise ValueError(f"{change}: layer {change.layer} out of range [0, {model.n_layers})")
        if isinstance(change, FeatureChange):
            d = model.transcoders.d_transcoder
            if not 0 <= change.feature < d:
                raise ValueError(f"{change}: feature {change.feature} out of range [0, {d})")


def _positions(
    change: Change, n_pos: int, n_prompt: int, on_new_tokens: bool, start: int = 0
) -> torch.Tensor:
    """Positions >= start that `change` applies to."""
    if change.pos is not None:
        return torch.tensor([change.pos] if change.pos >= start else [], dtype=torch.long)
    return torch.arange(start, n_pos if on_new_tokens else n_prompt)


@dataclass
class InterventionResult:
    logits: torch.Tensor  # (batch, n_pos, vocab) after the intervention
    activations: list[torch.Tensor]  # per layer, sparse (batch, n_pos, d_transcoder)
    clean_logits: torch.Tensor  # (n_pos, vocab)
    # with `with_reads`: what each layer's transcoder reads (batch, n_layers, n_pos, d_model) and
    # the final hidden state (batch, n_pos, d_model), before the final norm's logits and soft-cap
    reads: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None

    def top_logits(self, k: int = 5, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids) of the top k tokens at the last position."""
        return torch.softmax(self.logits[batch, -1].float(), -1).topk(k)


def _write_deltas(
    model: ReplacementModel,
    state: PromptState,
    batch: Sequence[Sequence[Change]],
    n_pos: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct mode: (token scale (B, n_pos, 1), write deltas (B, n_layers, n_pos, d_model)), with
    feature changes relative to the clean prompt's activations."""
    ts, dtype = model.transcoders, state.embeddings.dtype
    token_scale = torch.ones(len(batch), n_pos, 1, dtype=dtype)
    writes = torch.zeros(len(batch), model.n_layers, n_pos, model.d_model, dtype=dtype)
    for b, changes in enumerate(batch):
        for change in changes:
            pos = _positions(change, n_pos, state.n_pos, False)
            if isinstance(change, TokenChange):
                token_scale[b, pos] *= change.scale
            elif isinstance(change, ErrorChange):
                error = state.errors[change.layer][pos]
                writes[b, change.layer, pos] += (change.scale - 1) * error
            else:
                clean = state.activations[change.layer][pos, change.feature]
                delta = change.target(clean) - clean
                for target in _written_layers(model, change.layer):
                    decoder = ts.decoder(change.layer, target)[change.feature]
                    writes[b, target, pos] += delta[:, None] * decoder
    return token_scale, writes


def _written_layers(model: ReplacementModel, layer: int) -> range:
    return (
        range(layer, model.n_layers) if model.transcoders.cross_layer else range(layer, layer + 1)
    )


@torch.no_grad()
def run_with_changes(
    model: ReplacementModel,
    state: PromptState,
    ids: torch.Tensor,
    batch: Sequence[Sequence[Change]],
    mode: str = "full",
    on_new_tokens: bool = False,
    with_activations: bool = True,
    with_reads: bool = False,
) -> InterventionResult:
    """One forward of `ids` (B, n_pos), whose first `state.n_pos` tokens are the prompt, with
    change set b applied to row b. Positions past the prompt run live in every mode.

    `with_activations=False` skips encoding every feature of every layer (the costly part for large
    sets): only the changed features are evaluated, and `activations` comes back empty.
    `with_reads=True` also returns every layer's read vectors and the final hidden state: in direct
    mode, what attribution's targets read (the exactness tests compare the adjacency with them).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not batch:
        raise ValueError("no intervention sets given; pass a list of change lists")
    if len(batch) != ids.shape[0]:
        raise ValueError(f"{len(batch)} change sets for a batch of {ids.shape[0]} sequences")
    n_pos, n_prompt, ts = ids.shape[1], state.n_pos, model.transcoders
    for changes in batch:
        check_changes(model, n_pos, changes)
    token_scale, direct_writes = _write_deltas(model, state, batch, n_pos)
    pending = torch.zeros_like(direct_writes)  # live modes: decoded changes per written layer
    activations = []
    reads = []  # with_reads: (B, n_pos, d_model) per layer
    has_errors = any(isinstance(c, ErrorChange) for cs in batch for c in cs)
    encode_all = with_activations or has_errors
    frozen_norms = _FREEZING[mode][1] == "replay"
    attention, norms = _FREEZING[mode]
    with model.traced_pass(attention, norms, recording=state.recording):
        with model.envoy.trace(ids):
            model._embed_with_token_scale(token_scale)
            acts_so_far: list[torch.Tensor] = []
            for layer in range(model.n_layers):
                read = model._read_envoy(
                    layer, model._read_scale(state, layer) if frozen_norms else None
                )
                if with_reads:
                    reads.append(read.save())
                acts = ts.encode(layer, read) if encode_all else None  # (B, n_pos, d_transcoder)
                if has_errors:  # unchanged copies: the live error is measured on them
                    acts_so_far.append(acts.clone())
                write = model._layer_module(layer, model.write_module)
                if mode == "direct":
                    live = write.output
                    frozen = state.mlp_outputs[layer] + direct_writes[:, layer, :n_prompt]
                    if ts.has_skip:
                        skip = ts.skip(layer, read[:, :n_prompt])
                        frozen = frozen - ts.skip(layer, state.reads[layer]) + skip
                    if acts is not None:
                        _set_changed(acts, batch, layer, n_prompt, state)
                    # generated positions run live: changes there decode from live activations
                    _decode_changes(
                        model,
                        acts,
                        read,
                        batch,
                        layer,
                        pending,
                        n_pos,
                        n_prompt,
                        on_new_tokens,
                        start=n_prompt,
                    )
                    new = live[:, n_prompt:] + pending[:, layer, n_prompt:]
                    write.output = torch.cat([frozen, new], dim=1)
                else:
                    mlp_out = write.output
                    errors = _error_deltas(model, batch, layer, mlp_out, acts_so_far, read)
                    _decode_changes(
                        model, acts, read, batch, layer, pending, n_pos, n_prompt, on_new_tokens
                    )
                    write.output = mlp_out + pending[:, layer] + errors
                if with_activations:
                    activations.append(acts.to_sparse())
            final = model.envoy.output[0].save()
    logits = model.logits_from_hidden(final)
    return InterventionResult(
        logits=logits,
        activations=activations,
        clean_logits=state.logits,
        reads=torch.stack(reads, dim=1) if with_reads else None,
        final_hidden=final if with_reads else None,
    )


def _decode_changes(
    model: ReplacementModel,
    acts: torch.Tensor | None,
    read: torch.Tensor,
    batch: Sequence[Sequence[Change]],
    layer: int,
    pending: torch.Tensor,
    n_pos: int,
    n_prompt: int,
    on_new_tokens: bool,
    start: int = 0,
) -> None:
    """Set the changed features of `layer` in `acts` and add their decoded change to `pending`,
    at positions >= start."""
    ts = model.transcoders
    for b, changes in enumerate(batch):
        for change in changes:
            if not isinstance(change, FeatureChange) or change.layer != layer:
                continue
            pos = _positions(change, n_pos, n_prompt, on_new_tokens, start)
            if pos.numel() == 0:
                continue
            if acts is None:
                current = _feature_activation(ts, layer, read[b, pos], change.feature)
            else:
                current = acts[b, pos, change.feature]
            new = change.target(current)
            if acts is not None:
                acts[b, pos, change.feature] = new
            for target in _written_layers(model, layer):
                pending[b, target, pos] += (new - current)[:, None] * ts.decoder(layer, target)[
                    change.feature
                ]


def _feature_activation(ts, layer: int, x: torch.Tensor, feature: int) -> torch.Tensor:
    """Activation of one feature at reads x (n, d_model), without encoding the whole layer."""
    if ts.activation == "topk":  # a top-k feature depends on its whole row
        return ts.encode(layer, x)[:, feature]
    w = ts.layer(layer)
    pre = x @ w.W_enc[feature] + w.b_enc[feature]
    if ts.activation == "relu":
        return torch.relu(pre)
    return pre * (pre > w.threshold[feature])


def _set_changed(acts, batch, layer, n_prompt, state) -> None:
    """Direct mode's reported activations at prompt positions: changed features at their set
    values (relative to the clean prompt's)."""
    for b, changes in enumerate(batch):
        for change in changes:
            if isinstance(change, FeatureChange) and change.layer == layer:
                pos = _positions(change, n_prompt, n_prompt, False)
                clean = state.activations[layer][pos, change.feature]
                acts[b, pos, change.feature] = change.target(clean)


def _error_deltas(model, batch, layer, mlp_out, acts_so_far, read) -> torch.Tensor | float:
    """Live modes: (scale - 1) x the live error (MLP output minus transcoder output)."""
    changes = [
        (b, c)
        for b, cs in enumerate(batch)
        for c in cs
        if isinstance(c, ErrorChange) and c.layer == layer
    ]
    if not changes:
        return 0.0
    error = mlp_out - model.transcoders.reconstruct(layer, acts_so_far, read)
    delta = torch.zeros_like(error)
    for b, change in changes:
        pos = slice(None) if change.pos is None else change.pos
        delta[b, pos] += (change.scale - 1) * error[b, pos]
    return delta


def intervene(
    model: ReplacementModel,
    prompt,
    changes: Sequence[Change] | Sequence[Sequence[Change]],
    *,
    mode: str = "full",
) -> InterventionResult:
    """Run `prompt` with one change set, or a batch of change sets (one row each)."""
    batch = _as_batch(changes)
    ids = model.tokenize(prompt)
    state = model.run_prompt(ids, zero_bos=False)
    return run_with_changes(model, state, ids[None].expand(len(batch), -1), batch, mode)


def _as_batch(changes, unchanged_rows: bool = False) -> list[list[Change]]:
    """One change set, or a batch of them, as a list of rows; an empty row is an error unless
    `unchanged_rows` (then it runs the prompt as it is: a baseline beside the others)."""
    if not changes:
        raise ValueError("no interventions given; pass FeatureChange/ErrorChange/TokenChange items")
    if isinstance(changes[0], FeatureChange | ErrorChange | TokenChange):
        return [list(changes)]
    batch = [list(c) for c in changes]
    if not unchanged_rows and not all(batch):
        raise ValueError("an intervention set is empty; give at least one change per set")
    return batch


def ablate_supernodes(
    model: ReplacementModel,
    prompt,
    supernodes: dict[str, Sequence[tuple[int, int | None, int]]],
    *,
    scale: float = 0.0,
    mode: str = "full",
) -> dict[str, InterventionResult]:
    """Scale every member (layer, pos, feature) of each named group together; one row per group."""
    if not supernodes:
        raise ValueError("no supernodes given")
    batch = []
    for name, members in supernodes.items():
        if not members:
            raise ValueError(f"supernode {name!r} has no members")
        batch.append([FeatureChange(layer, pos, feat, scale=scale) for layer, pos, feat in members])
    ids = model.tokenize(prompt)
    state = model.run_prompt(ids, zero_bos=False)
    result = run_with_changes(model, state, ids[None].expand(len(batch), -1), batch, mode)
    return {
        name: InterventionResult(
            logits=result.logits[i : i + 1],
            activations=[a.to_dense()[i : i + 1].to_sparse() for a in result.activations],
            clean_logits=result.clean_logits,
        )
        for i, name in enumerate(supernodes)
    }


@dataclass
class Generation:
    tokens: torch.Tensor  # (batch, n_prompt + n_new)
    n_prompt: int
    texts: list[str] | None


@torch.no_grad()
def generate(
    model: ReplacementModel,
    prompt,
    changes: Sequence[Change] | Sequence[Sequence[Change]] | None = None,
    *,
    max_new_tokens: int = 10,
    mode: str = "full",
    on_new_tokens: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> Generation:
    """Greedy or sampled (seeded) generation under interventions, batched over change sets.

    Interventions hold on the prompt positions, and with `on_new_tokens` also on every generated
    position (changes with `pos=None`). Frozen parts of a mode apply to the prompt positions only.
    An empty change set in a batch is a row generated without interventions (a baseline).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    batch = [[]] if not changes else _as_batch(changes, unchanged_rows=True)
    ids = model.tokenize(prompt)
    for row in batch:
        check_changes(model, ids.shape[0], row)
    state = model.run_prompt(ids, zero_bos=False)
    limit = model.context_length
    if limit is not None and ids.shape[0] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({ids.shape[0]} tokens) + {max_new_tokens} new tokens exceed the context {limit}"
        )
    sequences = ids[None].expand(len(batch), -1).clone()
    # one generator per row: a row samples the same tokens whatever else is in the batch
    generators = [torch.Generator().manual_seed(seed) for _ in batch]
    for _ in range(max_new_tokens):
        result = run_with_changes(model, state, sequences, batch, mode, on_new_tokens)
        last = result.logits[:, -1].float()
        if do_sample:
            probs = torch.softmax(last / temperature, -1)
            token = torch.stack(
                [
                    torch.multinomial(p, 1, generator=g)
                    for p, g in zip(probs, generators, strict=True)
                ]
            )
        else:
            token = last.argmax(-1, keepdim=True)
        sequences = torch.cat([sequences, token], dim=1)
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(s[ids.shape[0] :].tolist()) for s in sequences]
    return Generation(tokens=sequences, n_prompt=ids.shape[0], texts=texts)
