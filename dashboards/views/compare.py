"""Compare page: two pruned graphs side by side (any two profile / prompt pairs), and A's
features next to their matches in B, with labels and feature pages."""

import pandas as pd
import streamlit as st

from dashboards import widgets
from dashboards.catalog import MissingOutputs, default_pair, matching_rows
from dashboards.charts import graph_chart, layer_count_chart
from dashboards.documents import score_deltas, shared_nodes
from dashboards.features import feature_nodes, match_table
from dashboards.layout import layer_counts

FEATURE_KEY = "compare_feature"

outputs = widgets.load_outputs()
root = outputs.root
first, second = default_pair(outputs)
# the Runs page opens two runs here with ?a=PROFILE&b=PROFILE&prompt_a=PROMPT&prompt_b=PROMPT
asked = st.query_params

st.title("Compare two graphs")
pick_a, pick_b = st.columns(2)
with pick_a:
    profile_a, prompt_a = widgets.pick_graph(
        outputs,
        "compare_a",
        label="A: ",
        default_profile=asked.get("a", first),
        default_prompt=asked.get("prompt_a"),
    )
with pick_b:
    profile_b, prompt_b = widgets.pick_graph(
        outputs,
        "compare_b",
        label="B: ",
        default_profile=asked.get("b", second),
        default_prompt=asked.get("prompt_b", prompt_a),
    )
with st.sidebar:
    widgets.show_skipped(outputs)

info_a, info_b = outputs.profile(profile_a).info, outputs.profile(profile_b).info
doc_a = widgets.read_or_stop(widgets.document, root, profile_a, prompt_a)
doc_b = widgets.read_or_stop(widgets.document, root, profile_b, prompt_b)
scores_a = widgets.read_or_stop(widgets.scores, root, profile_a, prompt_a)
scores_b = widgets.read_or_stop(widgets.scores, root, profile_b, prompt_b)
doc_a, labelling_a = widgets.labelled(root, outputs.profile(profile_a), doc_a)
doc_b, labelling_b = widgets.labelled(root, outputs.profile(profile_b), doc_b)
same_model = info_a.get("model") == info_b.get("model")
same_tokens = doc_a["metadata"].get("prompt_tokens") == doc_b["metadata"].get("prompt_tokens")
same_set = same_model and info_a.get("transcoders") == info_b.get("transcoders")

for column, name in ((pick_a, profile_a), (pick_b, profile_b)):
    column.caption(outputs.profile(name).describe())

st.subheader("Scores")
deltas = score_deltas(scores_a, scores_b)
metrics = st.columns(4)
for column, row in zip(metrics, deltas[:4], strict=False):
    column.metric(f"B: {row['metric']}", f"{row['b']:.4f}", f"{row['b_minus_a']:+.4f} vs A")
st.dataframe(
    pd.DataFrame(deltas)
    .drop(columns="key")
    .rename(
        columns={
            "a": f"A ({profile_a} / {prompt_a})",
            "b": f"B ({profile_b} / {prompt_b})",
            "b_minus_a": "B - A",
        }
    ),
    hide_index=True,
    width="stretch",
)

st.subheader("Pruned graphs")
draw_a, draw_b = st.columns(2)
for column, tag, name, prompt, doc in (
    (draw_a, "A", profile_a, prompt_a, doc_a),
    (draw_b, "B", profile_b, prompt_b, doc_b),
):
    with column:
        st.markdown(f"**{tag}: {name} / {prompt}** ({len(doc['nodes'])} nodes)")
        st.altair_chart(graph_chart(doc, height=420), width="stretch")

st.subheader("Nodes per layer")
counts = pd.DataFrame(layer_counts({"A": doc_a, "B": doc_b}))
per_row = counts.groupby(["row", "y", "graph"], as_index=False)["count"].sum()
chart_column, table_column = st.columns([3, 2])
chart_column.altair_chart(layer_count_chart(per_row), width="stretch")
table_column.dataframe(
    counts.pivot_table(index=["y", "row", "kind"], columns="graph", values="count")
    .fillna(0)
    .astype(int)
    .sort_index(ascending=False)
    .droplevel("y"),
    width="stretch",
)

st.subheader("Nodes shared by id")
if not (same_model and same_tokens):
    st.info(
        "The two graphs are of different models or prompts: node ids (layer, feature, position) "
        "do not name the same nodes, so no overlap by id is shown."
    )
else:
    st.dataframe(pd.DataFrame(shared_nodes(doc_a, doc_b)), hide_index=True, width="stretch")
    if not same_set:
        st.caption(
            "Different transcoder sets: token, error and logit ids match, but feature number k "
            "of one set is not feature k of the other. The matching table below pairs features "
            "by decoder cosine."
        )

st.subheader("Feature matching (compare stage)")
if not same_model or profile_a == profile_b:
    st.info("Feature matching is computed for two transcoder sets of the same model.")
else:
    shared_prompt = prompt_a if prompt_a == prompt_b else None
    try:
        rows, summary = matching_rows(root, profile_a, profile_b, shared_prompt)
    except MissingOutputs as err:
        st.info(str(err))
    else:
        st.dataframe(rows, hide_index=True, width="stretch")
        st.caption(
            "Each A feature matched to the B feature with the most similar decoder; "
            "kept_fraction: share of A's pruned features whose match B's pruned graph keeps. "
            f"Cosine threshold {summary.get('min_cosine', '?')}."
        )

st.subheader("Features of A and their matches in B")
if not same_model:
    st.info("Features are matched between two transcoder sets of the same model.")
    st.stop()
keys = [(row["layer"], row["feature"]) for row in feature_nodes(doc_a)]
try:
    matches = widgets.feature_matches(root, info_a, info_b, keys)
except MissingOutputs as err:
    st.info(str(err))
    st.stop()
rows = match_table(doc_a, doc_b, matches, labelling_b.labels)
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption(
    ("One transcoder set: each feature is itself in B. " if same_set else "")
    + "Each feature node of A's pruned graph (most influential first) and the B feature with the "
    "most similar own-layer decoder (cosine); in_b_at: positions where B's pruned graph has it."
)
if not rows:
    st.stop()
names = {i: f"L{r['layer']} #{r['feature_a']} · {r['label_a']}" for i, r in enumerate(rows)}
if st.session_state.get(FEATURE_KEY) not in names:
    st.session_state[FEATURE_KEY] = 0  # the most influential
picked = st.selectbox(
    "A feature",
    list(names),
    format_func=names.get,
    key=FEATURE_KEY,
    help="Its page and its match's, side by side.",
)
row = rows[picked]
editable = widgets.label_editing()
page_a, page_b = st.columns(2)
for column, tag, labelling, feature in (
    (page_a, "A", labelling_a, row["feature_a"]),
    (page_b, "B", labelling_b, row["feature_b"]),
):
    with column:
        st.markdown(f"#### {tag}: feature L{row['layer']} #{feature}")
        if labelling.labels is None:
            st.info(labelling.missing, icon=":material/info:")
        else:
            widgets.show_feature(
                labelling.page_set,
                labelling.labels,
                row["layer"],
                feature,
                editable=editable,
                key=f"compare_{tag}",
            )
