"""The MLflow store's tracked results for the Runs page, and runs opened as an outputs folder.

Which store: `-- --mlflow URI` on the app's command line, else $MLFLOW_TRACKING_URI, else the
sqlite store `mlflow.db` in the project folder (the repository, for `outputs/`): the one the track
stage writes. The table lists the runs of every experiment of that store that carry the tag
`tracer.profile`, that is one row per logged (profile, prompt) result; pipeline parent runs and
sweep runs have no such tag. Links go to the MLflow UI at `-- --mlflow-ui URL`, else
$TRACER_MLFLOW_UI, else http://127.0.0.1:5000 (`make ui`).

`open_runs` downloads runs' files into a cache folder laid out as an outputs folder
(`tracer.experiments.outputs`), each run a profile named `{profile}@{run_id[:8]}`, so the Graph and
Compare pages read them as they read the pipeline's own outputs. A store or run that is not there
raises `MissingOutputs` with a message saying what to do. No Streamlit here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from dashboards import catalog
from dashboards.catalog import MissingOutputs
from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs as paths
from tracer.experiments import tracking  # noqa: F401  (switches MLflow's telemetry off first)
from tracer.experiments.results import PROFILE_FIELDS

from mlflow import MlflowClient  # isort: skip
from mlflow.exceptions import MlflowException  # isort: skip
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT  # isort: skip

ENV_UI = "TRACER_MLFLOW_UI"
ENV_CACHE = "TRACER_RUNS_CACHE"
DEFAULT_UI = "http://127.0.0.1:5000"
DEFAULT_CACHE = Path("~/.cache/tracer/runs")
STORE_FILE = "mlflow.db"
PROFILE_TAG = "tracer.profile"
MAX_RUNS = 500  # newest first; the page lets the reader ask for more
SCORE_COLUMNS = (
    "replacement",
    "completeness",
    "pruned_replacement",
    "pruned_completeness",
    "pruned_nodes",
    "pruned_edges",
)
COLUMNS = (
    "run",
    "profile",
    "prompt",
    "model",
    "transcoders",
    *SCORE_COLUMNS,
    "commit",
    "started",
    "status",
    "run_id",
    "experiment_id",
    "prompt_text",
    "git_commit",
)
HOW_TO_LOG = (
    "`dvc repro` runs the `track` stage, which logs every new result there (on a fresh clone, "
    "whose results dvc.lock already records, `make run` or `dvc repro -f -s track` logs them); "
    "or point the app at another store with `-- --mlflow URI` or $MLFLOW_TRACKING_URI."
)


# ---- where things are ---------------------------------------------------------------------------
def store_uri(argv: Sequence[str], environ: Mapping[str, str], project: Path) -> str:
    """`--mlflow URI`, else $MLFLOW_TRACKING_URI, else `sqlite:///PROJECT/mlflow.db`."""
    chosen = catalog.app_arguments(argv).mlflow or environ.get("MLFLOW_TRACKING_URI")
    return chosen or f"sqlite:///{(Path(project) / STORE_FILE).resolve()}"


def ui_url(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The MLflow UI's base URL: `--mlflow-ui URL`, else $TRACER_MLFLOW_UI, else the default."""
    return (catalog.app_arguments(argv).mlflow_ui or environ.get(ENV_UI) or DEFAULT_UI).rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow 3 UI (a hash route)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def run_cache_folder(project: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where opened runs are downloaded: $TRACER_RUNS_CACHE (relative to the project folder),
    else ~/.cache/tracer/runs."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV_CACHE)
    if chosen:
        return Path(project) / Path(chosen).expanduser()
    return DEFAULT_CACHE.expanduser()


def check_store(uri: str) -> None:
    """MissingOutputs when the store is not there: a sqlite file that does not exist (never
    created here) or a server that does not answer."""
    if uri.startswith("sqlite:"):
        # sqlite:///relative.db or sqlite:////absolute.db, optionally with ?options
        path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
        if not uri.startswith("sqlite:///") or not path.is_file():
            raise MissingOutputs(
                f"No MLflow store at `{uri}`: the file `{path}` does not exist. {HOW_TO_LOG}"
            )
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
                pass
        except urllib.error.HTTPError:
            pass  # it answers: whatever the status, the client's calls will say more
        except (OSError, ValueError) as err:
            raise MissingOutputs(
                f"The MLflow server at `{uri}` does not answer ({err}). Start it, or "
                f"{HOW_TO_LOG[0].lower()}{HOW_TO_LOG[1:]}"
            ) from err
    elif uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not folder.is_dir():
            raise MissingOutputs(
                f"No MLflow store at `{uri}`: `{folder}` does not exist. {HOW_TO_LOG}"
            )


# ---- the runs table -----------------------------------------------------------------------------
def tracked_runs(uri: str, limit: int = MAX_RUNS) -> pd.DataFrame:
    """The newest `limit` tracked results of the store (every experiment), one row per run, with
    COLUMNS; MissingOutputs when the store is not there or cannot be read."""
    check_store(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
        found = []
        if experiments:
            found = client.search_runs(
                list(experiments),
                filter_string=f"tags.`{PROFILE_TAG}` != ''",
                max_results=limit,
                order_by=["attributes.start_time DESC"],
            )
    except MlflowException as err:
        raise MissingOutputs(f"Cannot read the MLflow store at `{uri}`: {err.message}") from err
    rows = [_row(run) for run in found]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _row(run) -> dict:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    commit = tags.get(MLFLOW_GIT_COMMIT, "")
    return {
        "run": run.info.run_name,
        "profile": tags.get(PROFILE_TAG),
        "prompt": tags.get("tracer.prompt_id", params.get("prompt_id")),
        "model": params.get("model"),
        "transcoders": params.get("transcoders"),
        **{name: metrics.get(name) for name in SCORE_COLUMNS},
        "commit": commit[:8],
        "started": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
        "status": run.info.status,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "prompt_text": tags.get("tracer.prompt_text", ""),
        "git_commit": commit,
    }


def filter_runs(
    table: pd.DataFrame,
    *,
    profiles: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    transcoders: Sequence[str] | None = None,
    prompt: str = "",
    commit: str = "",
) -> pd.DataFrame:
    """Rows whose profile, model and transcoder set are among the chosen (None: any), whose
    prompt id or text contains `prompt` (any case) and whose commit starts with `commit`."""
    mask = pd.Series(True, index=table.index)
    for column, chosen in (("profile", profiles), ("model", models), ("transcoders", transcoders)):
        if chosen is not None:
            mask &= table[column].isin(list(chosen))
    text = prompt.strip().lower()
    if text:
        mask &= table["prompt"].fillna("").str.lower().str.contains(text, regex=False) | table[
            "prompt_text"
        ].fillna("").str.lower().str.contains(text, regex=False)
    if commit.strip():
        mask &= table["git_commit"].fillna("").str.startswith(commit.strip().lower())
    return table[mask]


def with_links(table: pd.DataFrame, base: str) -> pd.DataFrame:
    """The table with a `mlflow` column: each run's page in the MLflow UI at `base`."""
    links = [
        run_url(base, e, r) for e, r in zip(table["experiment_id"], table["run_id"], strict=True)
    ]
    return table.assign(mlflow=links)


def opened_profile(profile: str, run_id: str) -> str:
    """The profile name a run gets in an opened folder."""
    return f"{profile}@{run_id[:8]}"


# ---- runs opened as an outputs folder ----------------------------------------------------------
def open_runs(uri: str, run_ids: Sequence[str], cache: Path) -> Path:
    """An outputs folder holding these runs' files, each as profile `{profile}@{run_id[:8]}` and
    prompt = the run's prompt id: profile.json from the run's params, pruned.json, scores.json, the
    graph, the curve plot and validation when logged. Kept under `cache` by store and run ids and
    reused; MissingOutputs for an unknown run or one without pruned.json and scores.json."""
    if not run_ids:
        raise MissingOutputs("No run picked: pick one run to open, or two to compare.")
    ids = sorted(dict.fromkeys(run_ids))
    digest = hashlib.sha256(json.dumps([uri, ids]).encode()).hexdigest()[:16]
    folder = Path(cache) / digest
    if folder.is_dir():  # complete: written as a temporary folder and renamed
        return folder
    check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    runs = [_tracked_run(client, uri, run_id) for run_id in ids]
    return write_folder(folder, lambda tmp: [_download(client, run, tmp) for run in runs])


def _tracked_run(client: MlflowClient, uri: str, run_id: str):
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise MissingOutputs(
            f"No run `{run_id}` in the MLflow store `{uri}`: pick a run of the Runs page."
        ) from err
    params = run.data.params
    missing = [f for f in ("profile", "prompt_id", *PROFILE_FIELDS) if f not in params]
    logged = {a.path for a in client.list_artifacts(run_id)}
    lacking = [f for f in (paths.PRUNED_FILE, paths.SCORES_FILE) if f not in logged]
    if missing or lacking:
        what = f"params {missing}" if missing else f"artifacts {lacking}"
        raise MissingOutputs(
            f"Run `{run_id}` ({run.info.run_name}, {run.info.status}) is not a logged graph: it "
            f"lacks the {what} that the track stage logs with each (profile, prompt) result "
            "(a pipeline parent run or a failed run has none). Pick a run of the Runs page."
        )
    return run


def _download(client: MlflowClient, run, root: Path) -> None:
    """One run's files into `root` in the outputs layout."""
    params, run_id = run.data.params, run.info.run_id
    name, prompt = opened_profile(params["profile"], run_id), params["prompt_id"]
    logged = {a.path for a in client.list_artifacts(run_id)}
    info = {f: _param(params[f]) for f in PROFILE_FIELDS}
    info |= {"name": name, "enabled": True}
    write_json(paths.profile_dir(root, name) / paths.PROFILE_FILE, info)
    write_json(paths.graphs_dir(root, name) / paths.PROFILE_FILE, info)
    staging = root / ".download" / run_id
    wanted = {
        paths.PRUNED_FILE: paths.prompt_dir(root, name, prompt) / paths.PRUNED_FILE,
        paths.SCORES_FILE: paths.prompt_dir(root, name, prompt) / paths.SCORES_FILE,
        paths.CURVE_PLOT: paths.prompt_dir(root, name, prompt) / paths.CURVE_PLOT,
        f"{prompt}{paths.GRAPH_SUFFIX}": paths.graph_path(root, name, prompt),
    }
    if "validation" in logged:
        for entry in client.list_artifacts(run_id, "validation"):
            wanted[entry.path] = paths.validation_dir(root, name) / Path(entry.path).name
    for artifact, target in wanted.items():
        if artifact.partition("/")[0] not in logged:
            continue
        downloaded = Path(client.download_artifacts(run_id, artifact, str(staging)))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(downloaded, target)
    shutil.rmtree(root / ".download", ignore_errors=True)


def _param(value: str) -> str | None:
    """Params are logged as text: `None` was a missing value."""
    return None if value == "None" else value
