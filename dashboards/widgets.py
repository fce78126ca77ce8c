"""Streamlit pieces the pages share: the outputs folder, cached loading, graph pickers, feature
pages and label editing.

Files are cached by (path, modification time, size), so a `dvc repro` while the app runs shows
up on the next interaction. Full graphs (possibly large) are loaded only when re-pruned at other
thresholds than the pipeline's, and at most two are kept in memory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pandas as pd
import streamlit as st
from safetensors import SafetensorError

from dashboards import catalog, runs
from dashboards.catalog import MissingOutputs, Outputs, PageSet, Profile
from dashboards.charts import histogram_chart
from dashboards.documents import prune_document
from dashboards.features import histogram_rows, logit_rows, page_html, with_labels
from tracer.experiments.compare import ProfileRun, load_profile_transcoders, match_features
from tracer.experiments.subgraphs import Subgraph, subgraph_scores
from tracer.features.labels import Labels, set_label
from tracer.features.storage import INDEX_FILE, PagesError
from tracer.graph.graph import Graph
from tracer.graph.viewer import node_ids


def outputs_root() -> Path:
    """`--outputs PATH` after `--` on the command line, else $TRACER_OUTPUTS, else `outputs`; or,
    when the page's URL carries `runs=ID[,ID]`, those MLflow runs opened as an outputs folder
    (`dashboards.runs.open_runs`; the page ends with a message when they cannot be opened)."""
    root = catalog.resolve_outputs(sys.argv[1:], os.environ)
    run_ids = opened_run_ids()
    if not run_ids:
        return root
    project = catalog.project_folder(root)
    uri = runs.store_uri(sys.argv[1:], os.environ, project)
    try:
        with st.spinner("Downloading the runs' files from MLflow ..."):
            return runs.open_runs(uri, run_ids, runs.run_cache_folder(project))
    except MissingOutputs as err:
        stop_with(str(err))


def opened_run_ids() -> list[str]:
    """The MLflow run ids the page's URL opens (`?runs=ID,ID`); [] for the outputs folder."""
    return [r for r in st.query_params.get("runs", "").split(",") if r.strip()]


def label_editing() -> bool:
    """Whether labels may be edited (`-- --edit-labels` or $TRACER_EDIT_LABELS); read-only else."""
    try:
        return catalog.label_editing(sys.argv[1:], os.environ)
    except ValueError as err:
        stop_with(str(err))


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


def full_graph(path: Path) -> Graph:
    """The full graph at `path`, loaded once and shared by the sessions (at most two kept)."""
    return _graph(str(path), _stamp(path))


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


@st.cache_data(max_entries=256, show_spinner=False)
def _subgraph_scores(path: str, stamp: tuple[int, int], pinned: tuple[str, ...]) -> dict:
    graph = _graph(path, stamp)
    scores = subgraph_scores(graph, Subgraph(pinned=pinned))
    return {"replacement": scores.replacement, "completeness": scores.completeness}


def subgraph_node_scores(path: Path, pinned: tuple[str, ...]) -> dict:
    """{replacement, completeness} of the full graph at `path` kept to the pinned node ids
    (tokens and logits always kept, everything else counted as error); cached."""
    return _subgraph_scores(str(path), _stamp(path), tuple(pinned))


@st.cache_data(max_entries=8, show_spinner=False)
def _node_ids(path: str, stamp: tuple[int, int]) -> frozenset[str]:
    return frozenset(node_ids(_graph(path, stamp)))


def graph_node_ids(path: Path) -> frozenset[str]:
    """Every node id of the full graph at `path` (cached)."""
    return _node_ids(str(path), _stamp(path))


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


PAGE_GRAPH_KEY = (
    "page_graph"  # the (profile, prompt) last picked on the Graph or Interventions page
)


def pick_page_graph(outputs: Outputs) -> tuple[str, str]:
    """The sidebar's profile and prompt of the Graph and Interventions pages: one pick for both
    (a widget's state does not outlive its page, so the pick is also kept apart in the session),
    the page's URL winning when it names one; returns (profile, prompt)."""
    last_profile, last_prompt = st.session_state.get(PAGE_GRAPH_KEY, (None, None))
    with st.sidebar:
        profile, prompt = pick_graph(
            outputs,
            "graph",
            default_profile=st.query_params.get("profile", last_profile),
            default_prompt=st.query_params.get("prompt", last_prompt),
        )
    st.session_state[PAGE_GRAPH_KEY] = (profile, prompt)
    st.query_params.update(profile=profile, prompt=prompt)
    return profile, prompt


def read_or_stop(read, *args):
    """`read(*args)`, or end the page with the MissingOutputs message."""
    try:
        return read(*args)
    except MissingOutputs as err:
        stop_with(str(err))


# ---- feature pages and labels -------------------------------------------------------------------
@st.cache_resource(max_entries=4, show_spinner="Opening the feature pages ...")
def _labels(folder: str, labels_file: str, stamps: tuple) -> Labels:
    return Labels.open(folder, labels_file)


def feature_labels(root: Path, profile: Profile) -> tuple[PageSet, Labels]:
    """The profile's page set and its labels (the labels file's, else automatic ones), reopened
    when the pages or the labels file change; MissingOutputs saying what to run or fix."""
    pages = catalog.find_pages(root, profile)
    labels_stamp = _stamp(pages.labels) if pages.labels.is_file() else (0, 0)
    try:
        labels = _labels(
            str(pages.folder),
            str(pages.labels),
            (_stamp(pages.folder / INDEX_FILE), labels_stamp),
        )
    except PagesError as err:
        raise MissingOutputs(f"{err}: run `dvc repro features@{pages.name}`.") from err
    except ValueError as err:  # the labels file
        raise MissingOutputs(f"{err}: fix or remove `{pages.labels}`.") from err
    return pages, labels


