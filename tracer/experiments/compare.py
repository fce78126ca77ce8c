"""Cross-profile comparison tables over the graphs stage's files: scores, sizes, layers, matching.

Reads, in the layout of `tracer.experiments.outputs`, `ROOT/profiles/PROFILE/profile.json` and, per prompt,
`ROOT/profiles/PROFILE/PROMPT/scores.json` (prune stage) and `ROOT/graphs/PROFILE/PROMPT.safetensors`
(attribute stage). Every table here is a list of
rows (dicts keyed by the table's `*_COLUMNS`), one CSV file each in `write_tables`:

- scores: one row per (profile, prompt), the scores and sizes stored in scores.json.
- sizes: one row per (profile, prompt, point of the pruning curve in scores.json).
- layers: one row per (profile, prompt, layer) of the full graph: the summed node influence of that
  layer's feature nodes and of its error nodes, and error_share = errors / (features + errors).
- matching: one row per (profile A, profile B, prompt, layer) for two enabled profiles of the same
  model (equal `model` in profile.json), both directions. Each A feature is matched to the B
  feature whose own-layer decoder vector (a PLT's W_dec, a CLT's slot 0) has the highest cosine;
  mean_cosine and frac_cosine_above (cosine > min_cosine) describe the weights. For a prompt both
  attributed, the pruned graphs (thresholds from each scores.json) are compared under the matching:
  A's kept feature node (layer, pos, f) maps to (layer, pos, match(f)); kept_fraction is the share
  of A's kept nodes whose image is kept in B, jaccard = |image(A) & B| / |image(A) | B| over sets.

- features: one row per feature node kept in A's pruned graph, for the pairs and prompts of
  `matching`: its matched B feature at the same position, their cosine, whether B's pruned graph
  keeps that node, and both features' labels (`labels[profile](layer, feature)`, feature pages).

Undefined ratios (0 / 0) are None, an empty CSV cell. Disabled profiles and profiles without graphs
are left out of every table and listed in summary.json under `skipped` with the reason.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tracer.atomic import write_json, write_text
from tracer.experiments import outputs
from tracer.experiments.outputs import PROFILE_FILE, SCORES_FILE
from tracer.graph.graph import Graph
from tracer.hub import is_hf_uri
from tracer.transcoders.files import load_transcoders
from tracer.transcoders.sets import TranscoderSet

PROFILES_DIR = "profiles"
DEFAULT_MIN_COSINE = 0.7

SCORE_FIELDS = (
    "replacement",
    "completeness",
    "pruned_replacement",
    "pruned_completeness",
    "active_features",
    "pruned_nodes",
    "pruned_edges",
)
CURVE_FIELDS = ("node_threshold", "edge_threshold", "nodes", "edges", "replacement", "completeness")
SCORES_COLUMNS = ("profile", "prompt", *SCORE_FIELDS)
SIZES_COLUMNS = ("profile", "prompt", *CURVE_FIELDS)
LAYER_FIELDS = ("layer", "feature_nodes", "feature_influence", "error_influence", "error_share")
LAYERS_COLUMNS = ("profile", "prompt", *LAYER_FIELDS)
OVERLAP_FIELDS = (
    "layer",
    "a_nodes",
    "b_nodes",
    "a_nodes_kept_in_b",
    "shared_nodes",
    "union_nodes",
    "kept_fraction",
    "jaccard",
)
MATCHING_COLUMNS = (
    "profile_a",
    "profile_b",
    "prompt",
    "layer",
    "mean_cosine",
    "frac_cosine_above",
    *OVERLAP_FIELDS[1:],
)
FEATURE_COLUMNS = (
    "profile_a",
    "profile_b",
    "prompt",
    "layer",
    "pos",
    "feature_a",
    "label_a",
    "feature_b",
    "label_b",
    "cosine",
    "kept_in_b",
)
_MATCH_CHUNK = 4096  # A features per block of the (chunk, d_transcoder_b) cosine matrix


# ---- finding the graphs stage's outputs ---------------------------------------------------------
@dataclass(frozen=True)
class ProfileRun:
    """One enabled profile's folder under `ROOT/profiles` and the prompts it has graphs for."""

    name: str
    info: dict  # profile.json: name, model, transcoders, revision, transcoder_revision, dtype, ...
    folder: Path  # ROOT/profiles/PROFILE
    prompts: tuple[str, ...]  # prompt ids with scores and a graph file, sorted

    def graph(self, prompt: str) -> Graph:
        return Graph.load(outputs.graph_path(self.folder.parent.parent, self.name, prompt))

    def scores(self, prompt: str) -> dict:
        """The prompt's scores.json (scores, sizes, thresholds, pruning curve)."""
        return outputs.read_object(self.folder / prompt / SCORES_FILE, "prune")

    def thresholds(self, prompt: str) -> tuple[float, float]:
        """(node_threshold, edge_threshold) the graphs stage pruned this prompt's graph with."""
        scores = self.scores(prompt)
        try:
            return float(scores["node_threshold"]), float(scores["edge_threshold"])
        except KeyError as err:
            raise ValueError(f"{self.folder / prompt / SCORES_FILE} lacks {err}") from err


