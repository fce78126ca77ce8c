"""Where each node of a pruned graph is drawn: the usual attribution-graph layout.

x runs over the prompt's positions (`ctx_idx`) left to right, y over rows: token embeddings at
0, transcoder layer l (its features and its error nodes) at l + 1, logits at n_layers + 1 on top.
Nodes sharing a (row, position) cell sit side by side, most influential first, wrapping into up
to MAX_LINES lines within the row when crowded. Each position is a column at least one unit wide
and wider when one of its cells needs the room, so crowded positions do not pile up nodes.
Logits all belong to the last position: they are lined up leftwards from it along the top row,
most probable rightmost, so that their labels do not overlap.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from dashboards.documents import describe_node, node_kind, node_label, prompt_tokens

NODE_GAP = 0.25  # x distance between neighbours in a cell, in units (a plain column is 1 wide)
COLUMN_MARGIN = 0.5  # free x room between the outer nodes of neighbouring columns
PER_LINE = 8  # a cell with more nodes wraps into lines ...
MAX_LINES = 4  # ... at most this many (then lines get longer)
LINE_GAP = 0.2  # y distance between the lines of a cell, in rows
LOGIT_GAP = 1.0  # x distance between logits on the top row (less if the prompt is short)
# A browser draws a few thousand marks well; a graph pruned at thresholds near 1 has far more.
MAX_DRAWN_NODES = 1500
MAX_DRAWN_LINKS = 4000
# Past this, even cutting the document down takes long enough to freeze the page: nothing is drawn.
MAX_DRAWABLE_NODES = 20_000
MAX_DRAWABLE_LINKS = 200_000
# Feature labels written on the drawing: at most this many, about this many characters per unit of
# x room (a plain column is one unit), never shorter than MIN_LABEL characters.
MAX_DRAWN_LABELS = 120
CHARS_PER_UNIT = 14
MIN_LABEL = 6


def document_layers(document: dict) -> int:
    """Number of transcoder layers: the logit row is n_layers + 1 in the viewer format."""
    logits = [int(n["layer"]) for n in document["nodes"] if node_kind(n) == "logit"]
    if logits:
        return max(logits) - 1
    layers = [int(n["layer"]) for n in document["nodes"] if node_kind(n) in ("feature", "error")]
    return max(layers, default=-1) + 1


def node_row(node: dict, n_layers: int) -> int:
    """y of a node: 0 for tokens, layer + 1 for features and errors, n_layers + 1 for logits."""
    kind = node_kind(node)
    if kind == "token":
        return 0
    if kind == "logit":
        return n_layers + 1
    return int(node["layer"]) + 1


def row_labels(n_layers: int) -> dict[int, str]:
    """y -> axis label: `emb`, `L0` ... `L{n-1}`, `logit`."""
    labels = {0: "emb", n_layers + 1: "logit"}
    labels |= {layer + 1: f"L{layer}" for layer in range(n_layers)}
    return labels


def _line_lengths(count: int) -> list[int]:
    """Lengths of the lines a cell of `count` nodes wraps into, longest first."""
    lines = min(MAX_LINES, math.ceil(count / PER_LINE))
    per_line = math.ceil(count / lines)
    return [min(per_line, count - line * per_line) for line in range(lines)]


def cell_offsets(count: int) -> list[tuple[float, float]]:
    """(dx, dy) of `count` nodes in one cell around its centre, line by line from the top."""
    lengths = _line_lengths(count)
    offsets = []
    for line, length in enumerate(lengths):
        dy = ((len(lengths) - 1) / 2 - line) * LINE_GAP
        offsets += [((i - (length - 1) / 2) * NODE_GAP, dy) for i in range(length)]
    return offsets


def columns(document: dict) -> list[tuple[float, float]]:
    """(centre x, width) of every prompt position's column, left to right, touching."""
    n_layers = document_layers(document)
    cells = Counter(
        (int(n["ctx_idx"]), node_row(n, n_layers))
        for n in document["nodes"]
        if node_kind(n) != "logit"
    )
    widths = [1.0] * len(prompt_tokens(document))
    for (pos, _), count in cells.items():
        needed = NODE_GAP * (_line_lengths(count)[0] - 1) + COLUMN_MARGIN
        widths[pos] = max(widths[pos], needed)
    placed, left = [], 0.0
    for width in widths:
        placed.append((left + width / 2, width))
        left += width
    return placed


