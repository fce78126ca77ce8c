"""Interventions page: ablate, scale or set picked nodes of a graph on the profile's model, and
see the next-token distribution, each graph logit's measured change beside the graph's predicted
one, and the generated text, before and after."""

import os
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import pins, widgets
from dashboards.catalog import MissingOutputs, graph_file, project_folder, resolve_outputs
from dashboards.documents import node_table
from dashboards.interventions import (
    ACTIONS,
    InterventionOutcome,
    load_key,
    load_replacement,
    run_intervention,
)
from tracer.graph.graph import Graph
from tracer.interventions.modes import MODES
from tracer.model.replacement import ReplacementModel

RESULT_KEY = "interventions_result"
PINNED, PICKED = "pinned nodes", "picked nodes"
ACTION_LABELS = {"ablate": "ablate", "scale": "scale by", "set": "set value to"}
MODE_LABELS = {
    "direct": "direct (attention, norms, MLPs frozen)",
    "frozen_attention": "frozen attention",
    "full": "full (everything recomputed)",
}
PREDICTION_OF_MODE = {"direct": "predicted_direct"}  # the other modes: predicted_total


@st.cache_resource(max_entries=2, show_spinner=False)
def _model(root: str, profile: str, key: str, info: dict, project: str) -> ReplacementModel:
    """One model per (outputs folder, profile, content of its fetch record or profile.json),
    shared by every session."""
    return load_replacement(Path(root), profile, info, Path(project))


def _full_graph(path: Path | None) -> tuple[Graph | None, str | None]:
    if path is None:
        return None, (
            "The full graph file is not here (run `dvc repro`, or `dvc pull` for a cached run): "
            "measured changes only, without the graph's predictions."
        )
    try:
        return widgets.full_graph(path), None
    except (OSError, ValueError) as err:
        return None, f"The full graph file does not load ({err}): measured changes only."


def top_logit_chart(outcome: InterventionOutcome) -> alt.Chart:
    """Grouped bars: each top token's probability before and after."""
    seen, rows = set(), []
    for row in [*outcome.top_before, *outcome.top_after]:
        if row["token_id"] in seen:
            continue
        seen.add(row["token_id"])
        before = row.get("probability_before", row["probability"])
        after = row.get("probability_after", row["probability"])
        token = f"{row['token']!r} ({row['token_id']})"
        rows += [
            {"token": token, "when": "before", "probability": before},
            {"token": token, "when": "after", "probability": after},
        ]
    return (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(
            y=alt.Y("token:N", sort=None, title=None),
            yOffset=alt.YOffset("when:N", sort=["before", "after"]),
            x=alt.X("probability:Q"),
            color=alt.Color("when:N", sort=["before", "after"], title=None),
            tooltip=["token", "when", alt.Tooltip("probability:Q", format=".4f")],
        )
    )


def show_outcome(outcome: InterventionOutcome, description: str, predicted_note: str | None):
    st.subheader("Result")
    st.caption(description)
    top, new_top = outcome.top_before[0], outcome.top_after[0]
    headline = st.columns(3)
    headline[0].metric(
        "top token before",
        repr(top["token"]),
        f"p = {top['probability']:.4f}",
        delta_color="off",
        delta_arrow="off",
    )
    headline[1].metric(
        "its probability after",
        f"{top['probability_after']:.4f}",
        f"{top['probability_after'] - top['probability']:+.4f}",
    )
    headline[2].metric(
        "top token after",
        repr(new_top["token"]),
        f"p = {new_top['probability']:.4f}",
        delta_color="off",
        delta_arrow="off",
    )
    before, after = st.columns(2)
    with before:
        st.markdown("**Top next tokens before**")
        st.dataframe(pd.DataFrame(outcome.top_before), hide_index=True, width="stretch")
    with after:
        st.markdown("**Top next tokens after**")
        st.dataframe(pd.DataFrame(outcome.top_after), hide_index=True, width="stretch")
    st.altair_chart(top_logit_chart(outcome), width="stretch")

    st.markdown("**Graph logits: predicted and measured change**")
    logits = pd.DataFrame(outcome.logits)
    if outcome.predicted:
        matching = PREDICTION_OF_MODE.get(outcome.mode, "predicted_total")
        st.dataframe(logits, hide_index=True, width="stretch")
        st.caption(
            "Change of each graph logit's demeaned value (logit minus the vocabulary mean, at the "
            "last position). predicted_direct: the sum of the clamped nodes' edges (what the "
            "direct mode measures, exactly); predicted_total: the unclamped features respond "
            f"linearly along every path. For this mode compare `measured` with `{matching}`."
        )
    else:
        st.dataframe(
            logits.drop(columns=["predicted_direct", "predicted_total"]),
            hide_index=True,
            width="stretch",
        )
        st.info(predicted_note or "No predictions.", icon=":material/info:")

    st.markdown("**Generated text** (greedy; the intervention held on the prompt positions)")
    texts = st.columns(2)
    texts[0].text_area("before", outcome.text_before, disabled=True)
    texts[1].text_area("after", outcome.text_after, disabled=True)