def find_profiles(root: str | Path) -> tuple[list[ProfileRun], dict[str, str]]:
    """Enabled profiles with results under `root/profiles`, sorted by name, and the skipped ones
    (profile name -> reason). Hidden folders (a stage's temporary folders) are ignored."""
    base = Path(root) / PROFILES_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist; run the graphs stage (`dvc repro`) first")
    runs: list[ProfileRun] = []
    skipped: dict[str, str] = {}
    for profile in outputs.profile_folders(root):
        if profile.info is None:
            raise FileNotFoundError(
                f"{profile.folder} has no {PROFILE_FILE}; it is not a profile's output"
            )
        if not profile.enabled:
            skipped[profile.name] = "disabled"
            continue
        prompts = profile.prompts_with(SCORES_FILE, graph=True)
        if not prompts:
            skipped[profile.name] = "no prompt with both scores and a graph file"
            continue
        runs.append(ProfileRun(profile.name, profile.info, profile.folder, prompts))
    return runs, skipped


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ---- scores and sizes ---------------------------------------------------------------------------
def scores_table(root: str | Path) -> list[dict]:
    """One row per (profile, prompt): SCORES_COLUMNS, as stored in scores.json."""
    rows = []
    for run in find_profiles(root)[0]:
        for prompt in run.prompts:
            scores = run.scores(prompt)
            rows.append({"profile": run.name, "prompt": prompt, **_pick(scores, SCORE_FIELDS)})
    return rows


def sizes_table(root: str | Path) -> list[dict]:
    """One row per (profile, prompt, curve point): graph size and scores at those thresholds."""
    rows = []
    for run in find_profiles(root)[0]:
        for prompt in run.prompts:
            for point in run.scores(prompt).get("curve", []):
                rows.append({"profile": run.name, "prompt": prompt, **_pick(point, CURVE_FIELDS)})
    return rows


def _pick(document: dict, keys: tuple[str, ...]) -> dict:
    missing = [k for k in keys if k not in document]
    if missing:
        raise ValueError(f"scores.json entry lacks {missing}; it has {sorted(document)}")
    return {k: document[k] for k in keys}


# ---- influence per layer ------------------------------------------------------------------------
def layer_table(graph: Graph) -> list[dict]:
    """One row per layer (LAYER_FIELDS) of the full graph's node influence on the logits.

    Feature nodes count at their layer (`active_features[selected_features, 0]`); error nodes are
    layer-major, n_pos per layer. Influence is unitless (path weight into the logits).
    """
    influence = graph.node_influence().double()  # (N,)
    layout = graph.layout
    feature_layers = graph.active_features[graph.selected_features, 0]  # (n_features,)
    per_layer = torch.zeros(graph.n_layers, dtype=torch.float64)
    per_layer.index_add_(0, feature_layers, influence[layout.feature_slice])
    counts = torch.bincount(feature_layers, minlength=graph.n_layers)  # (n_layers,)
    errors = influence[layout.error_slice].reshape(graph.n_layers, graph.n_pos).sum(1)
    return [
        {
            "layer": layer,
            "feature_nodes": int(counts[layer]),
            "feature_influence": float(per_layer[layer]),
            "error_influence": float(errors[layer]),
            "error_share": _ratio(float(errors[layer]), float(per_layer[layer] + errors[layer])),
        }
        for layer in range(graph.n_layers)
    ]


def layers_table(root: str | Path) -> list[dict]:
    """`layer_table` of every (profile, prompt) graph, with profile and prompt columns."""
    rows = []
    for run in find_profiles(root)[0]:
        for prompt in run.prompts:
            for row in layer_table(run.graph(prompt)):
                rows.append({"profile": run.name, "prompt": prompt, **row})
    return rows


# ---- feature matching between two transcoder sets of one model ---------------------------------
@dataclass(frozen=True)
class FeatureMatch:
    """Best B feature of every A feature at one layer, by own-layer decoder cosine."""

    indices: torch.Tensor  # (d_transcoder_a,) long: index of the matched B feature
    similarity: torch.Tensor  # (d_transcoder_a,) float32: cosine of that pair, in [-1, 1]


def own_decoder(ts: TranscoderSet, layer: int) -> torch.Tensor:
    """Decoder of `layer`'s features into their own layer: (d_transcoder, d_model)."""
    return ts.decoder(layer, layer)