@dataclass(frozen=True)
class Features:
    """A profile's feature pages and labels, or the message saying why there are none."""

    page_set: PageSet | None
    labels: Labels | None
    missing: str | None = None  # names the stage to run (or the file to fix)


def labelled(root: Path, profile: Profile, document: dict) -> tuple[dict, Features]:
    """The document with live labels on its feature nodes (`features.with_labels`) and the
    profile's Features; without pages, the document unchanged and the message."""
    try:
        pages, labels = feature_labels(root, profile)
    except MissingOutputs as err:
        return document, Features(None, None, str(err))
    try:
        return with_labels(document, labels), Features(pages, labels)
    except PagesError as err:  # pages of a set with other shapes than the graph's
        return document, Features(None, None, f"{err}: run `dvc repro features@{pages.name}`.")


def show_feature(
    pages: PageSet, labels: Labels, layer: int, feature: int, *, editable: bool, key: str = "page"
) -> None:
    """One feature's page: label (editable when allowed), density, examples with per-token
    highlighting, the activation histogram, top and bottom output logits. `key` tells apart
    two pages shown at once."""
    try:
        page = labels.pages.page(layer, feature)
        label = labels(layer, feature)
    except PagesError as err:
        st.warning(f"{err}: run `dvc repro features@{pages.name}`.", icon=":material/info:")
        return
    human = (layer, feature) in labels.human
    source = "from the labels file" if human else "automatic: top tokens → top output"
    st.markdown(f"**L{layer} #{feature}**: {label or '(never active, no label)'}  \n*{source}*")
    if editable:
        _label_form(pages, labels, layer, feature, key)
    else:
        st.caption(
            f"Labels are read-only; start the app with `-- --edit-labels` (or "
            f"{catalog.ENV_EDIT_LABELS}=1) to edit `{pages.labels}`."
        )
    numbers = st.columns(3)
    numbers[0].metric("density", f"{page.frequency:.3%}", help="share of tokens it is active on")
    numbers[1].metric("max activation", f"{page.act_max:.3f}")
    numbers[2].metric("active tokens", f"{page.active:,} / {page.n_tokens:,}")
    examples, side = st.columns([3, 2])
    with examples:
        st.html(page_html(page, labels.pages.text))
        st.caption(
            "Token shading: activation / max activation; the example's own token is underlined; "
            "hover a token for its activation."
        )
    with side:
        st.altair_chart(histogram_chart(histogram_rows(page)), width="stretch")
        text = labels.pages.text
        for title, pairs in (
            ("Top output logits", page.top_logits),
            ("Bottom output logits", page.bottom_logits),
        ):
            st.markdown(f"**{title}**")
            st.dataframe(pd.DataFrame(logit_rows(pairs, text)), hide_index=True, width="stretch")


def _label_form(pages: PageSet, labels: Labels, layer: int, feature: int, key: str) -> None:
    with st.form(f"{key}_label_{pages.name}_{layer}_{feature}", border=False):
        text = st.text_input(
            f"Label of L{layer} #{feature}",
            value=labels.human.get((layer, feature), ""),
            help=f"Saved to `{pages.labels}`; empty removes the human label.",
        )
        saved = st.form_submit_button("Save label")
    if saved:
        try:
            set_label(pages.labels, labels.pages, layer, feature, text)
        except (ValueError, OSError) as err:
            st.error(f"Not saved: {err}")
            return
        st.rerun()


def _transcoders(base: str, source: str, revision: str | None):
    """A profile's transcoder set, read lazily; relative local paths start at `base`."""
    info = {"transcoders": source, "transcoder_revision": revision}
    return load_profile_transcoders(ProfileRun(source, info, Path(base), ()), Path(base))


@st.cache_data(max_entries=8, show_spinner="Matching features by decoder cosine ...")
def _decoder_matches(
    base: str, sets: tuple[tuple[str, str | None], ...], layers: tuple[int, ...]
) -> dict[int, tuple[list[int], list[float]]]:
    ts_a, ts_b = (_transcoders(base, source, revision) for source, revision in sets)
    found = {}
    for layer in layers:
        match = match_features(ts_a, ts_b, layer)
        found[layer] = (match.indices.tolist(), match.similarity.tolist())
    return found


def feature_matches(
    root: Path, info_a: dict, info_b: dict, keys: list[tuple[int, int]]
) -> dict[tuple[int, int], tuple[int, float]]:
    """(layer, A feature) -> (B feature, cosine): for one transcoder set the feature itself, else
    the B feature of the same layer with the most similar own-layer decoder (as the compare stage
    matches; reads those layers' decoders). MissingOutputs when a set cannot be read."""
    sets = tuple((i.get("transcoders"), i.get("transcoder_revision")) for i in (info_a, info_b))
    if sets[0] == sets[1]:
        return {key: (key[1], 1.0) for key in keys}
    layers = tuple(sorted({layer for layer, _ in keys}))
    try:
        found = _decoder_matches(str(catalog.project_folder(root)), sets, layers)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise MissingOutputs(f"Cannot read the transcoders to match features: {err}") from err
    return {(layer, f): (found[layer][0][f], found[layer][1][f]) for layer, f in keys}
