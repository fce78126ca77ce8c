"""MLflow adapter: log the files the pipeline wrote, one parent run per pipeline execution.

The only module that imports mlflow; the library core never calls it. Input, per profile and
prompt, is the pipeline's files in the layout of `tracer.experiments.outputs`: the prune stage's
`<root>/profiles/{profile}/{prompt_id}/` (`pruned.json`, `scores.json`, optional
`pruning_curve.png`) next to `<root>/profiles/{profile}/profile.json`, the attribute stage's graph
file `<root>/graphs/{profile}/{prompt_id}.safetensors` and timings `<root>/runs/{profile}.json`
(optional), the validate stage's `<root>/validation/{profile}/{prompt_id}.csv|json` (optional);
compare tables are `<root>/compare/*.csv|json`.

Each (profile, prompt) becomes a nested run keyed by the tag `tracer.run_key` (a sha256 of the
profile, the prompt id, the scores.json bytes, the graph file's sha256 and the validation JSON's
bytes; timings are not part of it). A run that already finished with the same key is not logged
again, and a pipeline with nothing new creates no parent run, so a repeated `dvc repro` (or a
stage re-run with identical results) logs nothing. Runs are written with an explicit
`MlflowClient`, never the fluent API's global active run, so several callers in one process
cannot step on each other.

A result's saved subgraphs (`subgraphs/PROFILE/PROMPT/NAME.json` of the explorer) go under its
run's artifact folder `subgraphs/`. Saving one does not change the graph, so it does not change the
run key: the files are added to the result's existing finished run, and the tag tracer.subgraphs
(a sha256 over their sorted names and bytes) says which versions it holds, so unchanged files are
not logged again. A file removed from the folder stays in the run.

The experiment carries the tag mlflow.experimentKind = custom_model_development, so MLflow 3's UI
opens it in its model-training view, and each parent run a markdown description
(mlflow.note.content) of what it logged.

Names, fixed so MLflow's compare view lines runs up across profiles:
- params: profile, model, revision, transcoders, transcoder_revision, dtype, family, prompt_id,
  node_threshold, edge_threshold, and every attribution setting of `graph.metadata["config"]`
  under its own name (max_n_logits, desired_logit_prob, batch_size, ...).
- metrics: SCORE_METRICS below, n_backward, seconds_<phase> for each phase of the run's timings
  "seconds" except "total", total_seconds (that "total", else the phases' sum),
  attribution_peak_growth_bytes (the growth of peak RSS during that prompt's attribution),
  validation_<mode>_spearman and validation_<mode>_median_relative_error, and the pruning curve
  as the series curve_<field> with step = the curve point's index.
- tags: tracer.run_key, tracer.profile, tracer.prompt_id, tracer.prompt_text (the prompt,
  for searching), tracer.version (the library version that wrote the graph), tracer.subgraphs,
  mlflow.source.git.commit / mlflow.source.git.dirty (from `git_tags`),
  tracer.dvc.stages (the dvc.lock stages of this profile, comma-joined) and tracer.dvc.hash
  (sha256 over their sorted "stage path md5" lines for deps and outs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tracer.experiments import outputs
from tracer.experiments.results import (
    ARTIFACTS,
    PROFILE_FIELDS,
    SCORE_METRICS,
    PromptResult,
    dvc_stage_tags,
    find_results,
)
from tracer.graph.graph import library_version

# Before mlflow is imported: it sets up its telemetry client at import time.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import (  # noqa: E402
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
)
from mlflow.utils.validation import (  # noqa: E402
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

RUN_KEY_TAG = "tracer.run_key"
SUBGRAPHS_TAG = "tracer.subgraphs"
SUBGRAPHS_ARTIFACTS = "subgraphs"  # the runs' artifact folder of saved subgraphs
# MLflow 3's UI opens an experiment of this kind in its model-training runs view, not the GenAI one
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
CURVE_FIELDS = (
    "node_threshold",
    "edge_threshold",
    "nodes",
    "edges",
    "replacement",
    "completeness",
)
OPTIONAL_ARTIFACTS = (outputs.CURVE_PLOT,)


# ---- the store ---------------------------------------------------------------------------------
def tracking_uri(default_path: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store at `default_path` (made absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_path).resolve()}"


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live next to its file (MLflow would use ./mlruns of the cwd);
    a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment).resolve().as_uri()


def ensure_store(uri: str, experiment: str = "tracer") -> str:
    """Create the store's schema and the experiment once (tagged with its kind, also when it
    exists without); returns the experiment id.

    Call this before any fan-out: processes that first touch a new sqlite file together race to
    create its schema and lose runs."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(
                experiment,
                _artifact_location(uri, experiment),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:  # another writer created it between our two calls
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


