"""Feature pages on disk: a folder per transcoder set, one safetensors file per layer + an index.

    index.json              format, settings, counts, dataset and model/set identity
    summary.json            per layer: dead features, frequency and maximum spread
    tokens.json             {token id: text} of every token the pages show (no tokenizer needed)
    layer_{i}.safetensors   per feature (leading dim d_transcoder): active, act_max, hist_counts,
                            hist_top, quantile_values, {top,band}_{value,example,position,acts},
                            {top,bottom}_logits, {top,bottom}_logit_values; and `example_tokens`
                            (n_examples, n_ctx) of the examples the layer's pages refer to

Reading one feature reads only its rows (safetensors slices), never a whole layer. Context
activations are stored as float16; a context's own value (`*_value`) stays float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tracer.atomic import atomic_path, write_folder, write_json
from tracer.features.pages import LayerPages, PageSettings

FORMAT = "tracer-feature-pages/1"
INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.json"
SUMMARY_FILE = "summary.json"


class PagesError(ValueError):
    """A pages folder that is missing, corrupt or asked for something it does not hold."""


@dataclass(frozen=True)
class Context:
    """One example of a feature: tokens, the feature's activation at each, the chosen token."""

    tokens: list[int]
    acts: list[float]
    position: int
    value: float


@dataclass(frozen=True)
class FeaturePage:
    """Everything the pages say about one feature."""

    layer: int
    feature: int
    n_tokens: int
    active: int
    act_max: float
    histogram: list[int]  # counts over `histogram_top` / bins wide bins from 0
    histogram_top: float
    quantiles: list[float]  # band edges (settings.quantiles of the activation distribution)
    quantile_values: list[float]
    top: list[Context]
    bands: list[list[Context]]  # band 0 (lowest) ... band n (highest)
    top_logits: list[tuple[int, float]]
    bottom_logits: list[tuple[int, float]]

    @property
    def frequency(self) -> float:
        return self.active / self.n_tokens if self.n_tokens else 0.0


def layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer_{layer}.safetensors"


def save_pages(
    folder: str | Path,
    pages: list[LayerPages],
    settings: PageSettings,
    token_text,
    identity: dict,
) -> Path:
    """Write a pages folder atomically. `token_text(ids) -> list[str]` decodes single tokens;
    `identity` (model, transcoders, dataset, ...) goes into the index as given."""
    shown: set[int] = set()

    def fill(tmp: Path) -> None:
        for layer, page in enumerate(pages):
            tensors = _layer_tensors(page)
            shown.update(tensors["example_tokens"].unique().tolist())
            for name in ("top_logits", "bottom_logits"):
                shown.update(tensors[name].unique().tolist())
            with atomic_path(layer_file(tmp, layer)) as path:
                save_file(tensors, path)
        write_json(tmp / SUMMARY_FILE, pages_summary(pages))
        ids = sorted(t for t in shown if t >= 0)
        write_json(tmp / TOKENS_FILE, dict(zip(map(str, ids), token_text(ids), strict=True)))
        first = pages[0]
        write_json(
            tmp / INDEX_FILE,
            {
                "format": FORMAT,
                "n_layers": len(pages),
                "d_transcoder": int(first.active.shape[0]),
                "n_tokens": first.n_tokens,
                "settings": {
                    **settings.__dict__,
                    "quantiles": list(settings.quantiles),
                },
                **identity,
            },
        )

    return write_folder(folder, fill)


def pages_summary(pages: list[LayerPages]) -> dict:
    """Per layer: features never active, and the spread of activation frequencies and maxima."""
    layers = []
    for layer, page in enumerate(pages):
        frequency = page.frequency
        alive = page.active > 0
        layers.append(
            {
                "layer": layer,
                "features": int(alive.numel()),
                "dead": int((~alive).sum()),
                "frequency_median": float(frequency.median()),
                "frequency_max": float(frequency.max()),
                "dense_above_10pct": int((frequency > 0.1).sum()),
                "act_max_median": float(page.act_max[alive].median()) if alive.any() else 0.0,
            }
        )
    return {"n_tokens": pages[0].n_tokens, "layers": layers}