def node_weight(node: dict) -> float:
    """What a node's size shows: influence on the logits, or a logit's probability."""
    if node_kind(node) == "logit":
        return float(node.get("token_prob") or 0.0)
    return float(node.get("influence") or 0.0)


def node_positions(document: dict) -> list[dict]:
    """Every node of the document with x, y, kind, size (see `node_weight`), token, description,
    label (`documents.node_label`)."""
    n_layers = document_layers(document)
    tokens = prompt_tokens(document)
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for node in document["nodes"]:
        cells[(node_row(node, n_layers), int(node["ctx_idx"]))].append(node)
    centres = [centre for centre, _ in columns(document)]
    placed = []
    for (row, pos), nodes in sorted(cells.items()):
        # features before errors, then by weight: the strongest sit first (top left)
        nodes = sorted(nodes, key=lambda n: (node_kind(n) == "error", -node_weight(n)))
        if row == n_layers + 1:
            gap = min(LOGIT_GAP, (centres[pos] - centres[0]) / max(len(nodes) - 1, 1))
            offsets = [(-gap * i, 0.0) for i in range(len(nodes))]
        else:
            offsets = cell_offsets(len(nodes))
        for node, (dx, dy) in zip(nodes, offsets, strict=True):
            placed.append(
                {
                    "node_id": node["node_id"],
                    "kind": node_kind(node),
                    "x": centres[pos] + dx,
                    "y": row + dy,
                    "row": row,
                    "ctx_idx": pos,
                    "layer": str(node["layer"]),
                    "feature": node.get("feature"),
                    "size": node_weight(node),
                    "influence": node.get("influence"),
                    "activation": node.get("activation"),
                    "token": tokens[pos] if pos < len(tokens) else str(pos),
                    "description": describe_node(node, tokens),
                    "clerp": node.get("clerp") or "",
                    "label": node_label(node),
                }
            )
    return placed


def drawable(
    document: dict, max_nodes: int = MAX_DRAWN_NODES, max_links: int = MAX_DRAWN_LINKS
) -> tuple[dict, str | None]:
    """The document cut to what a browser can draw, and a sentence saying what was left out.

    Keeps every token and logit, the most influential other nodes up to `max_nodes` in all, and
    of the links between kept nodes the `max_links` largest by |weight|.
    """
    nodes, links = document["nodes"], document["links"]
    if len(nodes) <= max_nodes and len(links) <= max_links:
        return document, None
    always = [n for n in nodes if node_kind(n) in ("token", "logit")]
    others = sorted(
        (n for n in nodes if node_kind(n) not in ("token", "logit")), key=lambda n: -node_weight(n)
    )
    kept = always + others[: max(0, max_nodes - len(always))]
    ids = {n["node_id"] for n in kept}
    between = [lk for lk in links if lk["source"] in ids and lk["target"] in ids]
    between = sorted(between, key=lambda lk: -abs(lk["weight"]))[:max_links]
    note = (
        f"Drawing {len(kept)} of {len(nodes)} nodes (the most influential) and {len(between)} of "
        f"{len(links)} links (the largest); lower the thresholds for a complete drawing."
    )
    return dict(document, nodes=kept, links=between), note


def too_big(document: dict) -> str | None:
    """A sentence saying the document is too large to draw at all, with what to do; None when it
    can be drawn (perhaps cut, see `drawable`)."""
    nodes, links = len(document["nodes"]), len(document["links"])
    if nodes <= MAX_DRAWABLE_NODES and links <= MAX_DRAWABLE_LINKS:
        return None
    return (
        f"This graph has {nodes:,} nodes and {links:,} links: too many to draw (at most "
        f"{MAX_DRAWABLE_NODES:,} nodes and {MAX_DRAWABLE_LINKS:,} links). Prune harder: lower the "
        "node threshold (fewer nodes carry less of the influence) or the edge threshold."
    )