# ---- provenance --------------------------------------------------------------------------------
def git_tags(repo: str | Path) -> dict[str, str]:
    """The commit of `repo` and whether its tree is dirty; empty outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    # dvc.lock is rewritten by the stages that ran before tracking: not a sign of a dirty tree
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock")
    tags = {MLFLOW_GIT_COMMIT: commit.strip()}
    if status is not None:
        tags[MLFLOW_GIT_DIRTY] = str(bool(status.strip())).lower()
    return tags


# ---- what one nested run records ---------------------------------------------------------------
def run_params(result: PromptResult) -> dict[str, str]:
    graph_meta = result.graph_header["metadata"]
    params = {"profile": result.profile, "prompt_id": result.prompt_id}
    params |= {f: result.profile_info[f] for f in PROFILE_FIELDS}
    params["family"] = graph_meta.get("family")
    params["node_threshold"] = result.scores["node_threshold"]
    params["edge_threshold"] = result.scores["edge_threshold"]
    config = graph_meta.get("config") or {}
    clashes = sorted(set(config) & set(params))
    if clashes:
        raise ValueError(f"attribution settings {clashes} clash with run params of the same name")
    params |= config
    return {k: str(v) for k, v in params.items()}


def run_metrics(result: PromptResult) -> list[Metric]:
    """The run's metrics with `step` 0, and the pruning curve as series over its point index."""
    now = int(time.time() * 1000)
    values: dict[str, object] = {k: result.scores[k] for k in SCORE_METRICS}
    values["n_backward"] = result.graph_header["metadata"].get("n_backward")
    seconds = dict(result.timings.get("seconds") or {})
    if seconds:
        total = seconds.pop("total", None)
        values |= {f"seconds_{phase}": s for phase, s in seconds.items()}
        values["total_seconds"] = sum(seconds.values()) if total is None else total
    values["attribution_peak_growth_bytes"] = result.timings.get("attribution_peak_growth_bytes")
    if result.validation is not None:
        summary = json.loads(result.validation.read_text()).get("summary") or {}
        for mode, entry in summary.items():
            values[f"validation_{mode}_spearman"] = entry.get("spearman")
            values[f"validation_{mode}_median_relative_error"] = entry.get("median_relative_error")
    metrics = [Metric(k, _number(k, v, result), now, 0) for k, v in values.items() if v is not None]
    for step, point in enumerate(result.scores.get("curve") or []):
        metrics += [
            Metric(f"curve_{f}", _number(f"curve[{step}].{f}", point[f], result), now, step)
            for f in CURVE_FIELDS
            if f in point
        ]
    return metrics


def _number(key: str, value: object, result: PromptResult) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(
            f"{result.directory / 'scores.json'}: {key} must be a number, got {value!r}"
        )
    return float(value)


def run_tags(result: PromptResult, tags: dict[str, str], dvc_lock: Path | None) -> dict[str, str]:
    extra = dict(tags)
    extra |= {
        RUN_KEY_TAG: result.run_key,
        "tracer.profile": result.profile,
        "tracer.prompt_id": result.prompt_id,
        "tracer.prompt_text": str(result.graph_header.get("input_string"))[:MAX_TAG_VAL_LENGTH],
        "tracer.version": str(result.graph_header.get("library_version")),
    }
    if dvc_lock is not None and dvc_lock.is_file():
        extra |= dvc_stage_tags(dvc_lock, result.profile, result.directory.parent)
    return extra


