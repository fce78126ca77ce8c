"""Feature pages: what each transcoder feature responds to and what it promotes.

One streaming pass of the model over a dataset's examples (`examples_from_texts`), a batch at a
time; per layer and feature it keeps (tracer.features.streaming) the number of tokens where the
feature is active, its maximum, a histogram of its positive activations, the `top_k` examples with
the largest activation and a seeded uniform sample of its active tokens, from which examples are
drawn per quantile band of its activation distribution. Memory is bounded by batch x features.

Output logits (`logit_effects`): the feature's decoder direction (for a cross-layer transcoder, the
sum of its writes to every layer) through the final norm's linear part with its per-position scale
left out (the scale is a positive number per prompt, frozen in attribution), then the unembedding,
minus the mean over the vocabulary, as the graphs' logit targets are demeaned. The top and bottom
lists leave out the special tokens (start, end, padding), which no text in the data predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from tracer.features.streaming import ContextTable, Histogram, token_hash
from tracer.model.families import get_module


@dataclass(frozen=True)
class PageSettings:
    """How pages are built (validated by the caller's config; checked again here)."""

    n_tokens: int  # data tokens to read (start tokens and padding do not count)
    context: int  # tokens per example, start token included; longer texts are split
    top_k: int = 16  # top-activating examples kept per feature
    quantiles: tuple[float, ...] = (0.5, 0.9)  # edges of the bands in (0, 1), increasing
    examples_per_band: int = 4
    histogram_bins: int = 32  # a power of two
    batch_size: int = 32  # examples per forward pass
    n_logits: int = 10  # top and bottom output logits
    seed: int = 0  # the sample for the bands

    def __post_init__(self) -> None:
        for name in ("n_tokens", "top_k", "examples_per_band", "batch_size", "n_logits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 2:
            raise ValueError(f"context must be >= 2 tokens (start token + one), got {self.context}")
        q = list(self.quantiles)
        if any(not 0 < x < 1 for x in q) or q != sorted(set(q)):
            raise ValueError(f"quantiles must be increasing and inside (0, 1), got {q}")
        Histogram(1, self.histogram_bins)  # validates the bin count

    @property
    def n_bands(self) -> int:
        return len(self.quantiles) + 1

    @property
    def sample_size(self) -> int:
        """Sampled active tokens per feature: twice what the bands need, on average."""
        return 2 * self.n_bands * self.examples_per_band


@dataclass
class LayerPages:
    """Everything known about one layer's features (d = d_transcoder), as tensors."""

    n_tokens: int
    active: torch.Tensor  # (d,) int64 tokens where the feature is > 0
    act_max: torch.Tensor  # (d,) float32
    hist_counts: torch.Tensor  # (d, bins) int64 over [0, hist_top)
    hist_top: torch.Tensor  # (d,) float64
    top: ContextTable  # ranked by activation
    quantile_values: torch.Tensor  # (d, n_quantiles) band edges (NaN: feature never active)
    bands: ContextTable  # (d, n_bands * examples_per_band), band b in slots b*E ... (b+1)*E - 1
    top_logits: torch.Tensor  # (d, n_logits) token ids, largest effect first
    top_logit_values: torch.Tensor  # (d, n_logits)
    bottom_logits: torch.Tensor  # (d, n_logits) token ids, most negative first
    bottom_logit_values: torch.Tensor  # (d, n_logits)

    @property
    def frequency(self) -> torch.Tensor:
        return self.active.double() / max(self.n_tokens, 1)


@dataclass
class _Accumulator:
    top: ContextTable
    sample: ContextTable
    histogram: Histogram
    active: torch.Tensor
    act_max: torch.Tensor


@dataclass
class Examples:
    """A batch of examples: ids (n, n_pos) padded with -1, global example indices (n,)."""

    ids: torch.Tensor
    index: torch.Tensor
    special: set[int] = field(default_factory=set)

    @property
    def valid(self) -> torch.Tensor:
        """(n, n_pos) positions that are data: not padding, not a special token."""
        valid = self.ids >= 0
        for token in self.special:
            valid &= self.ids != token
        return valid


def examples_from_texts(model, texts: Iterable[str], settings: PageSettings) -> list[list[int]]:
    """Token ids of each example: a text's tokens, split into pieces of `context - 1` tokens,
    each after the model's start token; stops at `n_tokens` data tokens (the last one cut)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; feature pages need one to read text")
    special = model._special_token_ids()
    start = model._start_token_id()
    piece = settings.context - (1 if start is not None else 0)
    examples, total = [], 0
    for text in texts:
        ids = [
            t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special
        ]
        for begin in range(0, len(ids), piece):
            chunk = ids[begin : begin + piece][: settings.n_tokens - total]
            examples.append(([start] if start is not None else []) + chunk)
            total += len(chunk)
            if total >= settings.n_tokens:
                return examples
    if total < settings.context - 1:
        raise ValueError(
            f"the dataset has {total} tokens, fewer than one example's context "
            f"({settings.context - 1} tokens after the start token)"
        )
    return examples


def collect_pages(
    model,
    examples: list[list[int]],
    settings: PageSettings,
    progress: Callable[[int], None] | None = None,
) -> list[LayerPages]:
    """Pages of every feature of `model.transcoders` over `examples` (from examples_from_texts).

    `progress(n)` is called after each batch with the data tokens it held.
    """
    ts = model.transcoders
    device = model.unembedding.device
    if not examples:
        raise ValueError("no examples: the dataset is empty")
    n_ctx = max(len(e) for e in examples)
    limit = model.context_length
    if limit is not None and n_ctx > limit:
        raise ValueError(f"context {n_ctx} is longer than the model's context {limit}")
    special = model._special_token_ids()
    accumulators = [
        _new_accumulator(ts.d_transcoder, n_ctx, settings, device) for _ in range(ts.n_layers)
    ]
    n_tokens = 0
    for batch in _batches(examples, settings.batch_size, special, device):
        valid = batch.valid
        n_tokens += int(valid.sum())
        token_index = batch.index[:, None] * n_ctx + torch.arange(batch.ids.shape[1], device=device)
        for layer, read in enumerate(_reads(model, batch.ids.clamp(min=0))):
            acts = ts.encode(layer, read).float() * valid[..., None]  # (n, n_pos, d)
            _accumulate(accumulators[layer], acts, batch, token_index, settings.seed + layer)
        if progress is not None:
            progress(int(valid.sum()))
    return [
        _finish(model, layer, acc, n_tokens, settings) for layer, acc in enumerate(accumulators)
    ]


def _new_accumulator(d: int, n_ctx: int, settings: PageSettings, device) -> _Accumulator:
    return _Accumulator(
        top=ContextTable.empty(d, settings.top_k, n_ctx, device),
        sample=ContextTable.empty(d, settings.sample_size, n_ctx, device),
        histogram=Histogram(d, settings.histogram_bins, device),
        active=torch.zeros(d, dtype=torch.long, device=device),
        act_max=torch.zeros(d, device=device),
    )


def _batches(examples: list[list[int]], size: int, special: set[int], device) -> Iterator[Examples]:
    for begin in range(0, len(examples), size):
        chunk = examples[begin : begin + size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), -1, dtype=torch.long)
        for row, example in enumerate(chunk):
            ids[row, : len(example)] = torch.tensor(example, dtype=torch.long)
        index = torch.arange(begin, begin + len(chunk))
        yield Examples(ids=ids.to(device), index=index.to(device), special=special)


@torch.no_grad()
def _reads(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each layer's transcoder reads, (n, n_pos, d_model) per layer, in a clean forward.

    Padding sits after every example's tokens, so under causal attention it changes none of them.
    """
    saved = []
    with model.traced_pass():
        with model.envoy.trace(ids) as tracer:
            for layer in range(model.n_layers):
                saved.append(model._read_envoy(layer).save())
            tracer.stop()  # nothing after the last read is needed (no logits over the vocab)
    return list(saved)


def _accumulate(
    acc: _Accumulator, acts: torch.Tensor, batch: Examples, token_index: torch.Tensor, seed: int
) -> None:
    """acts (n, n_pos, d), zero where not data; token_index (n, n_pos) global token indices."""
    n, n_pos, d = acts.shape
    seq, pos, feat = (acts > 0).nonzero(as_tuple=True)  # the active (token, feature) pairs
    values = acts[seq, pos, feat]
    peak = acts.amax(dim=(0, 1))
    acc.active += torch.bincount(feat, minlength=d)
    acc.act_max = torch.maximum(acc.act_max, peak)
    acc.histogram.update(values, feat, peak)
    token = seq * n_pos + pos
    acc.top.update(feat, token, values.double(), acts, batch.ids, batch.index)
    # the sample's keys: a hash of (token, feature), so the sample is the same however the
    # data is batched
    hashed = token_hash(token_index.reshape(-1)[token], feat, seed).double()
    acc.sample.update(feat, token, hashed, acts, batch.ids, batch.index)


def _finish(
    model, layer: int, acc: _Accumulator, n_tokens: int, settings: PageSettings
) -> LayerPages:
    quantile_values, bands = _bands(acc.sample.ranked(), settings)
    effects = logit_effects(model, layer)
    special = sorted(t for t in model._special_token_ids() if t < effects.shape[1])
    n = min(settings.n_logits, effects.shape[1] - len(special))
    top_values, top_ids = effects.index_fill(1, _ids(special, effects), -torch.inf).topk(n, dim=1)
    bottom_values, bottom_ids = (
        (-effects).index_fill(1, _ids(special, effects), -torch.inf).topk(n, dim=1)
    )
    return LayerPages(
        n_tokens=n_tokens,
        active=acc.active,
        act_max=acc.act_max,
        hist_counts=acc.histogram.counts,
        hist_top=acc.histogram.top,
        top=acc.top.ranked(),
        quantile_values=quantile_values,
        bands=bands,
        top_logits=top_ids,
        top_logit_values=top_values,
        bottom_logits=bottom_ids,
        bottom_logit_values=-bottom_values,
    )


def _ids(tokens: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long, device=like.device)


def _bands(sample: ContextTable, settings: PageSettings) -> tuple[torch.Tensor, ContextTable]:
    """Band edges from each feature's sampled activations, and up to `examples_per_band` sampled
    examples per band (the sample is uniform over active tokens, so bands fill alike)."""
    d, n_sample = sample.keys.shape
    filled = sample.example >= 0
    values = sample.values.double().masked_fill(~filled, torch.nan)
    q = torch.tensor(settings.quantiles, dtype=torch.float64, device=values.device)
    edges = torch.nanquantile(values, q, dim=1).T  # (d, n_quantiles), NaN where none sampled
    band = (values[..., None] >= edges[:, None, :]).sum(-1)  # (d, n_sample) band index
    e = settings.examples_per_band
    out = ContextTable.empty(d, settings.n_bands * e, sample.tokens.shape[2], values.device)
    # within a band keep the first `e` samples in key order (the sample is already in key order)
    for b in range(settings.n_bands):
        member = filled & (band == b)
        rank = member.long().cumsum(1) - 1
        chosen = member & (rank < e)
        rows, cols = chosen.nonzero(as_tuple=True)
        slots = b * e + rank[rows, cols]
        for name in ("keys", "values", "example", "position", "tokens", "acts"):
            getattr(out, name)[rows, slots] = getattr(sample, name)[rows, cols]
    return edges.float(), out


@torch.no_grad()
def logit_effects(model, layer: int, chunk: int = 1024) -> torch.Tensor:
    """(d_transcoder, vocab): each feature of `layer`'s demeaned direct effect on the logits per
    unit activation (module docstring: final norm's scale left out, soft-cap not applied)."""
    ts = model.transcoders
    targets = range(layer, ts.n_layers) if ts.cross_layer else range(layer, layer + 1)
    direction = sum(ts.decoder(layer, target).float() for target in targets)  # (d, d_model)
    direction = _final_norm_linear(model, direction)
    unembed = model.unembedding.float()  # (vocab, d_model)
    rows = []
    for begin in range(0, direction.shape[0], chunk):
        effects = direction[begin : begin + chunk] @ unembed.T
        rows.append(effects - effects.mean(dim=1, keepdim=True))
    return torch.cat(rows)


def _final_norm_linear(model, x: torch.Tensor) -> torch.Tensor:
    """The final norm applied to x (..., d_model) with its scale frozen at 1."""
    norm = get_module(model.base, model.family.final_norm)
    weight = norm.weight.float()
    style = model.family.norm_style
    if style == "layernorm":
        x = x - x.mean(-1, keepdim=True)
        return x * weight  # the bias is a constant, no part of a feature's effect
    return x * (1 + weight) if style == "rms_one_plus" else x * weight
