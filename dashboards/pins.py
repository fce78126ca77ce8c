"""The subgraph being built in this browser session: pinned nodes and supernodes per graph.

Each (profile, prompt) has its own `Subgraph` (tracer.experiments.subgraphs) in the session
state, so two browser sessions never see each other's pins; the Graph page edits it, the
Interventions page reads it.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards.catalog import project_folder
from dashboards.charts import PINNED
from dashboards.widgets import graph_node_ids, subgraph_node_scores
from tracer.experiments.subgraphs import (
    Subgraph,
    load_subgraph,
    save_subgraph,
    subgraph_files,
    subgraphs_dir,
)

_PREFIX = "subgraph::"


def _key(profile: str, prompt: str) -> str:
    return f"{_PREFIX}{profile}::{prompt}"


def current(profile: str, prompt: str) -> Subgraph:
    """What is pinned now for this graph (an empty Subgraph when nothing is)."""
    return st.session_state.get(_key(profile, prompt)) or Subgraph()


def put(profile: str, prompt: str, subgraph: Subgraph) -> None:
    st.session_state[_key(profile, prompt)] = subgraph


def groups(subgraph: Subgraph) -> dict[str, str]:
    """node_id -> its supernode's name, or `charts.PINNED` for a pinned node in none."""
    found = dict.fromkeys(subgraph.pinned, PINNED)
    for name, members in subgraph.supernodes:
        found |= dict.fromkeys(members, name)
    return found


def toggle(profile: str, prompt: str, node_id: str) -> None:
    """Pin the node, or unpin it when it is pinned."""
    subgraph = current(profile, prompt)
    changed = subgraph.unpin([node_id]) if node_id in subgraph.pinned else subgraph.pin([node_id])
    put(profile, prompt, changed)


def editor(
    root: Path,
    profile: str,
    prompt: str,
    names: dict[str, str],
    full_graph: Path | None,
    pruned_scores: dict,
) -> Subgraph:
    """The Subgraph section of the Graph page: the pinned nodes (a picker), its scores, the
    supernodes, saving and loading. `names` maps the pickable node ids to what to call them."""
    subgraph = current(profile, prompt)
    st.subheader("Subgraph")
    scores_row = st.columns(4)
    scores_row[2].metric("pinned nodes", len(subgraph.pinned))
    scores_row[3].metric("supernodes", len(subgraph.supernodes))
    if full_graph is None:
        scores_row[0].caption(
            "Subgraph scores need the full graph file (`dvc pull`, or `dvc repro`)."
        )
    else:
        try:
            scores = subgraph_node_scores(full_graph, subgraph.pinned)
        except ValueError as err:
            st.warning(f"Cannot score the subgraph: {err}", icon=":material/warning:")
        else:
            for column, key in zip(scores_row[:2], ("replacement", "completeness"), strict=True):
                delta = scores[key] - pruned_scores[f"pruned_{key}"]
                column.metric(
                    f"{key} (subgraph)",
                    f"{scores[key]:.4f}",
                    f"{delta:+.4f} vs pruned",
                    help="Tokens, logits and the pinned nodes kept, with every edge between "
                    "them; everything else counts as error (as for a pruned graph).",
                )
    _pin_picker(profile, prompt, subgraph, names)
    subgraph = current(profile, prompt)
    _supernodes(profile, prompt, subgraph, names)
    _files(root, profile, prompt, full_graph, names)
    return current(profile, prompt)


def _named(names: dict[str, str], node_id: str) -> str:
    return f"{names[node_id]}  ({node_id})" if node_id in names else node_id


def _pin_picker(profile: str, prompt: str, subgraph: Subgraph, names: dict[str, str]) -> None:
    key = f"pinned_{profile}_{prompt}"
    st.session_state[key] = list(subgraph.pinned)
    options = list(dict.fromkeys([*subgraph.pinned, *names]))

    def changed() -> None:
        wanted = st.session_state[key]
        now = current(profile, prompt)
        gone = [n for n in now.pinned if n not in wanted]
        put(profile, prompt, now.unpin(gone).pin(wanted))

    st.multiselect(
        "pinned nodes",
        options,
        key=key,
        on_change=changed,
        format_func=lambda node_id: _named(names, node_id),
        help="Pin nodes here, with the button under the node picker, or by clicking them in "
        "the drawing while 'Click pins nodes' is on.",
    )


def _supernodes(profile: str, prompt: str, subgraph: Subgraph, names: dict[str, str]) -> None:
    with st.form(f"supernode_{profile}_{prompt}", border=False):
        left, right = st.columns([1, 3])
        name = left.text_input("supernode name", placeholder="e.g. Texas")
        members = right.multiselect(
            "members (pinned nodes)",
            list(subgraph.pinned),
            format_func=lambda node_id: _named(names, node_id),
        )
        grouped = st.form_submit_button("Group as supernode")
    if grouped:
        try:
            put(profile, prompt, subgraph.group(name, members))
        except ValueError as err:
            st.error(f"Not grouped: {err}")
        else:
            st.rerun()
    for group, members in subgraph.supernodes:
        text, button = st.columns([6, 1])
        shown = ", ".join(names.get(m, m) for m in members)
        text.markdown(f"**{group}** ({len(members)}): {shown}")
        if button.button("Ungroup", key=f"ungroup_{profile}_{prompt}_{group}"):
            put(profile, prompt, subgraph.ungroup(group))
            st.rerun()


def _files(
    root: Path, profile: str, prompt: str, full_graph: Path | None, names: dict[str, str]
) -> None:
    project = project_folder(root)
    folder = subgraphs_dir(project, profile, prompt)
    save, load = st.columns(2)
    with save:
        with st.form(f"save_subgraph_{profile}_{prompt}", border=False):
            name = st.text_input("save as", value=current(profile, prompt).name)
            saved = st.form_submit_button("Save subgraph")
        if saved:
            try:
                path = save_subgraph(
                    project, profile, prompt, current(profile, prompt).renamed(name)
                )
            except (ValueError, OSError) as err:
                st.error(f"Not saved: {err}")
            else:
                put(profile, prompt, current(profile, prompt).renamed(name))
                st.success(f"Saved `{path}`")
    with load:
        files = subgraph_files(project, profile, prompt)
        if not files:
            st.caption(f"No saved subgraphs in `{folder}` yet.")
            return
        picked = st.selectbox(
            "saved subgraphs",
            files,
            format_func=lambda path: path.stem,
            key=f"saved_{profile}_{prompt}",
        )
        if st.button("Load subgraph", key=f"load_{profile}_{prompt}"):
            known = graph_node_ids(full_graph) if full_graph is not None else set(names)
            try:
                put(profile, prompt, load_subgraph(picked, known))
            except ValueError as err:
                st.error(f"Not loaded: {err}")
            else:
                st.rerun()
