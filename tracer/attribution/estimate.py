"""Before a run: how big the graph will be and how much memory attribution and pruning will take.

The counts come from the model's and the transcoder set's configs and file headers (no weights;
for hub repos the headers are read with HTTP range requests and the download size comes from the
hub's file listing, so nothing large is fetched), and the number of active features from one of:
- a forward pass over the prompt (`sample_tokens=None`, the default; exact, loads the weights);
- a forward pass over the first `sample_tokens` tokens, extrapolated per position;
- a bound, without weights (`active_features="bound"`): k per position and layer for a TopK set
  (exact), every feature otherwise (a worst case);
- a number given by the caller.

Memory model (bytes, float32 accumulation; B = batch, P = positions, D = d_model, L = layers,
F = features per layer, H = heads, A = active features, N = nodes, K = logit targets):
- the clean pass's state: dense activations L*P*F, per-layer vectors ~4*L*P*D, attention patterns
  L*H*P^2, the logits P*vocab;
- the sources: A*D*(1 + writes per feature) (encoder rows and decoder rows, CLT features write to
  every later layer);
- the linear pass: FORWARD_TRANSIENTS + L batch-sized (B, P, D) buffers at its peak (measured;
  + L more when the transcoders read the residual stream), freed before the rows are computed;
- the rows: with every feature, the (N, N) adjacency; with `max_feature_nodes`, (K + nodes) rows
  over all A + L*P + P columns, then the compact (N, N) adjacency beside them; plus
  BACKWARD_BUFFERS (B, P, D) gradient buffers in flight.
Attribution's peak is the state and sources plus the larger of the linear pass and the rows
phase. Pruning holds the adjacency (and, while loading a sparse file, its non-zero values), the
(N, N) bool edge mask and blocks of PRUNE_BLOCK bytes.
The file holds the non-zero entries plus a compressed bitmap, or the dense matrix if smaller;
non-zeros are counted from the graph's structure (a feature at (layer, pos) can only be reached
from lower layers at positions <= pos), with the prompt's own active features when they are known;
with a node budget the selected features are assumed to sit like the active ones (the greedy
choice concentrates them, so the file is then only roughly right, within about a half).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import psutil
import torch

FLOAT = 4  # bytes of a float32 entry
STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # adjacency storage
# (B, P, D) buffers alive at the peak of the linear forward: a few transients plus one per layer
# (measured on Llama fixtures), and one more per layer when the transcoders read the residual
# stream itself (`hook_resid_mid`), whose values stay until the forward ends
FORWARD_TRANSIENTS = 5
BACKWARD_BUFFERS = 4  # (B, P, D) gradient buffers in flight during a backward pass
TEMPORARIES = 32 << 20  # contraction blocks, allocator slack
PRUNE_BLOCK = 12 << 20  # row blocks pruning works on, and its vectors
BITMAP_SHARE = 1 / 64  # compressed bitmap bytes per entry (zlib of a structured bitmap)


@dataclass(frozen=True)
class Estimate:
    """Predicted sizes of one attribution run (bytes unless named otherwise)."""

    n_pos: int
    n_layers: int
    d_model: int
    d_transcoder: int
    active_features: int
    active_from: str  # "prompt", "sample of N tokens", "bound", "given"
    feature_nodes: int
    nodes: int
    adjacency_bytes: int
    attribution_peak_bytes: int  # growth over the loaded model
    pruning_peak_bytes: int  # growth over the process before the graph is loaded
    graph_file_bytes: int
    weights_bytes: int  # model + transcoders, resident during attribution
    available_bytes: int
    warnings: list[str] = field(default_factory=list)
    download_bytes: int = 0  # what fetching the hub parts downloads (0 when local)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs to know of a model and a transcoder set."""

    n_layers: int
    d_model: int
    n_heads: int
    vocab: int
    d_transcoder: int
    cross_layer: bool
    top_k: int | None
    model_bytes: int
    transcoder_bytes: int
    residual_reads: bool = False  # transcoders read the residual stream (hook_resid_mid)
    download_bytes: int = 0  # hub files a fetch would download (model and transcoder closure)