outputs = widgets.load_outputs()
root = outputs.root
# Where the model comes from: the app's outputs folder and the repository holding it. A run
# opened from MLflow (profile `NAME@RUNID8`) uses its profile's model as the repository has it now.
app_outputs = resolve_outputs(sys.argv[1:], os.environ)
project = project_folder(app_outputs)
profile_name, prompt = widgets.pick_page_graph(outputs)
with st.sidebar:
    widgets.show_skipped(outputs)
profile = outputs.profile(profile_name)
model_root, model_profile = root, profile_name
if widgets.opened_run_ids():
    model_root, model_profile = app_outputs, profile_name.rpartition("@")[0] or profile_name
document = widgets.read_or_stop(widgets.document, root, profile_name, prompt)
graph, no_graph = _full_graph(graph_file(root, profile_name, prompt))

st.title(f"Interventions: {profile_name} / {prompt}")
prompt_text = document.get("metadata", {}).get("prompt", "")
st.caption(f"{profile.describe()}  \nPrompt: `{prompt_text}`")
if model_profile != profile_name:
    st.caption(
        f"An MLflow run: the interventions run on {model_profile}'s model as this repository has "
        "it now (the run logged its graph, not its weights)."
    )

# ---- which nodes --------------------------------------------------------------------------------
subgraph = pins.current(profile_name, prompt)
sources = [PINNED, *(f"supernode {name}" for name, _ in subgraph.supernodes), PICKED]
source = st.radio(
    "nodes",
    sources,
    index=0 if subgraph.pinned else len(sources) - 1,
    key=f"interventions_source_{profile_name}_{prompt}",
    horizontal=True,
    help="Pin nodes and group them into supernodes on the Graph page; or pick nodes here.",
)
rows = [row for row in node_table(document) if row["kind"] != "logit"]
names = {row["node_id"]: f"{row['description']}  ({row['node_id']})" for row in rows}
if source == PICKED:
    default = [n for n in subgraph.pinned if n in names]
    if not default:
        default = [row["node_id"] for row in rows if row["kind"] == "feature"][:1]
    node_ids = st.multiselect(
        "nodes of the pruned graph",
        list(names),
        default=default,
        key=f"interventions_nodes_{profile_name}_{prompt}",
        format_func=lambda node: names.get(node, node),
    )
elif source == PINNED:
    node_ids = list(subgraph.pinned)
else:
    node_ids = list(dict(subgraph.supernodes)[source.removeprefix("supernode ")])
if source != PICKED:
    if node_ids:
        st.caption("Nodes: " + ", ".join(f"`{n}`" for n in node_ids))
    else:
        st.info("Nothing is pinned for this graph: pin nodes on the Graph page, or pick nodes.")

# ---- what to do ---------------------------------------------------------------------------------
with st.form("intervention"):
    left, middle, right = st.columns(3)
    action = left.radio(
        "action", ACTIONS, format_func=ACTION_LABELS.get, horizontal=True, key="interventions_do"
    )
    amount = middle.number_input(
        "amount",
        value=0.0,
        step=0.5,
        key="interventions_amount",
        help="scale: the factor (0 ablates, -1 flips); set value: the features' new activation; "
        "not used by ablate.",
    )
    mode = right.selectbox("mode", MODES, format_func=MODE_LABELS.get, key="interventions_mode")
    max_new_tokens = st.number_input(
        "tokens to generate", min_value=0, max_value=64, value=8, key="interventions_new_tokens"
    )
    submitted = st.form_submit_button("Run intervention", disabled=not node_ids)

if submitted:
    info = profile.info
    try:
        with st.spinner(f"Loading the model of {profile_name} ..."):
            model = _model(
                str(model_root),
                model_profile,
                load_key(model_root, model_profile, info),
                info,
                str(project),
            )
    except MissingOutputs as err:
        st.error(str(err), icon=":material/error:")
        st.session_state.pop(RESULT_KEY, None)
        st.stop()
    target = graph if graph is not None else document
    text = graph.input_tokens if graph is not None else prompt_text
    try:
        with st.spinner("Intervening ..."):
            outcome = run_intervention(
                model, text, target, node_ids, action, amount, mode, int(max_new_tokens)
            )
    except ValueError as err:
        st.warning(f"Not run: {err}", icon=":material/warning:")
        st.session_state.pop(RESULT_KEY, None)
        st.stop()
    what = ACTION_LABELS[action] + ("" if action == "ablate" else f" {amount:g}")
    description = f"{what} {len(node_ids)} node(s) in mode {mode}: " + ", ".join(node_ids)
    st.session_state[RESULT_KEY] = (profile_name, prompt, description, outcome)

stored = st.session_state.get(RESULT_KEY)
if stored is not None and stored[:2] == (profile_name, prompt):
    show_outcome(stored[3], stored[2], no_graph)
