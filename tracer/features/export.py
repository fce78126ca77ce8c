"""Export pages to the reference tool's feature JSON (one file per feature), for its graph frontend.

Files are `OUT/{transcoder_id}/{index}.json` with `index` the viewer node's `feature` field (the
Cantor pairing of layer and feature), fields as DESIGN.md section 4 lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tracer.atomic import write_folder, write_json
from tracer.features.storage import Context, FeaturePage, FeaturePages
from tracer.graph.viewer import cantor_pairing


def feature_document(
    page: FeaturePage, transcoder_id: str, text: Callable[[int], str], label: str | None = None
) -> dict:
    """One feature's page in the reference format."""
    seen: set[tuple[int, ...]] = set()

    def example(context: Context) -> dict:
        key = tuple(context.tokens)
        repeated = key in seen
        seen.add(key)
        return {
            "tokens": [text(t) for t in context.tokens],
            "tokens_acts_list": [round(a, 6) for a in context.acts],
            "train_token_ind": context.position,
            "is_repeated_datapoint": repeated,
        }

    quantiles = [{"quantile_name": "Top activations", "examples": [example(c) for c in page.top]}]
    edges = [0.0, *page.quantiles, 1.0]
    for b in reversed(range(len(page.bands))):  # highest band first, as top activations
        name = f"Quantile {edges[b]:g}-{edges[b + 1]:g}"
        seen.clear()
        quantiles.append({"quantile_name": name, "examples": [example(c) for c in page.bands[b]]})
    acts = [a for band in page.bands for c in band for a in c.acts] + [
        a for c in page.top for a in c.acts
    ]
    width = page.histogram_top / len(page.histogram)
    document = {
        "transcoder_id": transcoder_id,
        "index": cantor_pairing(page.layer, page.feature),
        "layer": page.layer,
        "feature": page.feature,
        "examples_quantiles": quantiles,
        "top_logits": [text(t) for t, _ in page.top_logits],
        "bottom_logits": [text(t) for t, _ in page.bottom_logits],
        "act_min": min(acts, default=0.0),
        "act_max": page.act_max,
        "quantile_values": page.quantile_values,
        "histogram": {
            "counts": page.histogram,
            "edges": [i * width for i in range(len(page.histogram) + 1)],
        },
        "activation_frequency": page.frequency,
    }
    if label:
        document["description"] = label
    return document


def export_circuit_tracer(
    pages: FeaturePages,
    out: str | Path,
    transcoder_id: str,
    labels: Callable[[int, int], str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write every feature's document under `out/transcoder_id/` (atomically, as one folder)."""

    def fill(tmp: Path) -> None:
        for layer in range(pages.n_layers):
            for feature in range(pages.d_transcoder):
                page = pages.page(layer, feature)
                label = labels(layer, feature) if labels else None
                document = feature_document(page, transcoder_id, pages.text, label)
                write_json(tmp / f"{document['index']}.json", document, indent=None)
            if progress is not None:
                progress(pages.d_transcoder)

    return write_folder(Path(out) / transcoder_id, fill)
