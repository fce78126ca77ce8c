"""Tables page: the compare stage's cross-profile tables, filtered, with charts."""

import streamlit as st

from dashboards import widgets
from dashboards.catalog import MissingOutputs, filter_rows, read_compare
from dashboards.charts import profile_lines, score_bars

SCORE_METRICS = (
    "pruned_replacement",
    "pruned_completeness",
    "replacement",
    "completeness",
    "pruned_nodes",
    "pruned_edges",
    "active_features",
)
# table -> (picker label, columns to plot, x column) of its line chart
LINE_CHARTS = {
    "sizes": (
        "against the node threshold",
        ("nodes", "edges", "replacement", "completeness"),
        "node_threshold",
    ),
    "layers": (
        "per layer",
        ("error_share", "feature_influence", "error_influence", "feature_nodes"),
        "layer",
    ),
}
CAPTIONS = {
    "sizes": "Each point pairs a node threshold with its edge threshold (`pruning.sweep`).",
    "layers": "Influence on the logits of each layer's feature and error nodes in the full "
    "graph; error_share = errors / (features + errors).",
    "matching": "Two transcoder sets of one model: each A feature matched to the B feature with "
    "the most similar decoder (frac_cosine_above: share with cosine above {min_cosine}), and how "
    "much of A's pruned graph B's keeps.",
}

st.title("Cross-profile tables")
try:
    tables, summary = read_compare(widgets.outputs_root())
except MissingOutputs as err:
    widgets.stop_with(str(err))

if summary.get("skipped"):
    skipped = ", ".join(f"{name} ({why})" for name, why in summary["skipped"].items())
    st.caption(f"Left out by the compare stage: {skipped}.")

frames = [t for t in tables.values() if "profile" in t.columns]
profiles = sorted(
    {p for t in frames for p in t["profile"].dropna()} | set(summary.get("profiles", []))
)
prompts = sorted({p for t in tables.values() for p in t["prompt"].dropna()})
with st.sidebar:
    st.subheader("Filters")
    chosen_profiles = st.multiselect("profiles", profiles, default=profiles, key="tables_profiles")
    chosen_prompts = st.multiselect("prompts", prompts, default=prompts, key="tables_prompts")


names = [n for n in ("scores", "sizes", "layers", "matching") if n in tables]
for tab, name in zip(st.tabs([n.capitalize() for n in names]), names, strict=True):
    with tab:
        table = filter_rows(tables[name], chosen_profiles, chosen_prompts)
        if table.empty:
            st.info("No rows for these filters.")
            continue
        if name == "scores":
            metric = st.selectbox("score per profile", SCORE_METRICS, key="tables_metric")
            st.altair_chart(score_bars(table, metric), width="stretch")
        elif name in LINE_CHARTS:
            label, options, x = LINE_CHARTS[name]
            y = st.selectbox(label, options, key=f"tables_{name}_y")
            st.altair_chart(profile_lines(table, x, y), width="stretch")
        if name in CAPTIONS:
            st.caption(CAPTIONS[name].format(min_cosine=summary.get("min_cosine", "?")))
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button(
            f"Download {name}.csv",
            table.to_csv(index=False),
            file_name=f"{name}.csv",
            mime="text/csv",
            key=f"download_{name}",
        )
