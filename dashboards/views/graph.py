"""Graph page: one pruned graph, its scores, nodes and links, re-pruned at chosen thresholds; the
picked feature's page and label."""

import pandas as pd
import streamlit as st

from dashboards import pins, widgets
from dashboards.catalog import (
    MissingOutputs,
    curve_image_path,
    default_thresholds,
    graph_file,
    read_run,
)
from dashboards.charts import NODE_SELECTION, curve_chart, graph_chart
from dashboards.documents import node_table, prompt_tokens, strongest_links
from dashboards.features import feature_key
from dashboards.layout import drawable, drawable_threshold, too_big

NODE_KEY, CHART_KEY, LAST_CLICK_KEY = "graph_node", "graph_chart", "graph_last_click"
LINK_COLUMNS = ["node_id", "description", "label", "weight"]

outputs = widgets.load_outputs()
root = outputs.root
profile_name, prompt = widgets.pick_page_graph(outputs)
profile = outputs.profile(profile_name)
pipeline_document = widgets.read_or_stop(widgets.document, root, profile_name, prompt)
scores = widgets.read_or_stop(widgets.scores, root, profile_name, prompt)
default_node, default_edge = default_thresholds(pipeline_document, scores)
full_graph = graph_file(root, profile_name, prompt)

with st.sidebar:
    st.subheader("Pruning")
    node_threshold = st.slider(
        "node threshold",
        0.0,
        1.0,
        round(default_node, 2),
        0.01,
        key=f"node_threshold_{profile_name}_{prompt}",
        disabled=full_graph is None,
        help="Keep the nodes carrying this share of the cumulative influence on the logits.",
    )
    edge_threshold = st.slider(
        "edge threshold",
        0.0,
        1.0,
        round(default_edge, 3),
        0.001,
        format="%.3f",
        key=f"edge_threshold_{profile_name}_{prompt}",
        disabled=full_graph is None,
        help="Then keep the edges carrying this share of the cumulative edge score.",
    )
    if full_graph is None:
        st.caption(
            "The full graph file is not here (run `dvc repro`, or `dvc pull` for a cached "
            "run): showing the pipeline's pruned graph only."
        )
    else:
        st.caption(f"Pipeline default: {default_node:g} / {default_edge:g}")
    widgets.show_skipped(outputs)

at_default = (node_threshold, edge_threshold) == (round(default_node, 2), round(default_edge, 3))
if at_default or full_graph is None:
    document, pruned = pipeline_document, scores
else:
    document, pruned = widgets.repruned(
        full_graph,
        node_threshold,
        edge_threshold,
        prompt_tokens(pipeline_document),
        f"{profile_name}-{prompt}",
    )

st.title(f"{profile_name} / {prompt}")
st.caption(f"{profile.describe()}  \nPrompt: `{pipeline_document['metadata'].get('prompt', '')}`")

full = st.columns(4)
full[0].metric("replacement (full)", f"{scores['replacement']:.4f}")
full[1].metric("completeness (full)", f"{scores['completeness']:.4f}")
full[2].metric("nodes (full)", scores.get("nodes", "?"), help="features, errors, tokens, logits")
full[3].metric("edges (full)", scores.get("edges", "?"), help="non-zero direct effects")
kept = st.columns(4)
change = "Change against the pipeline's pruning at its thresholds."
for column, key, label in (
    (kept[0], "pruned_replacement", "replacement (pruned)"),
    (kept[1], "pruned_completeness", "completeness (pruned)"),
):
    delta = None if at_default else f"{pruned[key] - scores[key]:+.4f}"
    column.metric(label, f"{pruned[key]:.4f}", delta, help=change)
for column, count, key, label in (
    (kept[2], len(document["nodes"]), "pruned_nodes", "nodes (pruned)"),
    (kept[3], len(document["links"]), "pruned_edges", "edges (pruned)"),
):
    column.metric(label, count, None if at_default else count - scores[key], help=change)

# Labels as the pages and the labels file say now (edits show without re-running the pipeline).
document, labelling = widgets.labelled(root, profile, document)

# A click on a node picks it (once per click, so the picker below can still change it), and
# pins or unpins it while "Click pins nodes" is on.
pin_on_click = st.toggle(
    "Click pins nodes",
    key="graph_pin_on_click",
    help="On: a click on a node in the drawing also pins it (or unpins a pinned one).",
)
clicked = (st.session_state.get(CHART_KEY) or {}).get("selection", {}).get(NODE_SELECTION) or []
clicked_id = clicked[0].get("node_id") if clicked else None
if clicked_id and clicked_id != st.session_state.get(LAST_CLICK_KEY):
    st.session_state[LAST_CLICK_KEY] = clicked_id
    st.session_state[NODE_KEY] = clicked_id
    if pin_on_click:
        pins.toggle(profile_name, prompt, clicked_id)

nodes = node_table(document)
ids = [row["node_id"] for row in nodes]
if st.session_state.get(NODE_KEY) not in ids:
    features = [row["node_id"] for row in nodes if row["kind"] == "feature"]
    st.session_state[NODE_KEY] = (features or ids)[0]  # the most influential feature
