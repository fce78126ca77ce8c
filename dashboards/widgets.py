"""Streamlit pieces the pages share: the outputs folder, cached loading, graph pickers.

Files are cached by (path, modification time, size), so a `dvc repro` while the app runs shows
up on the next interaction. Full graphs (possibly large) are loaded only when re-pruned at other
thresholds than the pipeline's, and at most two are kept in memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import streamlit as st

from dashboards import catalog
from dashboards.catalog import MissingOutputs, Outputs
from dashboards.documents import prune_document
from tracer.graph.graph import Graph


def outputs_root() -> Path:
    """`--outputs PATH` after `--` on the command line, else $TRACER_OUTPUTS, else `outputs`."""
    return catalog.resolve_outputs(sys.argv[1:], os.environ)


def stop_with(message: str) -> NoReturn:
    """Show why there is nothing to show (and which command makes it), then end the page."""
    st.warning(message, icon=":material/info:")
    st.stop()


def load_outputs() -> Outputs:
    """The outputs folder's profiles; ends the page with a message when there are none."""
    try:
        return catalog.scan_outputs(outputs_root())
    except MissingOutputs as err:
        stop_with(str(err))


def show_skipped(outputs: Outputs) -> None:
    if outputs.skipped:
        with st.expander(f"{len(outputs.skipped)} profile(s) without graphs"):
            for name, reason in outputs.skipped.items():
                st.markdown(f"- **{name}**: {reason}")


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


# kind -> (reader, path of the file it reads), both taking (root, profile, prompt)
_READERS = {
    "document": (catalog.read_document, catalog.document_path),
    "scores": (catalog.read_scores, catalog.scores_path),
    "validation": (catalog.read_validation, catalog.validation_path),
}


@st.cache_data(max_entries=64, show_spinner=False)
def _cached(kind: str, root: str, profile: str, prompt: str, stamp: tuple[int, int]) -> dict:
    return _READERS[kind][0](Path(root), profile, prompt)


def _read(kind: str, root: Path, profile: str, prompt: str) -> dict:
    """The reader of `kind` on this prompt, cached until its file changes."""
    file = _READERS[kind][1](root, profile, prompt)
    stamp = _stamp(file) if file.is_file() else (0, 0)  # a missing file: the reader says so
    return _cached(kind, str(root), profile, prompt, stamp)


def document(root: Path, profile: str, prompt: str) -> dict:
    """The pipeline's pruned graph document (cached)."""
    return _read("document", root, profile, prompt)


def scores(root: Path, profile: str, prompt: str) -> dict:
    """The prompt's scores.json (cached)."""
    return _read("scores", root, profile, prompt)


def validation(root: Path, profile: str, prompt: str) -> dict:
    """The validate stage's report for the prompt (cached)."""
    return _read("validation", root, profile, prompt)


@st.cache_resource(max_entries=2, show_spinner="Loading the full graph ...")
def _graph(path: str, stamp: tuple[int, int]) -> Graph:
    return Graph.load(path)


@st.cache_data(max_entries=16, show_spinner="Pruning ...")
def _repruned(
    path: str,
    stamp: tuple[int, int],
    node_threshold: float,
    edge_threshold: float,
    tokens: tuple[str, ...],
    slug: str,
) -> tuple[dict, dict]:
    return prune_document(
        _graph(path, stamp), node_threshold, edge_threshold, list(tokens), slug=slug
    )


def repruned(
    path: Path, node_threshold: float, edge_threshold: float, tokens: list[str], slug: str
) -> tuple[dict, dict]:
    """(document, pruned scores) of the full graph at `path` pruned at these thresholds."""
    return _repruned(str(path), _stamp(path), node_threshold, edge_threshold, tuple(tokens), slug)


def pick_graph(
    outputs: Outputs,
    key: str,
    *,
    label: str = "",
    default_profile: str | None = None,
    default_prompt: str | None = None,
) -> tuple[str, str]:
    """Selectboxes for a profile and one of its prompts; returns (profile, prompt).

    A prompt stays picked when the profile changes, if the new profile has it.
    """
    names = [p.name for p in outputs.profiles]
    profile_key, prompt_key = f"{key}_profile", f"{key}_prompt"
    if st.session_state.get(profile_key) not in names:
        st.session_state[profile_key] = default_profile if default_profile in names else names[0]
    name = st.selectbox(
        f"{label}profile",
        names,
        key=profile_key,
        help="A model + transcoder set pair of params.yaml (`profiles:`).",
    )
    prompts = list(outputs.profile(name).prompts)
    if st.session_state.get(prompt_key) not in prompts:
        st.session_state[prompt_key] = default_prompt if default_prompt in prompts else prompts[0]
    prompt = st.selectbox(f"{label}prompt", prompts, key=prompt_key)
    return name, prompt


def read_or_stop(read, *args):
    """`read(*args)`, or end the page with the MissingOutputs message."""
    try:
        return read(*args)
    except MissingOutputs as err:
        stop_with(str(err))
