"""Runs page: the results logged to MLflow (newest first), filtered, linked to the MLflow UI; one
run opens in the Graph page, two in the Compare page."""

import os
import sys

import pandas as pd
import streamlit as st

from dashboards import catalog, runs, widgets
from dashboards.catalog import MissingOutputs

PICK_KEY = "runs_picked"

argv = sys.argv[1:]
# the pipeline's outputs folder, whatever runs another page opened
project = catalog.project_folder(catalog.resolve_outputs(argv, os.environ))
uri = runs.store_uri(argv, os.environ, project)
ui = runs.ui_url(argv, os.environ)

st.title("Tracked runs")
with st.sidebar:
    limit = st.number_input(
        "newest runs to read",
        min_value=10,
        max_value=50_000,
        value=runs.MAX_RUNS,
        step=100,
        help="Runs are read newest first; raise this to reach older ones.",
    )


@st.cache_data(ttl=15, show_spinner="Reading the MLflow store ...")
def _tracked(uri: str, limit: int) -> pd.DataFrame:
    return runs.tracked_runs(uri, limit)


try:
    table = _tracked(uri, int(limit))
except MissingOutputs as err:
    widgets.stop_with(str(err))
if table.empty:
    widgets.stop_with(f"The MLflow store `{uri}` holds no tracked results yet. {runs.HOW_TO_LOG}")


def _options(column: str) -> list[str]:
    return sorted(table[column].dropna().unique())


with st.sidebar:
    st.subheader("Filters")
    profiles = st.multiselect("profiles", _options("profile"), key="runs_profiles")
    models = st.multiselect("models", _options("model"), key="runs_models")
    sets = st.multiselect("transcoder sets", _options("transcoders"), key="runs_transcoders")
    prompt = st.text_input("prompt", key="runs_prompt", help="Part of the prompt id or text.")
    commit = st.text_input("commit", key="runs_commit", help="The git commit's first characters.")
shown = runs.filter_runs(
    table,
    profiles=profiles or None,
    models=models or None,
    transcoders=sets or None,
    prompt=prompt,
    commit=commit,
)
st.caption(
    f"{len(shown)} of the {len(table)} newest runs in `{uri}`. Links open the MLflow UI at "
    f"{ui} (start it with `make ui`, or point the app at another with `-- --mlflow-ui URL`)."
)
st.dataframe(
    runs.with_links(shown, ui),
    column_order=["mlflow", *runs.COLUMNS[:-3]],
    column_config={
        "mlflow": st.column_config.LinkColumn("MLflow", display_text="open"),
        "started": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm"),
        **{
            name: st.column_config.NumberColumn(name, format="%.4f")
            for name in runs.SCORE_COLUMNS
            if not name.endswith(("nodes", "edges"))
        },
    },
    hide_index=True,
    width="stretch",
)

names = {
    row.run_id: f"{row.run} · {row.started:%Y-%m-%d %H:%M} · {row.run_id[:8]}"
    for row in shown.itertuples()
}
picked = st.multiselect(
    "Runs to open",
    list(names),
    format_func=names.get,
    max_selections=2,
    key=PICK_KEY,
    help="One run: its graph in the Graph page. Two runs: side by side in the Compare page.",
)
if not picked:
    st.caption("Pick one run to open its graph, or two to compare them.")
    st.stop()

chosen = [shown[shown["run_id"] == run_id].iloc[0] for run_id in picked]
label = "Open in Graph page" if len(chosen) == 1 else "Compare these two runs"
if not st.button(label, type="primary"):
    st.stop()
try:
    with st.spinner("Downloading the runs' files ..."):
        runs.open_runs(uri, picked, runs.run_cache_folder(project))
except MissingOutputs as err:
    st.error(str(err))
    st.stop()
opened = [(runs.opened_profile(row.profile, row.run_id), row.prompt) for row in chosen]
if len(opened) == 1:
    ((name, prompt_id),) = opened
    st.switch_page(
        "views/graph.py", query_params={"runs": picked[0], "profile": name, "prompt": prompt_id}
    )
(name_a, prompt_a), (name_b, prompt_b) = opened
st.switch_page(
    "views/compare.py",
    query_params={
        "runs": ",".join(picked),
        "a": name_a,
        "b": name_b,
        "prompt_a": prompt_a,
        "prompt_b": prompt_b,
    },
)
