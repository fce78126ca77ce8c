"""What the pipeline's output folder holds for the dashboard, read in `tracer.experiments.outputs`' layout.

- `profiles/PROFILE/profile.json` and `profiles/PROFILE/PROMPT/{pruned.json, scores.json,
  pruning_curve.png}` (prune stage): a profile is viewable once it has a pruned prompt;
- `graphs/PROFILE/PROMPT.safetensors` (attribute stage): the full graph, re-pruned on demand;
- `validation/PROFILE/PROMPT.json` (validate stage), `runs/PROFILE.json` (timings);
- `compare/{scores,sizes,layers,matching}.csv`, `summary.json` (compare stage);
- `features/SET/index.json` and its layers (features@SET stage): the feature pages of a
  transcoder set, found for a profile by the set's identity; human labels in `labels/SET.tsv`
  beside the outputs folder (the repository's `labels/` for `outputs/`).

Whatever is missing raises `MissingOutputs`, whose message names the command that writes it.
No Streamlit here.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tracer.experiments import outputs as paths
from tracer.experiments import pages
from tracer.experiments.params import load_params

DEFAULT_OUTPUTS = "outputs"
ENV_OUTPUTS = "TRACER_OUTPUTS"
ENV_EDIT_LABELS = "TRACER_EDIT_LABELS"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
COMPARE_DIR = "compare"
SUMMARY_FILE = "summary.json"
COMPARE_TABLES = ("scores", "sizes", "layers", "matching")
REPRO = "`dvc repro`"


class MissingOutputs(Exception):
    """A file or folder the pipeline writes is absent; the message says which command writes it."""


def app_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The app's own arguments (what follows `--` in `streamlit run app.py -- ...`): `--outputs`,
    `--edit-labels`, `--mlflow` (the store) and `--mlflow-ui` (its UI's address); others are
    ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--outputs", default=None)
    parser.add_argument("--edit-labels", action="store_true")
    parser.add_argument("--mlflow", default=None)
    parser.add_argument("--mlflow-ui", default=None)
    return parser.parse_known_args(list(argv))[0]


def resolve_outputs(argv: Sequence[str], environ: Mapping[str, str]) -> Path:
    """The outputs folder: `--outputs PATH` in argv, else $TRACER_OUTPUTS, else `outputs`."""
    return Path(app_arguments(argv).outputs or environ.get(ENV_OUTPUTS) or DEFAULT_OUTPUTS)


def label_editing(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether feature labels may be edited: `--edit-labels` in argv, else $TRACER_EDIT_LABELS
    (1/true/yes/on or 0/false/no/off/empty, any case); read-only by default."""
    if app_arguments(argv).edit_labels:
        return True
    value = environ.get(ENV_EDIT_LABELS, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(
        f"${ENV_EDIT_LABELS} must be one of {sorted(_TRUE)} (edit) or {sorted(_FALSE - {''})} "
        f"or empty (read-only), got {environ[ENV_EDIT_LABELS]!r}"
    )


@dataclass(frozen=True)
class Profile:
    """One pruned profile: its profile.json and the prompts with a pruned graph document."""

    name: str
    info: dict
    prompts: tuple[str, ...]  # sorted prompt ids with a pruned.json

    def describe(self) -> str:
        """`model with transcoders (dtype)`, revisions appended when pinned, for captions."""
        model = _with_revision(self.info.get("model", "?"), self.info.get("revision"))
        sets = _with_revision(
            self.info.get("transcoders", "?"), self.info.get("transcoder_revision")
        )
        return f"{model} with {sets} ({self.info.get('dtype', 'float32')})"


def _with_revision(name: str, revision: str | None) -> str:
    return f"{name}@{revision}" if revision else name


@dataclass(frozen=True)
class Outputs:
    """The viewable profiles of an outputs folder, and why the others are not viewable."""

    root: Path
    profiles: tuple[Profile, ...]  # enabled, with at least one pruned prompt, sorted by name
    skipped: dict[str, str]  # profile name -> reason, a sentence naming the fix

    def profile(self, name: str) -> Profile:
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise MissingOutputs(f"profile {name!r} has no pruned graphs under {self.root}")


def scan_outputs(root: str | Path) -> Outputs:
    """The profiles under `root/profiles` that have pruned graphs, and the reasons for the rest."""
    root = Path(root)
    if not root.is_dir():
        raise MissingOutputs(
            f"No pipeline outputs at `{root}`. Run {REPRO} in the repository (it writes "
            f"`outputs/`), or point the app at another folder with `-- --outputs PATH` "
            f"or ${ENV_OUTPUTS}."
        )
    profiles, skipped = [], {}
    try:
        found_profiles = paths.profile_folders(root)
    except ValueError as err:
        raise MissingOutputs(f"{err}: run {REPRO} again.") from err
    for found in found_profiles:
        if found.info is None:
            skipped[found.name] = f"no {paths.PROFILE_FILE}: run {REPRO} (stage `prune`)"
            continue
        prompts = found.prompts_with(paths.PRUNED_FILE)
        if not found.enabled:
            skipped[found.name] = (
                f"disabled in params.yaml: set `profiles.{found.name}.enabled: true` "
                f"and run {REPRO}"
            )
        elif not prompts:
            skipped[found.name] = f"no pruned graphs yet: run {REPRO}"
        else:
            profiles.append(Profile(found.name, found.info, prompts))
    for folder in paths.subfolders(root / "graphs"):
        if folder.name not in skipped and not any(p.name == folder.name for p in profiles):
            skipped[folder.name] = f"attributed but not pruned yet: run {REPRO} (stage `prune`)"
    if not profiles:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise MissingOutputs(
            f"No pruned graphs under `{root / 'profiles'}`: run {REPRO} (stages `attribute` and "
            f"`prune`) with at least one enabled profile." + (f" ({reasons})" if reasons else "")
        )
    return Outputs(root, tuple(profiles), skipped)


def default_pair(outputs: Outputs) -> tuple[str, str]:
    """Two profiles to compare first: the first two of one model (two transcoder sets), else the
    first two, else the only one twice."""
    for a in outputs.profiles:
        for b in outputs.profiles:
            if a.name != b.name and a.info.get("model") == b.info.get("model"):
                return a.name, b.name
    names = [p.name for p in outputs.profiles]
    return names[0], names[1] if len(names) > 1 else names[0]


# ---- one prompt's files -------------------------------------------------------------------------
def document_path(root: Path, profile: str, prompt: str) -> Path:
    return paths.prompt_dir(root, profile, prompt) / paths.PRUNED_FILE


def scores_path(root: Path, profile: str, prompt: str) -> Path:
    return paths.prompt_dir(root, profile, prompt) / paths.SCORES_FILE


def curve_image_path(root: Path, profile: str, prompt: str) -> Path:
    return paths.prompt_dir(root, profile, prompt) / paths.CURVE_PLOT


def validation_path(root: Path, profile: str, prompt: str) -> Path:
    return paths.validation_dir(root, profile) / f"{prompt}.json"


def graph_file(root: Path, profile: str, prompt: str) -> Path | None:
    """The full graph's .safetensors file, or None when it is not on disk (e.g. not pulled)."""
    path = paths.graph_path(root, profile, prompt)
    return path if path.is_file() else None


def read_json(path: Path, stage: str | None = None) -> dict:
    """A JSON file the pipeline wrote; MissingOutputs when absent or unreadable."""
    command = REPRO + (f" (stage `{stage}`)" if stage else "")
    if not path.is_file():
        raise MissingOutputs(f"`{path}` is missing: run {command} to write it.")
    try:
        return paths.read_object(path, stage or "pipeline")
    except ValueError as err:
        raise MissingOutputs(f"`{path}` is unreadable ({err}): run {command} again.") from err


def read_document(root: Path, profile: str, prompt: str) -> dict:
    """The pipeline's viewer document `{metadata, qParams, nodes, links}` of the pruned graph."""
    path = document_path(root, profile, prompt)
    document = read_json(path, "prune")
    missing = [k for k in ("metadata", "nodes", "links") if k not in document]
    if missing:
        raise MissingOutputs(f"`{path}` lacks {missing}: run {REPRO} (stage `prune`).")
    return document


def read_scores(root: Path, profile: str, prompt: str) -> dict:
    """The prompt's scores.json (`tracer.experiments.report.prompt_report`)."""
    return read_json(scores_path(root, profile, prompt), "prune")


def read_validation(root: Path, profile: str, prompt: str) -> dict:
    """The validate stage's `{metadata, summary, rows}` for this prompt."""
    return read_json(validation_path(root, profile, prompt), "validate")


def read_run(root: Path, profile: str, prompt: str) -> dict | None:
    """Seconds per phase and attribution peak memory growth of the prompt, when recorded."""
    path = paths.runs_path(root, profile)
    if not path.is_file():
        return None
    return read_json(path).get(prompt)


def default_thresholds(document: dict, scores: dict | None = None) -> tuple[float, float]:
    """(node, edge) thresholds the pipeline pruned with: the document's, else scores.json's."""
    metadata = document.get("metadata", {})
    values = []
    for key, fallback in (("node_threshold", 0.8), ("edge_threshold", 0.98)):
        value = metadata.get(key)
        if value is None and scores is not None:
            value = scores.get(key)
        values.append(float(fallback if value is None else value))
    return values[0], values[1]


# ---- cross-profile tables -----------------------------------------------------------------------
def read_compare(root: str | Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """The compare stage's tables (name -> DataFrame; absent CSVs left out) and summary.json."""
    folder = Path(root) / COMPARE_DIR
    if not folder.is_dir():
        raise MissingOutputs(
            f"`{folder}` does not exist: run {REPRO} (stage `compare`) to write the "
            "cross-profile tables."
        )
    tables = {}
    for name in COMPARE_TABLES:
        path = folder / f"{name}.csv"
        if path.is_file():
            tables[name] = pd.read_csv(path)
    summary_path = folder / SUMMARY_FILE
    summary = read_json(summary_path, "compare") if summary_path.is_file() else {}
    if not tables:
        raise MissingOutputs(f"`{folder}` holds no tables: run {REPRO} (stage `compare`).")
    return tables, summary


def matching_rows(
    root: str | Path, profile_a: str, profile_b: str, prompt: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """matching.csv's rows for A -> B (on `prompt`, else every prompt), and summary.json."""
    tables, summary = read_compare(root)
    if "matching" not in tables:
        raise MissingOutputs(f"`matching.csv` is missing: run {REPRO} (stage `compare`).")
    matching = tables["matching"]
    rows = matching[(matching["profile_a"] == profile_a) & (matching["profile_b"] == profile_b)]
    if prompt is not None:
        rows = rows[rows["prompt"] == prompt]
    if rows.empty:
        on = f" on {prompt}" if prompt is not None else ""
        raise MissingOutputs(
            f"No matching rows for {profile_a} -> {profile_b}{on}: run {REPRO} (stage "
            "`compare`) once both profiles have graphs."
        )
    return rows, summary


def filter_rows(table: pd.DataFrame, profiles: list[str], prompts: list[str]) -> pd.DataFrame:
    """Rows of a compare table whose profile (both, for matching's profile_a / profile_b) is in
    `profiles` and whose prompt is in `prompts` (rows without a prompt are kept)."""
    mask = table["prompt"].isin(prompts) | table["prompt"].isna()
    for column in ("profile", "profile_a", "profile_b"):
        if column in table.columns:
            mask &= table[column].isin(profiles)
    return table[mask]


# ---- feature pages and labels -------------------------------------------------------------------
@dataclass(frozen=True)
class PageSet:
    """A transcoder set's feature pages (stage features@NAME) and its human labels file."""

    name: str
    folder: Path  # ROOT/features/NAME, holding index.json
    labels: Path  # labels/NAME.tsv beside the outputs folder; absent until a label is written


def project_folder(root: Path) -> Path:
    """The folder holding the outputs folder (the repository, for `outputs/`): where `labels/`
    and params.yaml are, and where profile.json's relative transcoder paths start."""
    return Path(root).parent


def labels_folder(root: Path) -> Path:
    """Where human labels live: `labels/` beside the outputs folder."""
    return project_folder(root) / "labels"


def find_pages(root: Path, profile: Profile) -> PageSet:
    """The feature pages of the profile's transcoder set (the pipeline's rule,
    `tracer.experiments.pages.find_pages`); MissingOutputs naming the stage that writes them."""
    root = Path(root)
    folder = pages.find_pages(root, profile.name, profile.info)
    if folder is not None:
        return PageSet(folder.name, folder, paths.labels_path(folder.name, labels_folder(root)))
    source = pages.transcoder_identity(root, profile.name, profile.info)[0]
    raise MissingOutputs(
        f"No feature pages for the transcoders of {profile.name} ({source}) under "
        f"`{root / 'features'}`: {_pages_command(root, profile.name)}."
    )


def _pages_command(root: Path, profile: str) -> str:
    """What writes a profile's pages, named from params.yaml beside the outputs folder."""
    try:
        name = load_params(project_folder(root) / "params.yaml").feature_set(profile)
    except (FileNotFoundError, ValueError, KeyError):
        return (
            "run `dvc repro features@SET`, SET being the entry of params.yaml `features.sets` "
            "for this profile's transcoders"
        )
    if name is None:
        return (
            f"add `NAME: {profile}` under `features.sets` in params.yaml, then run "
            "`dvc repro features@NAME`"
        )
    return f"run `dvc repro features@{name}`"
