"""Feature pages in the explorer: contexts as highlighted HTML, histogram and logit rows, labels
on a graph document's feature nodes. No Streamlit here.

A page is `tracer.features.storage.FeaturePage`; token texts come from the pages folder
(`FeaturePages.text`), so no tokenizer is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from dashboards.documents import feature_index, node_kind, prompt_tokens
from tracer.features.storage import Context, FeaturePage

HIGHLIGHT = (255, 127, 14)  # the context colour; its opacity is activation / act_max


def feature_key(node: dict) -> tuple[int, int] | None:
    """(layer, feature index) of a feature node of a viewer document, None for other nodes."""
    if node_kind(node) != "feature":
        return None
    return int(node["layer"]), feature_index(node)


def with_labels(document: dict, label_of: Callable[[int, int], str]) -> dict:
    """A copy of the document whose feature nodes carry `label` = label_of(layer, feature).

    Labels come from the pages and the labels file as they are now, so a label edited in the
    app shows without re-running the pipeline (the document's `clerp` is the prune stage's).
    """
    nodes = []
    for node in document["nodes"]:
        key = feature_key(node)
        nodes.append(node if key is None else {**node, "label": label_of(*key)})
    return {**document, "nodes": nodes}


def opacity(act: float, act_max: float) -> float:
    """Highlight strength of one token: act / act_max clipped to [0, 1] (0 if never active)."""
    if act_max <= 0 or act <= 0:
        return 0.0
    return min(act / act_max, 1.0)


def context_html(context: Context, text: Callable[[int], str], act_max: float) -> str:
    """One example as a line of token spans, each shaded by its activation over the feature's
    maximum, the example's chosen token underlined; the activation shows on hover."""
    spans = []
    for position, (token, act) in enumerate(zip(context.tokens, context.acts, strict=True)):
        # a small gap shows token boundaries (word-level vocabularies decode without spaces)
        style = f"margin-right: 3px; background-color: rgba{(*HIGHLIGHT, round(opacity(act, act_max), 3))}"
        if position == context.position:
            style += "; border-bottom: 2px solid #222"
        # `+ 0.0`: a float16 -0.0 (a ReLU's zero) shows as 0.000
        spans.append(
            f'<span class="token" title="{act + 0.0:.3f}" style="{style}">{escape(text(token))}</span>'
        )
    return "".join(spans)


def contexts_html(
    title: str, contexts: list[Context], text: Callable[[int], str], act_max: float
) -> str:
    """A titled block of examples, one per line, each led by its activation."""
    lines = [
        '<div class="context" style="display: flex; gap: 0.6em">'
        f"<code>{c.value:7.3f}</code><div>{context_html(c, text, act_max)}</div></div>"
        for c in contexts
    ]
    body = "".join(lines) or "<div><em>no examples</em></div>"
    return (
        '<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.9; '
        f'margin-bottom: 0.8em"><div><strong>{escape(title)}</strong></div>{body}</div>'
    )


def band_titles(page: FeaturePage) -> list[str]:
    """Titles of the quantile bands, lowest first: `quantile 0.5-0.9 (activation 1.2 to 3.4)`."""
    edges = [0.0, *page.quantiles, 1.0]
    values = [0.0, *page.quantile_values, page.act_max]
    return [
        f"Quantile {edges[b]:g}-{edges[b + 1]:g} (activation {values[b]:.3g} to "
        f"{values[b + 1]:.3g})"
        for b in range(len(page.bands))
    ]


def page_html(page: FeaturePage, text: Callable[[int], str]) -> str:
    """The examples of a page: top activations, then the bands from the highest down."""
    blocks = [contexts_html("Top activations", page.top, text, page.act_max)]
    titles = band_titles(page)
    for band in reversed(range(len(page.bands))):
        blocks.append(contexts_html(titles[band], page.bands[band], text, page.act_max))
    return "".join(blocks)


def histogram_rows(page: FeaturePage) -> list[dict]:
    """The activation histogram as bins: start, end (activation), count of active tokens."""
    width = page.histogram_top / len(page.histogram) if page.histogram else 0.0
    return [
        {"start": i * width, "end": (i + 1) * width, "count": count}
        for i, count in enumerate(page.histogram)
    ]


def logit_rows(pairs: list[tuple[int, float]], text: Callable[[int], str]) -> list[dict]:
    """Output logits as rows: token text, token id, effect per unit activation."""
    return [{"token": text(token), "token_id": token, "effect": value} for token, value in pairs]


def feature_nodes(document: dict) -> list[dict]:
    """The features of a document's feature nodes, one row each (a feature may sit at several
    positions), the most influential first: layer, feature, positions, influence (the largest),
    label (when `with_labels` set it), description."""
    tokens = prompt_tokens(document)
    rows: dict[tuple[int, int], dict] = {}
    for node in document["nodes"]:
        key = feature_key(node)
        if key is None:
            continue
        pos = int(node["ctx_idx"])
        row = rows.setdefault(
            key,
            {
                "layer": key[0],
                "feature": key[1],
                "positions": [],
                "influence": 0.0,
                "label": node.get("label", ""),
            },
        )
        row["positions"].append(pos)
        row["influence"] = max(row["influence"], float(node.get("influence") or 0.0))
    for row in rows.values():
        where = ", ".join(
            f"{p} {tokens[p]!r}" if p < len(tokens) else str(p) for p in row["positions"]
        )
        row["description"] = f"feature L{row['layer']} #{row['feature']} @ {where}"
    return sorted(rows.values(), key=lambda r: -r["influence"])


def match_table(
    document_a: dict,
    document_b: dict,
    matches: dict[tuple[int, int], tuple[int, float]],
    label_b: Callable[[int, int], str] | None = None,
) -> list[dict]:
    """A's features (`feature_nodes`, labels from `with_labels`) next to their matches in B's set.

    `matches[(layer, feature_a)] = (feature_b, cosine)`; unmatched features have empty B columns.
    `in_b_at`: the positions where B's pruned graph has the matched feature.
    """
    in_b = {(r["layer"], r["feature"]): r["positions"] for r in feature_nodes(document_b)}
    rows = []
    for row in feature_nodes(document_a):
        layer = row["layer"]
        match = matches.get((layer, row["feature"]))
        b = None if match is None else match[0]
        rows.append(
            {
                "layer": layer,
                "feature_a": row["feature"],
                "label_a": row["label"],
                "positions_a": row["positions"],
                "influence_a": row["influence"],
                "feature_b": b,
                "cosine": None if match is None else match[1],
                "label_b": label_b(layer, b) if label_b is not None and b is not None else "",
                "in_b_at": in_b.get((layer, b), []),
            }
        )
    return rows