# ---- logging -----------------------------------------------------------------------------------
def log_pipeline(
    root: str | Path,
    *,
    experiment: str = "tracer",
    uri: str | None = None,
    tags: dict[str, str] | None = None,
    dvc_lock: str | Path | None = None,
    feature_files: dict[str, list[Path]] | None = None,
    subgraph_files: dict[str, list[Path]] | None = None,
) -> dict:
    """Log every new (profile, prompt) result under `root` as a nested run of one parent run.

    `tags` go on the parent and every nested run; `dvc_lock` adds each profile's stage hashes;
    `feature_files[profile]` (its set's pages summary and labels file) go with each of its runs;
    `subgraph_files["profile/prompt"]` (saved subgraphs) go with that result's run, the new one or
    the one logged before, when they changed since. Returns {"experiment_id", "parent_run_id" (None
    when nothing was new), "logged": [{"name", "run_id"}], "skipped": [names already logged],
    "subgraphs": [{"name", "run_id"} whose subgraph files were logged now], "disabled_profiles":
    [names], "run_keys": {name: run key of every result, logged now or before}}."""
    uri = uri or tracking_uri("mlflow.db")
    tags = dict(tags or {})
    lock = Path(dvc_lock) if dvc_lock is not None else None
    subgraph_files = subgraph_files or {}
    results, disabled = find_results(root)
    experiment_id = ensure_store(uri, experiment)
    client = MlflowClient(tracking_uri=uri)
    earlier = {r.name: _logged_run(client, experiment_id, r.run_key) for r in results}
    new = [r for r in results if earlier[r.name] is None]
    summary: dict = {
        "experiment_id": experiment_id,
        "parent_run_id": None,
        "logged": [],
        "skipped": [name for name, run in earlier.items() if run is not None],
        "subgraphs": [],
        "disabled_profiles": disabled,
        "run_keys": {r.name: r.run_key for r in results},
    }
    for name in summary["skipped"]:
        run = earlier[name]
        if _log_subgraphs(client, run.info.run_id, subgraph_files.get(name, []), run.data.tags):
            summary["subgraphs"].append({"name": name, "run_id": run.info.run_id})
    if not new:
        return summary
    parent_tags = tags | {
        "tracer.version": library_version(),
        MLFLOW_RUN_NOTE: pipeline_note(new, tags),
    }
    with _run(client, experiment_id, "pipeline", parent_tags) as parent_id:
        summary["parent_run_id"] = parent_id
        client.log_batch(parent_id, params=[Param("root", str(Path(root).resolve()))])
        for table in _compare_tables(root):
            client.log_artifact(parent_id, str(table), "compare")
        for result in new:
            child_tags = run_tags(result, tags, lock) | {MLFLOW_PARENT_RUN_ID: parent_id}
            with _run(client, experiment_id, result.name, child_tags) as run_id:
                _log_result(client, run_id, result)
                for path in (feature_files or {}).get(result.profile, []):
                    client.log_artifact(run_id, str(path), "features")
                if _log_subgraphs(client, run_id, subgraph_files.get(result.name, []), {}):
                    summary["subgraphs"].append({"name": result.name, "run_id": run_id})
            summary["logged"].append({"name": result.name, "run_id": run_id})
    return summary


def _logged_run(client: MlflowClient, experiment_id: str, key: str) -> Run | None:
    """The newest finished run with this key; a failed or interrupted one is logged again."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def subgraphs_digest(files: list[Path]) -> str | None:
    """sha256 over the sorted (file name, content sha256) of a result's subgraph files; None
    for none."""
    if not files:
        return None
    entries = sorted(
        (Path(p).name, hashlib.sha256(Path(p).read_bytes()).hexdigest()) for p in files
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _log_subgraphs(client: MlflowClient, run_id: str, files: list[Path], run_tags: dict) -> bool:
    """Upload the files under the run's `subgraphs/` (a finished run too) unless the run holds
    these versions already; whether anything was uploaded."""
    digest = subgraphs_digest(files)
    if digest is None or run_tags.get(SUBGRAPHS_TAG) == digest:
        return False
    for path in files:
        client.log_artifact(run_id, str(path), SUBGRAPHS_ARTIFACTS)
    client.set_tag(run_id, SUBGRAPHS_TAG, digest)  # after the files: a failure uploads them again
    return True


def pipeline_note(results: list[PromptResult], tags: dict[str, str]) -> str:
    """The parent run's description (markdown): commit, what was logged, thresholds, and the
    nested runs' params per profile."""
    commit = tags.get(MLFLOW_GIT_COMMIT)
    if commit is None:
        source = "not a git checkout"
    else:
        dirty = {"true": " (uncommitted changes)", "false": " (clean)"}
        source = f"`{commit[:12]}`{dirty.get(tags.get(MLFLOW_GIT_DIRTY, ''), '')}"
    profiles = sorted({r.profile for r in results})
    prompts = sorted({r.prompt_id for r in results})
    thresholds = sorted({(r.scores["node_threshold"], r.scores["edge_threshold"]) for r in results})
    lines = [
        f"tracer pipeline: {len(results)} new result(s), one nested run `profile/prompt` each.",
        "",
        f"- commit: {source}",
        f"- profiles: {', '.join(profiles)}",
        f"- prompts: {', '.join(prompts)}",
        "- thresholds (node / edge): " + ", ".join(f"{n} / {e}" for n, e in thresholds),
        "",
        "| profile | model | transcoders | dtype | prompts |",
        "|---|---|---|---|---|",
    ]
    for profile in profiles:
        own = [r for r in results if r.profile == profile]
        info = own[0].profile_info
        model = _pinned(info.get("model"), info.get("revision"))
        sets = _pinned(info.get("transcoders"), info.get("transcoder_revision"))
        names = ", ".join(r.prompt_id for r in own)
        lines.append(f"| {profile} | {model} | {sets} | {info.get('dtype')} | {names} |")
    lines += [
        "",
        "Nested runs: params (model, transcoders, revisions, dtype, family, thresholds, attribution "
        "settings), metrics (scores, sizes, timings, validation, the pruning curve as curve_*), "
        "artifacts (graph, pruned.json, scores.json, plot, validation/, features/, subgraphs/).",
    ]
    return "\n".join(lines)


