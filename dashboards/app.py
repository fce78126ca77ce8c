"""The tracer explorer: `streamlit run dashboards/app.py [-- --outputs PATH]`.

Reads the pipeline's output folder (`--outputs`, else $TRACER_OUTPUTS, else `outputs/`) and shows
one pruned graph (with the subgraph being pinned), two side by side, the cross-profile tables,
interventions on a graph's nodes, and the runs tracked in MLflow (any of which opens in the
Graph and Compare pages).
"""

import sys
from pathlib import Path

# `streamlit run` puts only this folder on sys.path; the pages import `dashboards.*`.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from dashboards.widgets import opened_run_ids, outputs_root  # noqa: E402

# not `pages/`: Streamlit would route that folder itself before `st.navigation` runs
PAGES = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="tracer explorer", page_icon=":material/hub:", layout="wide")
page = st.navigation(
    [
        st.Page(PAGES / "graph.py", title="Graph", icon=":material/hub:", default=True),
        st.Page(PAGES / "compare.py", title="Compare", icon=":material/compare:"),
        st.Page(PAGES / "tables.py", title="Tables", icon=":material/table_chart:"),
        st.Page(PAGES / "interventions.py", title="Interventions", icon=":material/science:"),
        st.Page(PAGES / "runs.py", title="Runs", icon=":material/history:"),
    ]
)
opened = opened_run_ids()
if opened:
    st.sidebar.caption(
        f"MLflow run(s) `{'`, `'.join(opened)}` (opened from the Runs page); the pages show "
        "their logged files."
    )
else:
    st.sidebar.caption(f"Outputs folder: `{outputs_root().resolve()}`")
page.run()