def estimate(
    shapes: Shapes,
    n_pos: int,
    *,
    active: int | torch.Tensor,
    active_from: str,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    n_logits: int = 10,
    available: int | None = None,
    adjacency_dtype: str = "float32",
) -> Estimate:
    """The prediction for a prompt of `n_pos` tokens with `active` features.

    `active` is a count, or an (n_layers, n_pos) tensor of active features per layer and position
    (known from a forward pass), which makes the file's non-zero count exact up to accidents.
    """
    per_cell = _per_cell(active, shapes.n_layers, n_pos)
    n_active = int(per_cell.sum())
    L, P, D, F = shapes.n_layers, n_pos, shapes.d_model, shapes.d_transcoder
    selected = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    n_columns = n_active + L * P + P
    nodes = selected + L * P + P + n_logits
    stored = STORED_BYTES[adjacency_dtype]  # bytes of an adjacency entry
    adjacency = nodes * nodes * stored

    state = L * P * F * FLOAT + 4 * L * P * D * FLOAT + L * shapes.n_heads * P * P * FLOAT
    state += P * shapes.vocab * FLOAT
    writes = (L + 1) / 2 if shapes.cross_layer else 1
    sources = int(n_active * (D * FLOAT * (1 + writes) + 3 * 8 + FLOAT))
    batch = min(batch_size, max(n_active, n_logits))
    buffer = batch * P * D * FLOAT
    if max_feature_nodes is None or selected == n_active:
        rows = adjacency
    else:
        rows = (n_logits + selected) * n_columns * stored + adjacency
    if stored != FLOAT:  # rows are computed in float32 a batch at a time, then rounded
        rows += batch * n_columns * FLOAT
    attribution = state + sources + TEMPORARIES
    forward_buffers = FORWARD_TRANSIENTS + L * (2 if shapes.residual_reads else 1)
    attribution += max(forward_buffers * buffer, rows + BACKWARD_BUFFERS * buffer)

    nonzero = _nonzero(per_cell, selected / max(1, n_active), n_logits)
    sparse = int(nonzero * stored + nodes * nodes * BITMAP_SHARE)
    file_bytes = min(adjacency, sparse) + n_active * (3 * 8 + FLOAT) + 4096
    # the loaded adjacency, the values read from a sparse file, the edge mask, row blocks, and
    # the file's active features and their values (every active one: large under a node budget)
    pruning = adjacency + (nonzero * stored if sparse < adjacency else 0)
    pruning += nodes * nodes + PRUNE_BLOCK + n_active * (3 * 8 + FLOAT)

    available = psutil.virtual_memory().available if available is None else available
    weights = shapes.model_bytes + shapes.transcoder_bytes
    warnings = []
    if active_from == "bound" and shapes.top_k is None:
        warnings.append(
            "active features are a worst-case bound (every feature active): sample the prompt "
            "for a realistic estimate"
        )
    if attribution + weights > available:
        warnings.append(
            f"attribution needs ~{_gb(attribution + weights)} with the weights, "
            f"{_gb(available)} is available: set max_feature_nodes or lower batch_size"
        )
    if pruning > available:
        warnings.append(f"pruning needs ~{_gb(pruning)}, {_gb(available)} is available")
    return Estimate(
        n_pos=P,
        n_layers=L,
        d_model=D,
        d_transcoder=F,
        active_features=n_active,
        active_from=active_from,
        feature_nodes=selected,
        nodes=nodes,
        adjacency_bytes=adjacency,
        attribution_peak_bytes=int(attribution),
        pruning_peak_bytes=int(pruning),
        graph_file_bytes=int(file_bytes),
        weights_bytes=weights,
        available_bytes=int(available),
        warnings=warnings,
        download_bytes=shapes.download_bytes,
    )


def _per_cell(active: int | torch.Tensor, n_layers: int, n_pos: int) -> torch.Tensor:
    """(n_layers, n_pos) active features per cell; a bare count is spread evenly."""
    if isinstance(active, torch.Tensor):
        if tuple(active.shape) != (n_layers, n_pos):
            raise ValueError(f"active must be ({n_layers}, {n_pos}), got {tuple(active.shape)}")
        return active.double()
    if active < 0:
        raise ValueError(f"active features must be >= 0, got {active}")
    return torch.full((n_layers, n_pos), active / max(1, n_layers * n_pos), dtype=torch.float64)