def _pinned(name: object, revision: object) -> str:
    return f"`{name}@{revision}`" if revision else f"`{name}`"


@contextmanager
def _run(client: MlflowClient, experiment_id: str, name: str, tags: dict) -> Iterator[str]:
    """A run that ends FINISHED, or FAILED if logging raised (so it is logged again next time)."""
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    status = RunStatus.FAILED
    try:
        for batch in _chunks(
            [RunTag(k, str(v)) for k, v in tags.items()], MAX_PARAMS_TAGS_PER_BATCH
        ):
            client.log_batch(run_id, tags=batch)
        yield run_id
        status = RunStatus.FINISHED
    finally:
        client.set_terminated(run_id, RunStatus.to_string(status))


def _log_result(client: MlflowClient, run_id: str, result: PromptResult) -> None:
    params = [Param(k, v) for k, v in run_params(result).items()]
    for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch)
    for batch in _chunks(run_metrics(result), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch)
    client.log_artifact(run_id, str(result.graph_path))
    for name in ARTIFACTS + OPTIONAL_ARTIFACTS:
        if (result.directory / name).is_file():
            client.log_artifact(run_id, str(result.directory / name))
    if result.validation is not None:
        client.log_artifact(run_id, str(result.validation), "validation")
        table = result.validation.with_suffix(".csv")
        if table.is_file():
            client.log_artifact(run_id, str(table), "validation")


def _compare_tables(root: str | Path) -> list[Path]:
    folder = Path(root) / "compare"
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in (".csv", ".json"))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- sweeps: one parent run, a nested run per prompt -------------------------------------------
class SweepTracker:
    """The MLflow side of `tracer sweep`: one parent run per sweep folder, reopened when the
    sweep is resumed (`parent_run_id` from its sweep.json), and one nested run per prompt result,
    keyed by its inputs hash (`tracer.run_key`) and logged once. Only the driver logs, so a
    sqlite store works for a cluster too; a server (`MLFLOW_TRACKING_URI`) is for several
    drivers. The store is created here, before any fan-out."""

    def __init__(
        self, uri: str, experiment: str, name: str, parent_run_id: str | None, tags: dict
    ) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = ensure_store(uri, experiment)
        self.tags = dict(tags)
        self.parent_id = self._reopen(parent_run_id)
        if self.parent_id is None:
            self.parent_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
            self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.logged = self._logged_keys()

    def _reopen(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None  # another store, or deleted: a new parent
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    def _logged_keys(self) -> set[str]:
        keys: set[str] = set()
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}' "
                "and attributes.status = 'FINISHED'",
                max_results=1000,
                page_token=token,
            )
            keys |= {r.data.tags.get(RUN_KEY_TAG) for r in page}
            token = page.token
            if not token:
                return keys - {None}

    def log(
        self, name: str, key: str, params: dict, metrics: dict, artifacts: list[Path]
    ) -> str | None:
        """A nested run for one prompt's result; None when a run with this key is logged."""
        if key in self.logged:
            return None
        tags = self.tags | {RUN_KEY_TAG: key, MLFLOW_PARENT_RUN_ID: self.parent_id}
        with _run(self.client, self.experiment_id, name, tags) as run_id:
            values = [Param(k, str(v)) for k, v in params.items()]
            for batch in _chunks(values, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=batch)
            now = int(time.time() * 1000)
            points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
            for batch in _chunks(points, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=batch)
            for path in artifacts:
                self.client.log_artifact(run_id, str(path))
        self.logged.add(key)
        return run_id

    def close(self, failed: bool) -> None:
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(self.parent_id, RunStatus.to_string(status))