def drawable_threshold(curve: list[dict], max_nodes: int | None = None) -> str:
    """A sentence naming the largest node threshold of the pruning curve (`scores.json`'s
    `curve`) whose pruned graph has at most `max_nodes` nodes (by default what is drawn whole,
    MAX_DRAWN_NODES); empty when none does."""
    max_nodes = MAX_DRAWN_NODES if max_nodes is None else max_nodes
    fitting = [p for p in curve or [] if p.get("nodes") is not None and p["nodes"] <= max_nodes]
    if not fitting:
        return ""
    best = max(fitting, key=lambda p: p["node_threshold"])
    return (
        f" On the pruning curve, node threshold {best['node_threshold']:g} (edge threshold "
        f"{best['edge_threshold']:g}) keeps {best['nodes']:,} nodes."
    )


def short_label(text: str, room: float) -> str:
    """`text` cut to about `room` units of x space (an ellipsis marks the cut)."""
    limit = max(MIN_LABEL, int(room * CHARS_PER_UNIT))
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def drawn_labels(document: dict, positions: list[dict]) -> list[dict]:
    """Feature labels to write beside their nodes where there is room: the strongest feature of
    each (row, position) cell, its label cut to the room its column leaves (a cell's only node
    gets the column's width, a shared cell's strongest node half of it), the most influential
    MAX_DRAWN_LABELS of them. Rows: node_id, x, y, text (the cut label), label (in full)."""
    widths = [width for _, width in columns(document)]
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for p in positions:
        if p["kind"] == "feature" and p["label"]:
            cells[(p["row"], p["ctx_idx"])].append(p)
    crowd = Counter((p["row"], p["ctx_idx"]) for p in positions if p["kind"] != "logit")
    labelled = []
    for (row, pos), nodes in cells.items():
        strongest = max(nodes, key=lambda p: p["size"])
        # a cell's only node has its column's width; in a shared cell the strongest node (first
        # on the top line) gets half of it, centred on it, so the text stays within the column
        room = widths[pos] if crowd[(row, pos)] == 1 else widths[pos] / 2
        labelled.append(
            {
                "node_id": strongest["node_id"],
                "x": strongest["x"],
                "y": strongest["y"],
                "size": strongest["size"],
                "text": short_label(strongest["label"], room),
                "label": strongest["label"],
            }
        )
    labelled.sort(key=lambda p: -p["size"])
    return labelled[:MAX_DRAWN_LABELS]


def link_segments(document: dict, positions: list[dict]) -> list[dict]:
    """One segment per link, from its source's (x, y) to its target's (x2, y2).

    `weight` is the direct effect, `magnitude` its absolute value, `sign` positive/negative.
    """
    where = {p["node_id"]: (p["x"], p["y"]) for p in positions}
    segments = []
    for link in document["links"]:
        source, target = where.get(link["source"]), where.get(link["target"])
        if source is None or target is None:
            continue
        weight = float(link["weight"])
        segments.append(
            {
                "source": link["source"],
                "target": link["target"],
                "x": source[0],
                "y": source[1],
                "x2": target[0],
                "y2": target[1],
                "weight": weight,
                "magnitude": abs(weight),
                "sign": "positive" if weight >= 0 else "negative",
            }
        )
    return segments


def layer_counts(documents: dict[str, dict]) -> list[dict]:
    """Node counts per drawing row and kind of each named document.

    Rows: `graph` (the name), `row` (its label), `y` (its height), `kind`, `count`.
    """
    rows = []
    for name, document in documents.items():
        n_layers = document_layers(document)
        labels = row_labels(n_layers)
        counts = Counter((node_row(n, n_layers), node_kind(n)) for n in document["nodes"])
        for (y, kind), count in sorted(counts.items()):
            rows.append({"graph": name, "row": labels[y], "y": y, "kind": kind, "count": count})
    return rows
