"""Altair charts of pruned graphs and score tables (Altair ships with Streamlit); no Streamlit here."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd

from dashboards.documents import KINDS, prompt_tokens
from dashboards.layout import (
    columns,
    document_layers,
    drawable,
    drawn_labels,
    link_segments,
    node_positions,
    row_labels,
)

KIND_COLOURS = {"token": "#7f7f7f", "feature": "#4c78a8", "error": "#f58518", "logit": "#54a24b"}
SIGN_COLOURS = {"positive": "#2c7bb6", "negative": "#d7191c"}
HISTOGRAM_COLOUR = "#b279a2"
NODE_SELECTION = "node"  # name of the click selection on the nodes layer
PINNED = "pinned"  # the group of pinned nodes that belong to no supernode
PIN_COLOURS = ["#9467bd", "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#ff7f0e", "#1f77b4"]


def _label_expr(labels: list[str]) -> str:
    """A Vega expression mapping an axis value (an index) to its label; JSON is a JS literal."""
    return f"{json.dumps(labels)}[datum.value]"


def _segments(
    links: pd.DataFrame, x: alt.X, y: alt.Y, magnitudes: list[float], widths, **mark
) -> alt.Chart:
    """Links as rules from (x, y) to (x2, y2), stroke width by |weight| over `magnitudes`."""
    width = alt.StrokeWidth(
        "magnitude:Q", scale=alt.Scale(range=list(widths), domain=magnitudes), legend=None
    )
    return (
        alt.Chart(links).mark_rule(**mark).encode(x=x, y=y, x2="x2:Q", y2="y2:Q", strokeWidth=width)
    )


def graph_chart(
    document: dict,
    *,
    selected: str | None = None,
    height: int | None = None,
    pinned: dict[str, str] | None = None,
) -> alt.Chart:
    """The pruned graph: x = token position (prompt tokens as labels), y = emb / layers / logit.

    Nodes coloured by kind, sized by influence (logits by probability); links as segments with
    width and opacity by |weight|, blue positive and red negative. Feature labels are written
    under their nodes where there is room (`layout.drawn_labels`; in full on hover). The
    `selected` node is ringed and its links drawn on top; `pinned` (node_id -> its supernode's
    name, or PINNED) nodes get a ring coloured by group. Clicking a node fills the `node`
    selection (its node_id). `height` in pixels; by default 80 a row, within [420, 900]. A
    document too large to draw is cut as `layout.drawable` says.
    """
    document, _ = drawable(document)
    positions = node_positions(document)
    nodes = pd.DataFrame(positions)
    links = pd.DataFrame(
        link_segments(document, positions),
        columns=["source", "target", "x", "y", "x2", "y2", "weight", "magnitude", "sign"],
    )
    tokens = prompt_tokens(document)
    n_layers = document_layers(document)
    rows = row_labels(n_layers)
    column_list = columns(document)
    centres = [centre for centre, _ in column_list]
    right = centres[-1] + column_list[-1][1] / 2 if centres else 1.0
    x = alt.X(
        "x:Q",
        scale=alt.Scale(domain=[-0.3, right + 0.3], nice=False, zero=False),
        axis=alt.Axis(
            values=centres,
            labelExpr=f"{json.dumps(tokens)}[indexof({json.dumps(centres)}, datum.value)]",
            labelAngle=-30 if len(tokens) <= 12 else -50,
            labelOverlap=False,
            labelFontSize=12,
            grid=False,
            title="prompt token (position)",
        ),
    )
    y = alt.Y(
        "y:Q",
        scale=alt.Scale(domain=[-0.5, n_layers + 1.7], nice=False, zero=False),
        axis=alt.Axis(
            values=sorted(rows),
            labelExpr=_label_expr([rows[i] for i in sorted(rows)]),
            labelFontSize=12,
            title="layer",
        ),
    )
    magnitudes = [0, float(links["magnitude"].max()) if len(links) else 1.0]
    link_layer = _segments(links, x, y, magnitudes, widths=(0.4, 5)).encode(
        color=alt.Color(
            "sign:N",
            scale=alt.Scale(domain=list(SIGN_COLOURS), range=list(SIGN_COLOURS.values())),
            legend=None,  # blue positive, red negative: said in the page's caption
        ),
        opacity=alt.Opacity(
            "magnitude:Q", scale=alt.Scale(range=[0.15, 0.85], domain=magnitudes), legend=None
        ),
        tooltip=[
            alt.Tooltip("source:N"),
            alt.Tooltip("target:N"),
            alt.Tooltip("weight:Q", format=".4f"),
        ],
    )
    selection = alt.selection_point(name=NODE_SELECTION, fields=["node_id"], on="click")
    node_layer = (
        alt.Chart(nodes)
        .mark_circle(stroke="white", strokeWidth=0.8, opacity=0.95)
        .encode(
            x=x,
            y=y,
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=list(KINDS), range=[KIND_COLOURS[k] for k in KINDS]),
                legend=alt.Legend(title="node", orient="bottom"),
            ),
            size=alt.Size(
                "size:Q",
                scale=alt.Scale(range=[25, 700], domain=[0, float(nodes["size"].max() or 1.0)]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip("description:N"),
                alt.Tooltip("node_id:N"),
                alt.Tooltip("influence:Q", format=".4f"),
                alt.Tooltip("activation:Q", format=".3f"),
                alt.Tooltip("label:N"),
            ],
        )
        .add_params(selection)
    )
    layers = [link_layer, node_layer]
    logit_labels = nodes[nodes["kind"] == "logit"].assign(
        text=lambda d: d["clerp"].str.removeprefix("Output ")
    )
    layers.append(
        alt.Chart(logit_labels)
        .mark_text(angle=320, align="left", dx=8, dy=-8, fontSize=11)
        .encode(x=x, y=y, text="text:N")
    )
    labels = pd.DataFrame(
        drawn_labels(document, positions), columns=["node_id", "x", "y", "size", "text", "label"]
    )
    if len(labels):
        layers.append(
            alt.Chart(labels)
            .mark_text(align="center", baseline="top", dy=9, fontSize=10, color="#333333")
            .encode(x=x, y=y, text="text:N", tooltip=[alt.Tooltip("label:N", title="label")])
        )
    ringed = nodes[nodes["node_id"].isin(list(pinned or {}))]
    if len(ringed):
        groups = sorted(set(pinned.values()) - {PINNED})
        domain = [PINNED, *groups]
        layers.append(
            alt.Chart(ringed.assign(group=ringed["node_id"].map(pinned)))
            .mark_point(shape="circle", size=520, filled=False, strokeWidth=3)
            .encode(
                x=x,
                y=y,
                color=alt.Color(
                    "group:N",
                    scale=alt.Scale(
                        domain=domain,
                        range=[PIN_COLOURS[i % len(PIN_COLOURS)] for i in range(len(domain))],
                    ),
                    legend=alt.Legend(title="pinned / supernode", orient="bottom"),
                ),
                tooltip=[alt.Tooltip("group:N", title="group"), alt.Tooltip("node_id:N")],
            )
        )
    if selected is not None and selected in set(nodes["node_id"]):
        touching = links[(links["source"] == selected) | (links["target"] == selected)]
        layers.append(
            _segments(touching, x, y, magnitudes, widths=(0.5, 3.5), color="black", opacity=0.55)
        )
        layers.append(
            alt.Chart(nodes[nodes["node_id"] == selected])
            .mark_point(shape="circle", size=900, filled=False, color="black", strokeWidth=2.5)
            .encode(x=x, y=y)
        )
    return (
        alt.layer(*layers)
        .resolve_scale(color="independent", size="independent", strokeWidth="independent")
        .properties(height=height or min(900, max(420, 80 * (n_layers + 2))))
    )


def curve_chart(curve: list[dict], current: tuple[float, float] | None = None) -> alt.Chart:
    """Pruning curve: nodes kept and the pruned scores against the node threshold of the sweep.

    `current` (node, edge) thresholds are marked with a vertical rule.
    """
    frame = pd.DataFrame(curve)
    base = alt.Chart(frame).encode(
        x=alt.X("node_threshold:Q", title="node threshold", scale=alt.Scale(zero=False))
    )
    tooltip = [
        "node_threshold:Q",
        "edge_threshold:Q",
        "nodes:Q",
        "edges:Q",
        alt.Tooltip("replacement:Q", format=".3f"),
        alt.Tooltip("completeness:Q", format=".3f"),
    ]
    size = base.mark_line(point=True, color="#4c78a8").encode(
        y=alt.Y("nodes:Q", title="nodes kept"), tooltip=tooltip
    )
    scores = (
        base.transform_fold(["replacement", "completeness"], as_=["score", "value"])
        .mark_line(point=True, strokeDash=[4, 2])
        .encode(
            y=alt.Y("value:Q", title="pruned score", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("score:N", legend=alt.Legend(orient="bottom", title=None)),
        )
    )
    panels = [size.properties(height=220), scores.properties(height=220)]
    if current is not None:
        rule = alt.Chart(pd.DataFrame({"node_threshold": [current[0]]})).mark_rule(
            color="black", strokeDash=[2, 2]
        )
        panels = [alt.layer(p, rule.encode(x="node_threshold:Q")) for p in panels]
    return alt.hconcat(*panels).resolve_scale(color="independent")


def layer_count_chart(counts: pd.DataFrame) -> alt.Chart:
    """Grouped bars of node counts per row, bottom row first; columns row, y, graph, count."""
    order = list(counts.sort_values("y")["row"].drop_duplicates())
    return (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            x=alt.X("row:N", sort=order, title=None, axis=alt.Axis(labelAngle=0)),
            xOffset="graph:N",
            y=alt.Y("count:Q", title="nodes"),
            color=alt.Color("graph:N", legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["graph:N", "row:N", "count:Q"],
        )
        .properties(height=260)
    )


def score_bars(scores: pd.DataFrame, metric: str) -> alt.Chart:
    """Bars of one scores.csv column per profile, one bar per prompt."""
    return (
        alt.Chart(scores)
        .mark_bar()
        .encode(
            x=alt.X("profile:N", title=None, axis=alt.Axis(labelAngle=0)),
            xOffset="prompt:N",
            y=alt.Y(f"{metric}:Q", title=metric),
            color=alt.Color("prompt:N", legend=alt.Legend(orient="bottom")),
            tooltip=["profile:N", "prompt:N", alt.Tooltip(f"{metric}:Q", format=".4f")],
        )
        .properties(height=320)
    )


def profile_lines(table: pd.DataFrame, x: str, y: str) -> alt.Chart:
    """A compare table's `y` against `x`: a line per (profile, prompt), colour by profile."""
    return (
        alt.Chart(table)
        .mark_line(point=True)
        .encode(
            x=alt.X(f"{x}:Q", title=x.replace("_", " "), scale=alt.Scale(zero=False)),
            y=alt.Y(f"{y}:Q", title=y.replace("_", " ")),
            color=alt.Color("profile:N", legend=alt.Legend(orient="bottom")),
            strokeDash=alt.StrokeDash("prompt:N", legend=alt.Legend(orient="bottom")),
            tooltip=["profile:N", "prompt:N", f"{x}:Q", alt.Tooltip(f"{y}:Q", format=".4f")],
        )
        .properties(height=300)
    )


def histogram_chart(bins: list[dict]) -> alt.Chart:
    """A feature's activation histogram (`features.histogram_rows`): active tokens per bin."""
    return (
        alt.Chart(pd.DataFrame(bins, columns=["start", "end", "count"]))
        .mark_bar(color=HISTOGRAM_COLOUR)
        .encode(
            x=alt.X("start:Q", bin="binned", title="activation"),
            x2="end:Q",
            y=alt.Y("count:Q", title="tokens"),
            tooltip=[
                alt.Tooltip("start:Q", format=".3f"),
                alt.Tooltip("end:Q", format=".3f"),
                "count:Q",
            ],
        )
        .properties(height=180)
    )