def _nonzero(per_cell: torch.Tensor, kept: float, n_logits: int) -> float:
    """Expected non-zero entries: each target (layer l, position p) is reached by every source at
    a lower layer and a position <= p (features, errors), by tokens at positions <= p; logit rows
    by every source. `kept` is the fraction of active features selected as nodes."""
    L, P = per_cell.shape
    features = per_cell * kept
    # sources below layer l at positions <= p: cumulative over layers (exclusive), then positions
    below = features.cumsum(0) - features + torch.arange(L, dtype=torch.float64)[:, None]
    reach = below.cumsum(1) + torch.arange(1, P + 1, dtype=torch.float64)[None, :]  # + tokens
    n_sources = features.sum() + L * P + P
    return float((features * reach).sum() + n_logits * n_sources)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- from files ---------------------------------------------------------------------------------
def shapes_of(
    model: str,
    transcoders: str,
    *,
    revision: str | None = None,
    transcoder_revision: str | None = None,
) -> Shapes:
    """Shapes from the model's config and the transcoder set's config and headers (no weights).

    Hub files are not downloaded: their headers are read remotely and their sizes listed."""
    from dataclasses import replace

    from transformers import AutoConfig

    from tracer.transcoders.files import describe, read_layout
    from tracer.transcoders.tensors import read_header

    config = AutoConfig.from_pretrained(model, revision=revision)
    text = config.get_text_config()
    d_model = text.hidden_size
    mlp = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d_model
    per_layer = 4 * d_model * d_model + 3 * d_model * mlp  # attention and MLP matrices
    params = text.num_hidden_layers * per_layer + 2 * text.vocab_size * d_model
    layout = read_layout(transcoders, revision=transcoder_revision)
    shape = describe(layout, {f: read_header(f) for f in layout.files})
    shapes = _shapes(text, shape, int(params * FLOAT))
    return replace(shapes, download_bytes=_download_bytes(model, revision, layout))


def _download_bytes(model: str, revision: str | None, layout) -> int:
    """Bytes a fetch downloads: the model's files (hub id) and the set's hub files, as listed."""
    from fnmatch import fnmatch

    from tracer.hub import MODEL_PATTERNS, HfRef, looks_local, pin, repo_files

    pins: dict = {}
    listings: dict = {}

    def listed(ref: HfRef) -> dict:
        ref = pin(ref, pins)
        key = (ref.repo_id, ref.revision)
        if key not in listings:
            listings[key] = repo_files(*key)
        return listings[key]

    total = 0
    if not looks_local(model):
        files = listed(HfRef(model, "", revision))
        total += sum(
            f.size for path, f in files.items() if any(fnmatch(path, p) for p in MODEL_PATTERNS)
        )
    for f in layout.files:
        if isinstance(f, HfRef):
            total += listed(f)[f.path_in_repo].size
    return total


def shapes_of_model(replacement) -> Shapes:
    """Shapes of a loaded `ReplacementModel` (its weights counted as they are)."""
    config = replacement.model.config
    model_bytes = sum(p.numel() * p.element_size() for p in replacement.model.parameters())
    return _shapes(config.get_text_config(), replacement.transcoders, model_bytes)


def _shapes(text_config, ts, model_bytes: int) -> Shapes:
    """`ts`: a `TranscoderSet` or the `SetShape` its files describe."""
    writes = (ts.n_layers + 1) / 2 if ts.cross_layer else 1  # decoder rows per feature
    return Shapes(
        n_layers=ts.n_layers,
        d_model=ts.d_model,
        n_heads=text_config.num_attention_heads,
        vocab=text_config.vocab_size,
        d_transcoder=ts.d_transcoder,
        cross_layer=ts.cross_layer,
        top_k=ts.top_k,
        model_bytes=model_bytes,
        transcoder_bytes=int(ts.n_layers * ts.d_transcoder * ts.d_model * (1 + writes) * FLOAT),
        residual_reads=ts.feature_input_hook.endswith("hook_resid_mid"),
    )