def _layer_tensors(page: LayerPages) -> dict[str, torch.Tensor]:
    tables = {"top": page.top, "band": page.bands}
    used = torch.cat([t.example.flatten() for t in tables.values()])
    example_ids, rows = torch.unique(used[used >= 0], return_inverse=True)
    # the table of referenced examples: one row per example, its tokens from any entry showing it
    n_ctx = page.top.tokens.shape[2]
    example_tokens = torch.full((len(example_ids), n_ctx), -1, dtype=torch.long)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for prefix, table in tables.items():
        filled = table.example >= 0
        index = torch.full_like(table.example, -1)
        n = int(filled.sum())
        index[filled] = rows[offset : offset + n]
        offset += n
        example_tokens[index[filled]] = table.tokens[filled].cpu()
        tensors |= {
            f"{prefix}_value": table.values.float(),
            f"{prefix}_example": index.int(),
            f"{prefix}_position": table.position.int(),
            f"{prefix}_acts": table.acts.half(),
        }
    tensors |= {
        "active": page.active,
        "act_max": page.act_max.float(),
        "hist_counts": page.hist_counts,
        "hist_top": page.hist_top.float(),
        "quantile_values": page.quantile_values.float(),
        "top_logits": page.top_logits.int(),
        "top_logit_values": page.top_logit_values.float(),
        "bottom_logits": page.bottom_logits.int(),
        "bottom_logit_values": page.bottom_logit_values.float(),
        "example_tokens": example_tokens.int(),
    }
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


class FeaturePages:
    """A pages folder opened for reading: `page(layer, feature)` reads one feature's rows."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise PagesError(f"{self.folder} is not a feature pages folder (no {INDEX_FILE})")
        self.index = _read_json(index_path)
        if self.index.get("format") != FORMAT:
            raise PagesError(
                f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}"
            )
        self.tokens = {int(k): v for k, v in _read_json(self.folder / TOKENS_FILE).items()}
        self.n_layers = int(self.index["n_layers"])
        self.d_transcoder = int(self.index["d_transcoder"])
        self.quantiles = [float(q) for q in self.index["settings"]["quantiles"]]

    def text(self, token: int) -> str:
        return self.tokens.get(token, f"<{token}>")

    def check(self, layer: int, feature: int) -> None:
        if not 0 <= layer < self.n_layers or not 0 <= feature < self.d_transcoder:
            raise PagesError(
                f"no feature {layer}:{feature} in {self.folder}: layers 0..{self.n_layers - 1}, "
                f"features 0..{self.d_transcoder - 1}"
            )

    def page(self, layer: int, feature: int) -> FeaturePage:
        self.check(layer, feature)
        path = layer_file(self.folder, layer)
        try:
            with safe_open(path, "pt") as handle:
                row = {name: handle.get_slice(name)[feature] for name in _ROW_TENSORS}
                examples = handle.get_slice("example_tokens")
                top = _contexts(row, "top", examples)
                band = _contexts(row, "band", examples)
        except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
            raise PagesError(f"{path} is missing or corrupt: {error}") from error
        per_band = int(self.index["settings"]["examples_per_band"])
        bands = [
            [c for c in band[b * per_band : (b + 1) * per_band] if c is not None]
            for b in range(len(self.quantiles) + 1)
        ]
        return FeaturePage(
            layer=layer,
            feature=feature,
            n_tokens=int(self.index["n_tokens"]),
            active=int(row["active"]),
            act_max=float(row["act_max"]),
            histogram=row["hist_counts"].tolist(),
            histogram_top=float(row["hist_top"]),
            quantiles=self.quantiles,
            quantile_values=row["quantile_values"].tolist(),
            top=[c for c in top if c is not None],
            bands=bands,
            top_logits=list(
                zip(row["top_logits"].tolist(), row["top_logit_values"].tolist(), strict=True)
            ),
            bottom_logits=list(
                zip(row["bottom_logits"].tolist(), row["bottom_logit_values"].tolist(), strict=True)
            ),
        )

    def layer_summary(self, layer: int) -> dict[str, torch.Tensor]:
        """Small per-feature vectors of a layer (active counts, maxima) for tables."""
        path = layer_file(self.folder, layer)
        try:
            with safe_open(path, "pt") as handle:
                return {name: handle.get_tensor(name) for name in ("active", "act_max")}
        except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
            raise PagesError(f"{path} is missing or corrupt: {error}") from error


_ROW_TENSORS = (
    "active",
    "act_max",
    "hist_counts",
    "hist_top",
    "quantile_values",
    "top_logits",
    "top_logit_values",
    "bottom_logits",
    "bottom_logit_values",
    *(f"{p}_{n}" for p in ("top", "band") for n in ("value", "example", "position", "acts")),
)


def _contexts(row: dict, prefix: str, examples) -> list[Context | None]:
    out: list[Context | None] = []
    for slot, example in enumerate(row[f"{prefix}_example"].tolist()):
        if example < 0:
            out.append(None)
            continue
        tokens = examples[example].tolist()
        length = sum(1 for t in tokens if t >= 0)
        out.append(
            Context(
                tokens=tokens[:length],
                acts=row[f"{prefix}_acts"][slot, :length].float().tolist(),
                position=int(row[f"{prefix}_position"][slot]),
                value=float(row[f"{prefix}_value"][slot]),
            )
        )
    return out


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PagesError(f"{path} is missing or corrupt: {error}") from error
    if not isinstance(document, dict):
        raise PagesError(f"{path} is corrupt: expected a JSON object")
    return document