def match_features(
    ts_a: TranscoderSet, ts_b: TranscoderSet, layer: int, *, chunk: int = _MATCH_CHUNK
) -> FeatureMatch:
    """Match each feature of A at `layer` to the B feature with the most similar own-layer decoder.

    Ties go to the lowest B index; an all-zero decoder row has cosine 0 with everything.
    """
    if ts_a.n_layers != ts_b.n_layers or ts_a.d_model != ts_b.d_model:
        raise ValueError(
            "transcoder sets to match must belong to one model: A has "
            f"(n_layers, d_model) = ({ts_a.n_layers}, {ts_a.d_model}), B has "
            f"({ts_b.n_layers}, {ts_b.d_model})"
        )
    dec_a = F.normalize(own_decoder(ts_a, layer).float(), dim=-1)  # (d_tc_a, d_model)
    dec_b = F.normalize(own_decoder(ts_b, layer).float(), dim=-1)  # (d_tc_b, d_model)
    best = [(block @ dec_b.T).max(dim=1) for block in dec_a.split(chunk)]
    return FeatureMatch(
        indices=torch.cat([b.indices for b in best]),
        similarity=torch.cat([b.values for b in best]),
    )


def kept_features(graph: Graph, node_threshold: float, edge_threshold: float) -> torch.Tensor:
    """(k, 3) long: layer, pos, feature of the feature nodes kept by pruning at these thresholds."""
    kept = graph.prune(node_threshold, edge_threshold).node_mask[graph.layout.feature_slice]
    return graph.active_features[graph.selected_features[kept]]


def graph_overlap(
    kept_a: torch.Tensor, kept_b: torch.Tensor, matches: list[FeatureMatch]
) -> list[dict]:
    """Per layer (OVERLAP_FIELDS): how much of A's pruned node set the matching finds kept in B.

    kept_a (k_a, 3) and kept_b (k_b, 3) are `kept_features` rows; `matches[layer]` maps A's
    features at that layer to B's.
    """
    rows = []
    for layer, match in enumerate(matches):
        a = kept_a[kept_a[:, 0] == layer]
        images = [(int(p), int(match.indices[f])) for _, p, f in a.tolist()]
        b = {(p, f) for _, p, f in kept_b[kept_b[:, 0] == layer].tolist()}
        hits = sum(image in b for image in images)
        shared, union = len(set(images) & b), len(set(images) | b)
        rows.append(
            {
                "layer": layer,
                "a_nodes": len(images),
                "b_nodes": len(b),
                "a_nodes_kept_in_b": hits,
                "shared_nodes": shared,
                "union_nodes": union,
                "kept_fraction": _ratio(hits, len(images)),
                "jaccard": _ratio(shared, union),
            }
        )
    return rows


def same_model_pairs(runs: list[ProfileRun]) -> list[tuple[ProfileRun, ProfileRun]]:
    """Ordered pairs (A, B), A != B, of profiles whose profile.json `model` fields are equal."""
    return [
        (a, b)
        for a in runs
        for b in runs
        if a.name != b.name and a.info["model"] == b.info["model"]
    ]


def load_profile_transcoders(run: ProfileRun, base: Path | None = None) -> TranscoderSet:
    """The profile's transcoder set; a relative local path is taken from `base` (default: cwd)."""
    source = run.info["transcoders"]
    if is_hf_uri(source):
        return load_transcoders(source, revision=run.info.get("transcoder_revision"))
    path = Path(source)
    return load_transcoders(path if path.is_absolute() or base is None else base / path)


def matching_table(
    root: str | Path, *, min_cosine: float = DEFAULT_MIN_COSINE, base: Path | None = None
) -> list[dict]:
    """One row per (profile A, profile B, shared prompt, layer): MATCHING_COLUMNS.

    A pair without a shared prompt still gets its per-layer cosine rows, with prompt and the graph
    columns None. `base` is where relative transcoder paths in profile.json start (default: cwd).
    """
    return compare_pairs(root, min_cosine=min_cosine, base=base)[0]


