"""Attribution graphs of the local replacement model (DESIGN.md section 2).

Phases, each a function below:
1. `ReplacementModel.run_prompt`: one clean forward; feature activations, errors, token
   embeddings (a token node writes its token's embedding only: GPT-2's position embedding is a
   constant, like a bias).
2. `select_logit_targets`: the logits to explain (top tokens by probability, or custom targets).
3. `collect_sources`: active features in (layer, pos, feature) order and their write vectors.
4. `ReplacementModel.linear_forward`: the prompt repeated `batch_size` times, linear in the sources,
   kept once and back-propagated many times; with every feature a node, also a few prefixes of
   the prompt (`prefix_lengths`), since a batch of targets needs the backward only up to its
   last target's position.
5. `RowComputer.rows` (tracer/attribution/rows.py): inject each target's read vector as the gradient at its
   read point, one backward per batch of targets through the shortest pass that holds it;
   contract gradients with every source's write vector as the backward reaches it.
6. `explore_features`: rows for the logits, then for features in order of their current estimated
   influence on the logits, until `max_feature_nodes`, written into the adjacency in node order
   `[selected features | errors (layer-major) | tokens | logits]`, rows targets, columns sources.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tracer.attribution.rows import (
    ELEMENT_BUDGET,
    RowComputer,
    Sources,
    Target,
    WriteSources,
    plan_prefix_lengths,
)
from tracer.graph.graph import Graph, LogitTarget
from tracer.graph.pruning import influence_series
from tracer.model.replacement import PromptState, ReplacementModel


def select_logit_targets(
    model: ReplacementModel,
    state: PromptState,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    targets: Sequence[int | str | LogitTarget] | None = None,
) -> list[LogitTarget]:
    """Top tokens until their cumulative probability reaches `desired_logit_prob`, or custom ones.

    Custom targets: token ids, token strings, or `LogitTarget`s whose direction is any weighted
    sum of token logits (e.g. logit(A) - logit(B)).
    """
    if max_n_logits < 1:
        raise ValueError(f"max_n_logits must be >= 1, got {max_n_logits}")
    if not 0 < desired_logit_prob <= 1:
        raise ValueError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    probs = torch.softmax(state.logits[-1].float(), dim=-1)
    if targets is None:
        top = probs.topk(min(max_n_logits, probs.shape[0]))
        cumulative = top.values.cumsum(0)
        n = int((cumulative < desired_logit_prob).sum().item()) + 1
        n = min(n, top.values.shape[0])
        return [
            LogitTarget.token(int(t), float(p), _token_label(model, int(t)))
            for t, p in zip(top.indices[:n], top.values[:n], strict=True)
        ]
    if not targets:
        raise ValueError("targets is empty; give token ids, token strings or LogitTargets")
    resolved = []
    for target in targets:
        if isinstance(target, LogitTarget):
            resolved.append(target)
            continue
        token = _token_id(model, target)
        resolved.append(LogitTarget.token(token, float(probs[token]), _token_label(model, token)))
    for target in resolved:
        for token in target.token_ids:
            if not 0 <= token < model.vocab_size:
                raise ValueError(f"target token {token} is outside [0, {model.vocab_size})")
    return resolved


def _token_id(model: ReplacementModel, target: int | str) -> int:
    if isinstance(target, int):
        return target
    if model.tokenizer is None:
        raise ValueError(f"target {target!r} is a string but the model has no tokenizer")
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"target {target!r} is {len(ids)} tokens; a logit target must be one")
    unk = model.tokenizer.unk_token_id
    if ids[0] == unk and target != model.tokenizer.unk_token:
        raise ValueError(
            f"target {target!r} is not in the vocabulary (it maps to the unknown token)"
        )
    return ids[0]


def _token_label(model: ReplacementModel, token: int) -> str:
    return model.tokenizer.decode([token]) if model.tokenizer is not None else str(token)


def accumulation_dtype(model: ReplacementModel) -> torch.dtype:
    """Adjacency dtype: float32, or float64 for a float64 model (exactness checks)."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def collect_sources(model: ReplacementModel, state: PromptState) -> Sources:
    """Active features (nonzero activations) and the vectors every source writes."""
    ts = model.transcoders
    features, values = [], []
    for layer, acts in enumerate(state.activations):
        pos, feat = acts.nonzero(as_tuple=True)  # row-major: sorted by (pos, feature)
        features.append(torch.stack([torch.full_like(pos, layer), pos, feat], dim=1))
        values.append(acts[pos, feat])
    features = torch.cat(features)
    dtype = accumulation_dtype(model)
    activations = torch.cat(values).to(dtype)
    encoders = torch.zeros(features.shape[0], model.d_model, dtype=dtype)
    for layer in range(model.n_layers):
        in_layer = (features[:, 0] == layer).nonzero(as_tuple=True)[0]
        encoders[in_layer] = ts.layer(layer).W_enc[features[in_layer, 2]].to(dtype)
    n_pos, n_layers = state.n_pos, model.n_layers
    positions = torch.arange(n_pos)
    error_columns = features.shape[0] + torch.arange(n_layers * n_pos).view(n_layers, n_pos)
    writes = []
    for target in range(n_layers):
        columns, pos = [error_columns[target]], [positions]
        vectors = [state.errors[target].to(dtype)]
        for source in ts.source_layers(target):
            in_layer = (features[:, 0] == source).nonzero(as_tuple=True)[0]
            decoder = ts.decoder(source, target)[features[in_layer, 2]]
            columns.append(in_layer)
            pos.append(features[in_layer, 1])
            vectors.append(decoder.to(dtype) * activations[in_layer, None])
        vectors = torch.cat(vectors)
        writes.append(WriteSources.by_position(torch.cat(columns), torch.cat(pos), vectors, n_pos))
    # the token embedding only, as upstream
    tokens = WriteSources.by_position(
        error_columns.numel() + features.shape[0] + positions,
        positions,
        state.token_embeddings.to(dtype),
        n_pos,
    )
    return Sources(
        features=features,
        activations=activations,
        encoders=encoders,
        writes=writes,
        embed=tokens,
        n_pos=n_pos,
    )