def active_per_cell(replacement, input_ids: torch.Tensor, sample_tokens: int | None) -> tuple:
    """((n_layers, n_pos) active counts, how they were found) from a forward pass.

    With `sample_tokens`, only the first tokens run and each layer's mean per position is
    extended to the rest of the prompt."""
    n_pos = input_ids.shape[0]
    ids = input_ids if sample_tokens is None else input_ids[: max(2, sample_tokens)]
    state = replacement.run_prompt(ids)
    counts = torch.stack([(acts != 0).sum(-1) for acts in state.activations]).double()
    counts[:, 0] = 0  # the start token's features are not sources
    if ids.shape[0] == n_pos:
        return counts, "prompt"
    mean = counts[:, 1:].mean(1, keepdim=True)
    full = mean.expand(-1, n_pos).clone()
    full[:, : ids.shape[0]] = counts
    full[:, 0] = 0
    return full, f"sample of {ids.shape[0]} tokens"


def bound_per_cell(shapes: Shapes, n_pos: int) -> torch.Tensor:
    per = shapes.top_k if shapes.top_k is not None else shapes.d_transcoder
    cells = torch.full((shapes.n_layers, n_pos), float(per), dtype=torch.float64)
    cells[:, 0] = 0
    return cells


def estimate_prompt(
    model: str,
    transcoders: str,
    prompt: str,
    *,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    max_n_logits: int = 10,
    sample_tokens: int | None = None,
    use_weights: bool | None = None,
    dtype: str = "float32",
    adjacency_dtype: str = "float32",
    revision: str | None = None,
    transcoder_revision: str | None = None,
) -> Estimate:
    """`estimate` for a model and transcoder set on disk or on the hub, and a prompt.

    `use_weights` None (the default) loads the weights for a forward pass unless the set is TopK,
    whose bound (k per position and layer) needs none; True or False forces the choice. Without
    weights, a hub model and set are not downloaded (config, tokenizer and file headers only).
    """
    from transformers import AutoTokenizer

    shapes = shapes_of(
        model, transcoders, revision=revision, transcoder_revision=transcoder_revision
    )
    if use_weights is None:
        use_weights = shapes.top_k is None or sample_tokens is not None
    if use_weights:
        from tracer.model.replacement import ReplacementModel

        replacement = ReplacementModel.from_pretrained(
            model,
            transcoders,
            dtype=dtype,
            revision=revision,
            transcoder_revision=transcoder_revision,
        )
        ids = replacement.tokenize(prompt)
        cells, found = active_per_cell(replacement, ids, sample_tokens)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        special = set(tokenizer.all_special_ids)
        n_pos = len(ids) + (0 if ids and ids[0] in special else 1)
        cells, found = bound_per_cell(shapes, n_pos), "bound"
    return estimate(
        shapes,
        cells.shape[1],
        active=cells,
        active_from=found,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        n_logits=max_n_logits,
        adjacency_dtype=adjacency_dtype,
    )


def human(estimate: Estimate) -> str:
    """A few lines for a terminal."""
    e = estimate
    lines = [
        f"prompt: {e.n_pos} tokens; {e.n_layers} layers x {e.d_transcoder} features, d_model "
        f"{e.d_model}",
        f"active features: {e.active_features:,} ({e.active_from}); feature nodes "
        f"{e.feature_nodes:,}; nodes {e.nodes:,}",
        f"adjacency (dense): {_gb(e.adjacency_bytes)}",
        f"attribution peak: ~{_gb(e.attribution_peak_bytes)} above the weights "
        f"({_gb(e.weights_bytes)})",
        f"pruning peak: ~{_gb(e.pruning_peak_bytes)}",
        f"graph file: ~{_gb(e.graph_file_bytes)}",
        f"available now: {_gb(e.available_bytes)}",
    ]
    if e.download_bytes:
        lines.append(f"download (hub model and transcoders): {_gb(e.download_bytes)}")
    lines += [f"WARNING: {w}" for w in e.warnings]
    return "\n".join(lines)