def compare_pairs(
    root: str | Path,
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    base: Path | None = None,
    labels: dict[str, Callable[[int, int], str]] | None = None,
) -> tuple[list[dict], list[dict]]:
    """The `matching` rows and the `features` rows (FEATURE_COLUMNS) of every same-model pair."""
    labels = labels or {}
    feature_rows: list[dict] = []
    if not -1 <= min_cosine <= 1:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    runs = find_profiles(root)[0]
    sets: dict[str, TranscoderSet] = {}
    rows = []
    for a, b in same_model_pairs(runs):
        for run in (a, b):
            if run.name not in sets:
                sets[run.name] = load_profile_transcoders(run, base)
        ts_a, ts_b = sets[a.name], sets[b.name]
        matches = [match_features(ts_a, ts_b, layer) for layer in range(ts_a.n_layers)]
        weights = [
            {
                "mean_cosine": float(m.similarity.double().mean()),
                "frac_cosine_above": float((m.similarity > min_cosine).double().mean()),
            }
            for m in matches
        ]
        prompts = sorted(set(a.prompts) & set(b.prompts))
        if not prompts:
            blank = dict.fromkeys(OVERLAP_FIELDS[1:])
            rows += [_matching_row(a, b, None, layer, w, blank) for layer, w in enumerate(weights)]
        for prompt in prompts:
            graph_a, graph_b = a.graph(prompt), b.graph(prompt)
            if not torch.equal(graph_a.input_tokens, graph_b.input_tokens):
                raise ValueError(
                    f"prompt {prompt!r} has different tokens under profiles {a.name!r} and "
                    f"{b.name!r}; graphs of one model must share the prompt's tokens"
                )
            overlap = graph_overlap(
                kept_features(graph_a, *a.thresholds(prompt)),
                kept_features(graph_b, *b.thresholds(prompt)),
                matches,
            )
            for layer, (w, o) in enumerate(zip(weights, overlap, strict=True)):
                rows.append(_matching_row(a, b, prompt, layer, w, o))
            feature_rows += _feature_rows(
                (a.name, b.name, prompt),
                kept_features(graph_a, *a.thresholds(prompt)),
                kept_features(graph_b, *b.thresholds(prompt)),
                matches,
                (labels.get(a.name), labels.get(b.name)),
            )
    return rows, feature_rows


def _feature_rows(
    names: tuple[str, str, str],
    kept_a: torch.Tensor,
    kept_b: torch.Tensor,
    matches: list[FeatureMatch],
    labels: tuple[Callable[[int, int], str] | None, Callable[[int, int], str] | None],
) -> list[dict]:
    kept = {tuple(row) for row in kept_b.tolist()}
    label_a, label_b = labels
    rows = []
    for layer, pos, feature in kept_a.tolist():
        match = int(matches[layer].indices[feature])
        rows.append(
            {
                **dict(zip(("profile_a", "profile_b", "prompt"), names, strict=True)),
                "layer": layer,
                "pos": pos,
                "feature_a": feature,
                "label_a": label_a(layer, feature) if label_a else None,
                "feature_b": match,
                "label_b": label_b(layer, match) if label_b else None,
                "cosine": float(matches[layer].similarity[feature]),
                "kept_in_b": (layer, pos, match) in kept,
            }
        )
    return rows


def _matching_row(
    a: ProfileRun, b: ProfileRun, prompt: str | None, layer: int, weights: dict, overlap: dict
) -> dict:
    row = {"profile_a": a.name, "profile_b": b.name, "prompt": prompt, **weights, **overlap}
    row["layer"] = layer
    return {k: row[k] for k in MATCHING_COLUMNS}


# ---- files --------------------------------------------------------------------------------------
TABLES = {
    "scores": SCORES_COLUMNS,
    "sizes": SIZES_COLUMNS,
    "layers": LAYERS_COLUMNS,
    "matching": MATCHING_COLUMNS,
    "features": FEATURE_COLUMNS,
}


def write_csv(rows: list[dict], columns: tuple[str, ...], path: str | Path) -> Path:
    """Write rows as CSV with these columns (None as an empty cell), atomically."""

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)

    return write_text(path, write)


def write_tables(
    root: str | Path,
    out_dir: str | Path,
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    base: Path | None = None,
    labels: dict[str, Callable[[int, int], str]] | None = None,
) -> dict:
    """Write scores.csv, sizes.csv, layers.csv, matching.csv, features.csv and summary.json into
    `out_dir`; `labels[profile](layer, feature)` labels the features table.

    Every table is computed before any file is written, and each file is written to a temporary
    name and renamed, so a failure leaves no partial file. Returns the summary (row counts, the
    profiles compared, the ordered profile pairs matched, the skipped profiles with reasons).
    """
    runs, skipped = find_profiles(root)
    tables = {
        "scores": scores_table(root),
        "sizes": sizes_table(root),
        "layers": layers_table(root),
    }
    pairs = compare_pairs(root, min_cosine=min_cosine, base=base, labels=labels)
    tables["matching"], tables["features"] = pairs
    summary = {
        "rows": {name: len(rows) for name, rows in tables.items()},
        "profiles": [run.name for run in runs],
        "pairs": [[a.name, b.name] for a, b in same_model_pairs(runs)],
        "skipped": skipped,
        "min_cosine": min_cosine,
    }
    out = Path(out_dir)
    for name, rows in tables.items():
        write_csv(rows, TABLES[name], out / f"{name}.csv")
    write_json(out / "summary.json", summary)
    return summary