def prefix_lengths(sources: Sources, batch: int, n_layers: int) -> list[int]:
    """Lengths of the linear passes for rows of every active feature in (layer, pos, feature)
    order, `batch` at a time: each batch needs the prefix up to its last target's position."""
    needs = [
        (int(block[:, 1].max()) + 1, int(block[:, 0].max()) + 1)
        for block in sources.features.split(batch)
        if block.shape[0]
    ]
    return plan_prefix_lengths(needs, sources.n_pos, n_layers)


def _feature_targets(sources: Sources, idx: torch.Tensor) -> list[Target]:
    layers_positions = sources.features[idx, :2].tolist()
    return [
        Target(layer=layer, pos=pos, vector=vector)
        for (layer, pos), vector in zip(layers_positions, sources.encoders[idx], strict=True)
    ]


def _logit_read_vectors(model: ReplacementModel, targets: list[LogitTarget]) -> torch.Tensor:
    """(k, d_model): each target's combination of demeaned unembedding rows."""
    unembed = model.unembedding.to(accumulation_dtype(model))
    demeaned_rows = []
    for target in targets:
        ids = torch.tensor(target.token_ids)
        weights = torch.tensor(target.weights, dtype=unembed.dtype)
        demeaned_rows.append(weights @ (unembed[ids] - unembed.mean(0)))
    return torch.stack(demeaned_rows)


def _influence_on_logits(
    rows: torch.Tensor, row_nodes: torch.Tensor, logit_weights: torch.Tensor, n_columns: int
) -> torch.Tensor:
    """Estimated influence of every column node on the logits from the rows known so far.

    rows (n_rows, n_columns), row_nodes (n_rows,) the column index each row's node has (logits get
    indices >= n_columns), logit_weights (n_rows,) nonzero on logit rows. The rows are read in
    blocks: no copy of them is made.
    """
    dtype = torch.promote_types(rows.dtype, torch.float32)  # float16 storage: sums in float32
    row_sums = torch.cat([block.to(dtype).abs().sum(1) for block in _row_blocks(rows)])
    position = torch.full((n_columns,), -1, dtype=torch.long)
    known = row_nodes < n_columns
    position[row_nodes[known]] = known.nonzero(as_tuple=True)[0]
    has_row = position >= 0

    def spread(on_rows: torch.Tensor) -> torch.Tensor:  # (n_rows,) -> (n_columns,)
        scaled = on_rows / row_sums.clamp_min(1e-30)  # spreading |rows| normalised to sum 1
        out = torch.zeros(n_columns, dtype=dtype)
        start = 0
        for block in _row_blocks(rows):
            out += scaled[start : start + block.shape[0]] @ block.to(dtype).abs()
            start += block.shape[0]
        return out

    def step(on_columns: torch.Tensor) -> torch.Tensor:  # a node's influence passes on its row
        on_rows = torch.zeros(rows.shape[0], dtype=dtype)
        on_rows[position[has_row]] = on_columns[has_row]
        return spread(on_rows)

    return influence_series(step, spread(logit_weights.to(dtype)), rows.shape[0] + 2)