selected = st.session_state[NODE_KEY]

cannot_draw = too_big(document)
suggestion = drawable_threshold(scores.get("curve") or [])
if cannot_draw:
    st.warning(cannot_draw + suggestion, icon=":material/warning:")
else:
    too_many = drawable(document)[1]
    if too_many:
        st.warning(too_many + suggestion, icon=":material/warning:")
    st.altair_chart(
        graph_chart(
            document, selected=selected, pinned=pins.groups(pins.current(profile_name, prompt))
        ),
        width="stretch",
        key=CHART_KEY,
        on_select="rerun",
        selection_mode=NODE_SELECTION,
    )
    st.caption(
        "x: prompt position; y: embeddings, transcoder layers, logits. Node size: influence on "
        "the logits (logits: probability). Links: direct effects, blue positive, red negative, "
        "width by |weight|. Feature labels are written under the nodes where there is room; hover "
        "a node for its full label; click it (or pick it below) to see its strongest links and, "
        "for a feature, its feature page. Rings: pinned nodes, coloured by supernode."
    )

names = {
    row["node_id"]: row["description"] + (f" · {row['label']}" if row["kind"] == "feature" else "")
    for row in nodes
}
picked = st.selectbox(
    "node",
    ids,
    key=NODE_KEY,
    format_func=lambda node_id: f"{names[node_id]}  ({node_id})",
)
details = next(row for row in nodes if row["node_id"] == picked)
is_pinned = picked in pins.current(profile_name, prompt).pinned
if details["kind"] != "logit" and st.button(
    "Unpin this node" if is_pinned else "Pin this node", key="graph_pin_picked"
):
    pins.toggle(profile_name, prompt, picked)
    st.rerun()
incoming, outgoing = strongest_links(document, picked)
left, middle, right = st.columns([3, 4, 4])
with left:
    st.markdown("**Node**")
    st.dataframe(pd.DataFrame({"value": {k: str(v) for k, v in details.items()}}), width="stretch")
with middle:
    st.markdown(f"**Strongest incoming links** ({len(incoming)} shown)")
    st.dataframe(pd.DataFrame(incoming, columns=LINK_COLUMNS), hide_index=True, width="stretch")
with right:
    st.markdown(f"**Strongest outgoing links** ({len(outgoing)} shown)")
    st.dataframe(pd.DataFrame(outgoing, columns=LINK_COLUMNS), hide_index=True, width="stretch")

with st.expander("All nodes of the pruned graph"):
    st.dataframe(pd.DataFrame(nodes), hide_index=True, width="stretch")

pinnable = {row["node_id"]: names[row["node_id"]] for row in nodes if row["kind"] != "logit"}
pins.editor(root, profile_name, prompt, pinnable, full_graph, pruned)

st.subheader("Feature page")
picked_key = feature_key(next(n for n in document["nodes"] if n["node_id"] == picked))
if picked_key is None:
    st.caption("Pick a feature node (above, or click one) to see its feature page.")
elif labelling.labels is None:
    st.info(labelling.missing, icon=":material/info:")
else:
    widgets.show_feature(
        labelling.page_set, labelling.labels, *picked_key, editable=widgets.label_editing()
    )

st.subheader("Pruning curve")
if scores.get("curve"):
    st.altair_chart(curve_chart(scores["curve"], (node_threshold, edge_threshold)), width="stretch")
    st.caption("Sweep of `pruning.sweep` in params.yaml; the dashed rule is the current threshold.")
image = curve_image_path(root, profile_name, prompt)
if image.is_file():
    with st.expander("The pipeline's plot (pruning_curve.png)"):
        st.image(str(image))
elif not scores.get("curve"):
    st.info("No pruning curve: `pruning.sweep` is empty in params.yaml.")

st.subheader("Validation by interventions")
try:
    report = widgets.validation(root, profile_name, prompt)
except MissingOutputs as err:
    st.info(str(err))
else:
    summary = pd.DataFrame(report.get("summary", {})).T.rename_axis("mode")
    st.dataframe(summary, width="stretch")
    st.caption(
        f"The {report.get('metadata', {}).get('n_nodes', '?')} most influential feature nodes "
        "ablated one at a time: the graph's predicted change of each logit against the measured "
        "one (Spearman rank correlation; relative error |measured - predicted| / max)."
    )
    rows = pd.DataFrame(report.get("rows", []))
    if not rows.empty and details["kind"] == "feature":
        mine = rows[
            (rows["layer"].astype(str) == str(details["layer"]))
            & (rows["pos"] == details["ctx_idx"])
            & (rows["feature"] == details["feature"])
        ]
        if mine.empty:
            st.caption(f"The picked node ({picked}) is not among the validated nodes.")
        else:
            st.markdown(f"**Ablating the picked node** ({picked})")
            st.dataframe(mine, hide_index=True, width="stretch")
    with st.expander("All validation rows"):
        st.dataframe(rows, hide_index=True, width="stretch")

run = read_run(root, profile_name, prompt)
if run:
    with st.expander("Attribution run (seconds per phase, peak memory growth)"):
        st.json(run)