def _row_blocks(rows: torch.Tensor) -> list[torch.Tensor]:
    """Views of `rows` in blocks of at most ELEMENT_BUDGET elements (at least one row each)."""
    step = max(1, ELEMENT_BUDGET // max(1, rows.shape[1]))
    return list(rows.split(step))


def explore_features(
    computer: RowComputer,
    sources: Sources,
    logit_targets: list[LogitTarget],
    logit_vectors: torch.Tensor,
    n_pos: int,
    max_feature_nodes: int | None,
    update_interval: int = 4,
    progress: bool = True,
    storage_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the logits, then for features (all, or the most influential first); the graph.

    Returns (selected feature indices, ascending; adjacency (N, N) in node order). With every
    active feature selected, rows are written straight into the adjacency (one N x N matrix).
    """
    batch = computer.batch
    n_active, n_columns, k = sources.n_active, sources.n_columns, len(logit_targets)
    budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    greedy = budget < n_active
    dtype = storage_dtype or sources.dtype
    compute = sources.dtype
    if greedy:  # rows over all active features' columns, compacted at the end
        rows = torch.zeros(k + budget, n_columns, dtype=dtype)  # [logits | features so far]
        logit_rows, feature_rows = rows[:k], rows[k:]
    else:
        adjacency = torch.zeros(n_columns + k, n_columns + k, dtype=dtype)
        feature_rows, logit_rows = (
            adjacency[:n_active, :n_columns],
            adjacency[n_columns:, :n_columns],
        )
    # rows are computed in the accumulation dtype, then rounded once into the storage dtype
    scratch = None if dtype == compute else torch.empty(batch, n_columns, dtype=compute)

    def fill(targets: list[Target], rows: torch.Tensor) -> None:
        if scratch is None:
            computer.rows(targets, out=rows)
            return
        block = scratch[: len(targets)].zero_()
        computer.rows(targets, out=block)
        rows.copy_(block)
        if dtype == torch.float16 and not bool(torch.isfinite(rows).all()):
            raise ValueError(
                "an adjacency entry overflows float16 (|x| > 65504); store it as bfloat16 or "
                "float32 instead"
            )

    for i in range(0, k, batch):
        targets = [Target(None, n_pos - 1, v) for v in logit_vectors[i : i + batch]]
        fill(targets, logit_rows[i : i + len(targets)])
    visited = torch.zeros(budget, dtype=torch.long)
    seen = torch.zeros(n_active, dtype=torch.bool)
    weights = torch.tensor([t.probability for t in logit_targets], dtype=compute)
    logit_nodes = torch.arange(k) + n_columns
    queue, queue_start, done = torch.arange(n_active), 0, 0
    bar = tqdm(total=budget, desc="feature rows", unit="row", disable=not progress, leave=False)
    while done < budget:
        if greedy and (done // batch) % update_interval == 0:
            influence = _influence_on_logits(
                rows[: k + done],
                torch.cat([logit_nodes, visited[:done]]),
                torch.cat([weights, torch.zeros(done, dtype=compute)]),
                n_columns,
            )[:n_active]
            influence[seen] = -1.0
            queue, queue_start = influence.argsort(descending=True)[: budget - done], done
        take = queue[done - queue_start :][: min(batch, budget - done)]
        fill(_feature_targets(sources, take), feature_rows[done : done + len(take)])
        visited[done : done + len(take)] = take
        seen[take] = True
        done += len(take)
        bar.update(len(take))
    bar.close()
    if not greedy:
        return visited, adjacency
    return _compact(visited, feature_rows, logit_rows, n_active, n_columns)


def _compact(
    visited: torch.Tensor,
    feature_rows: torch.Tensor,
    logit_rows: torch.Tensor,
    n_active: int,
    n_columns: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the visited features' rows and columns, in (layer, pos, feature) order."""
    selected, order = visited.sort()
    n_sel, k = selected.shape[0], logit_rows.shape[0]
    n_other = n_columns - n_active  # errors and tokens
    n = n_sel + n_other + k
    columns = torch.cat([selected, torch.arange(n_active, n_columns)])
    adjacency = torch.zeros(n, n, dtype=feature_rows.dtype)
    # a block of rows at a time: never a copy of all rows over all active features' columns
    step = max(1, ELEMENT_BUDGET // max(1, n_columns))
    for start in range(0, n_sel, step):
        block = order[start : start + step]
        adjacency[start : start + len(block), : n_sel + n_other] = feature_rows[block][:, columns]
    adjacency[n - k :, : n_sel + n_other] = logit_rows[:, columns]
    return selected, adjacency


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _storage_dtype(name: str | torch.dtype, model: ReplacementModel) -> torch.dtype | None:
    """The adjacency's storage dtype, or None for the accumulation dtype (float32/float64)."""
    dtype = STORAGE_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(
            f"adjacency_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}"
        )
    if dtype == torch.float32 or accumulation_dtype(model) == torch.float64:
        return None
    return dtype


def attribute(
    prompt: str | Sequence[int] | torch.Tensor,
    model: ReplacementModel,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    targets: Sequence[int | str | LogitTarget] | None = None,
    batch_size: int = 256,
    max_feature_nodes: int | None = None,
    offload: bool = False,
    zero_bos: bool = True,
    progress: bool = True,
    adjacency_dtype: str | torch.dtype = "float32",
) -> Graph:
    """Compute the attribution graph of `prompt` under `model`'s local replacement model.

    `adjacency_dtype` stores the adjacency (and the rows explored for it) as float32 (default),
    or as float16 / bfloat16 to halve its memory and file: every entry is computed in float32 and
    rounded once, so it is within a relative 2^-11 (float16; 2^-25 absolute below 2^-14, and an
    entry beyond 65504 is refused) or 2^-8 (bfloat16) of the float32 graph's. A float64 model
    keeps float64.
    """
    storage = _storage_dtype(adjacency_dtype, model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_feature_nodes is not None and max_feature_nodes < 1:
        raise ValueError(
            f"max_feature_nodes must be >= 1 (or None for all), got {max_feature_nodes}"
        )
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    input_ids = model.tokenize(prompt)
    state = model.run_prompt(input_ids, zero_bos=zero_bos)
    logit_targets = select_logit_targets(
        model,
        state,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        targets=targets,
    )
    sources = collect_sources(model, state)
    if offload:  # everything attribution needs of the transcoders is now in `sources`
        model.transcoders.offload()
    lap("forward")
    batch = min(batch_size, max(sources.n_active, len(logit_targets)))
    every_feature = max_feature_nodes is None or max_feature_nodes >= sources.n_active
    # with a node budget the batches follow the influence order, known only as it goes
    lengths = prefix_lengths(sources, batch, model.n_layers) if every_feature else None
    computer = RowComputer(model, state, sources, batch, lengths)
    lap("linear_forward")
    logit_vectors = _logit_read_vectors(model, logit_targets)
    selected, adjacency = explore_features(
        computer,
        sources,
        logit_targets,
        logit_vectors,
        state.n_pos,
        max_feature_nodes,
        progress=progress,
        storage_dtype=storage,
    )
    lap("rows")
    n_backward = computer.n_backward
    del computer
    prompt_text = prompt if isinstance(prompt, str) else None
    return Graph(
        adjacency_matrix=adjacency,
        active_features=sources.features,
        activation_values=sources.activations,
        selected_features=selected,
        logit_targets=logit_targets,
        input_tokens=input_ids,
        input_string=prompt_text,
        n_layers=model.n_layers,
        metadata={
            "model_id": model.model_id,
            "model_revision": model.model_revision,
            "transcoder_set": model.transcoders.source,
            "transcoder_revision": model.transcoders.revision,
            "scan": model.transcoders.scan or model.transcoders.model_name,
            "family": model.family.name,
            "vocab_size": model.vocab_size,  # the viewer's ids of non-token logit targets
            "dtype": str(model.dtype).removeprefix("torch."),
            "config": {
                "max_n_logits": max_n_logits,
                "desired_logit_prob": desired_logit_prob,
                "batch_size": batch_size,
                "max_feature_nodes": max_feature_nodes,
                "zero_bos": zero_bos,
                "custom_targets": targets is not None,
                "adjacency_dtype": str(adjacency.dtype).removeprefix("torch."),
            },
            "timings": timings,
            "n_backward": n_backward,
        },
    )
