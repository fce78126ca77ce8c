"""End to end: `dvc repro` on a clean clone of what is committed, read back from MLflow.

Each test works in a `git clone` of this repository (never the working tree), with params.yaml cut
down to one enabled zoo profile and two prompts so the graphs stages take seconds; the zoo params
are left alone, so the zoo stages, committed with their outputs, must stay up to date. Stage
commands import `tracer` from the clone (PYTHONPATH), not from the editable install, and MLflow
numbers are checked against scores recomputed from the graph files. One clone is built per module;
tests that change it work on copies, and a copy that logs gets a store of its own (a store records
its artifact folder as an absolute path).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from stage_imports import ImportGraph, covers, dvc_stages

from tracer.experiments.tracking import ensure_store
from tracer.graph.graph import Graph

from mlflow import MlflowClient  # isort: skip  (after tracer.experiments.tracking disables telemetry)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # dvc and the stages' `python` come from this environment
PROFILE = "gpt2-clt"  # the one enabled zoo profile the tests keep
N_PROMPTS = 2
PARENT_TAG = "mlflow.parentRunId"
ARTIFACTS = {"pruned.json", "scores.json", "pruning_curve.png", "validation", "features"}  # + graph
HUMAN_LABEL = ("0:16", "florida after tampa")  # a feature of the two-hop graph, labelled by hand
PER_PROFILE = ("fetch", "attribute", "prune", "validate")
RUNNING = re.compile(r"Running stage '([^']+)'")
LAST = ("compare", "track")  # the stages after the per-profile ones

pytestmark = pytest.mark.slow


# ---- running things in a clone -----------------------------------------------------------------
def clone_env(clone: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(clone)  # the clone's tracer, not the editable install's
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env | extra


def execute(clone: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command in `clone`: (exit code, stdout and stderr interleaved)."""
    done = subprocess.run(
        args,
        cwd=clone,
        env=env or clone_env(clone),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout


def run(clone: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed; returns its output."""
    code, output = execute(clone, *args, env=env)
    assert code == 0, f"{' '.join(args)} exited {code}:\n{output}"
    return output


def repro(clone: Path) -> tuple[int, str]:
    return execute(clone, "dvc", "repro")


def read_params(clone: Path) -> dict:
    return yaml.safe_load((clone / "params.yaml").read_text())


def write_params(clone: Path, params: dict) -> None:
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit_params(clone: Path, edit: Callable[[dict], None]) -> None:
    params = read_params(clone)
    edit(params)
    write_params(clone, params)


def cut_down(params: dict) -> None:
    """One enabled zoo profile (the disabled hub profiles stay), the first two prompts, the
    feature pages of that profile's set only, over a few thousand tokens."""
    params["profiles"] = {
        name: profile
        for name, profile in params["profiles"].items()
        if name == PROFILE or profile.get("enabled", True) is False
    }
    params["prompts"] = params["prompts"][:N_PROMPTS]
    sets = params["features"]["sets"]
    params["features"]["sets"] = {name: p for name, p in sets.items() if p == PROFILE}
    params["features"]["n_tokens"] = 3000


def digests(root: Path, *folders: str) -> dict[str, str]:
    """sha256 of every file under `folders` of `root`, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def changed_paths(clone: Path) -> list[str]:
    return sorted(line[3:] for line in run(clone, "git", "status", "--porcelain").splitlines())


def uncached_files(clone: Path) -> set[str]:
    """Every file of the pipeline stages' `cache: false` outputs (the zoo's are committed)."""
    found = set()
    for stage in dvc_stages(clone):
        for out in stage.uncached:
            path = clone / out
            if not stage.name.startswith("zoo_"):
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                found |= {f.relative_to(clone).as_posix() for f in files}
    return found


def dvc_status(clone: Path) -> dict:
    """`dvc status --json`: stage name -> what changed; {} when everything is up to date."""
    return json.loads(run(clone, "dvc", "status", "--json").strip().splitlines()[-1])


# ---- the MLflow store --------------------------------------------------------------------------
def sqlite_uri(clone: Path) -> str:
    return f"sqlite:///{clone / 'mlflow.db'}"


def store_runs(uri: str, experiment: str = "tracer") -> tuple[list, list]:
    """(parent runs, nested runs) of `experiment`."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    return parents, [r for r in runs if PARENT_TAG in r.data.tags]


def relog_store(clone: Path) -> None:
    """Replace a copied clone's store by one logged from its own outputs (1 parent, 2 runs)."""
    (clone / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(clone / "mlartifacts", ignore_errors=True)
    run(clone, "python", "pipelines/track.py")


@dataclass(frozen=True)
class Built:
    clone: Path
    output: str  # of the first `dvc repro`
    head: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A clone with cut-down params committed, after one `dvc repro`."""
    clone = tmp_path_factory.mktemp("pipeline") / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    run(clone, "git", "config", "user.name", "tracer tests")
    run(clone, "git", "config", "user.email", "tests@tracer.invalid")
    edit_params(clone, cut_down)
    # the committed `cache: false` outputs belong to the full params: a cut-down project starts
    # without them, as a new project does
    run(clone, "git", "rm", "-r", "--quiet", "--ignore-unmatch", "outputs")
    (clone / "labels" / f"{PROFILE}.tsv").write_text("\t".join(HUMAN_LABEL) + "\n")
    run(clone, "git", "add", "labels")
    run(clone, "git", "commit", "--quiet", "-am", "test: one profile, two prompts, one label")
    head = run(clone, "git", "rev-parse", "HEAD").strip()
    code, output = repro(clone)
    assert code == 0, f"dvc repro failed ({code}):\n{output}"
    return Built(clone, output, head)


def copy_of(built: Built, tmp_path: Path) -> Path:
    clone = tmp_path / "repo"
    shutil.copytree(built.clone, clone, symlinks=True)
    relog_store(clone)
    return clone


# ---- 1. a clean clone --------------------------------------------------------------------------
def test_repro_on_a_clean_clone_logs_every_result_once(built: Built) -> None:
    clone, output = built.clone, built.output
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    zoo_stages = [name for name in lock if name.startswith("zoo_")]
    assert zoo_stages
    for name in zoo_stages:
        assert f"Stage '{name}' didn't change, skipping" in output
    running = RUNNING.findall(output)
    assert not [name for name in running if name.startswith("zoo_")]
    params = read_params(clone)
    enabled = [n for n, p in params["profiles"].items() if p.get("enabled", True)]
    assert enabled == [PROFILE]
    per_profile = {f"{stage}@{n}" for stage in PER_PROFILE for n in params["profiles"]}
    assert running[0] == "params"  # validation fails the run before anything else starts
    assert set(running) == {"params", "dataset", f"features@{PROFILE}", "compare", "track"} | (
        per_profile
    )
    # the human label is the viewer document's clerp of that feature's nodes
    layer, feature = HUMAN_LABEL[0].split(":")
    document = json.loads(
        (clone / f"outputs/profiles/{PROFILE}/two-hop-tampa/pruned.json").read_text()
    )
    labelled = [n for n in document["nodes"] if n["node_id"].startswith(f"{layer}_{feature}_")]
    assert labelled and all(n["clerp"] == HUMAN_LABEL[1] for n in labelled)

    parents, nested = store_runs(sqlite_uri(clone), params["tracking"]["experiment"])
    assert len(parents) == 1 and len(nested) == len(enabled) * N_PROMPTS
    prompt_ids = [p["id"] for p in params["prompts"]]
    assert sorted(r.info.run_name for r in nested) == sorted(f"{PROFILE}/{p}" for p in prompt_ids)
    client = MlflowClient(tracking_uri=sqlite_uri(clone))
    node_t, edge_t = params["pruning"]["node_threshold"], params["pruning"]["edge_threshold"]
    profile = params["profiles"][PROFILE]
    for logged in nested:
        assert logged.info.status == "FINISHED"
        assert logged.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert logged.data.tags["mlflow.source.git.commit"] == built.head
        stages = logged.data.tags["tracer.dvc.stages"].split(",")
        # its stages, and the pages of its transcoder set
        assert sorted(stages) == sorted([*stages_of(PROFILE), f"features@{PROFILE}"])
        prompt = logged.data.params["prompt_id"]
        expected = {
            "profile": PROFILE,
            "model": profile["model"],
            "transcoders": profile["transcoders"],
            "dtype": profile.get("dtype", "float32"),
            "node_threshold": str(node_t),
            "edge_threshold": str(edge_t),
        } | {key: str(value) for key, value in params["attribution"].items()}
        assert {k: logged.data.params.get(k) for k in expected} == expected

        path = clone / "outputs" / "graphs" / PROFILE / f"{prompt}.safetensors"
        graph = Graph.load(path)
        result = graph.prune(node_t, edge_t)
        full, pruned = graph.scores(), graph.scores(result)
        recomputed = {
            "replacement": full.replacement,
            "completeness": full.completeness,
            "pruned_replacement": pruned.replacement,
            "pruned_completeness": pruned.completeness,
            "nodes": graph.layout.n_nodes,
            "edges": int((graph.adjacency_matrix != 0).sum()),
            "pruned_nodes": int(result.node_mask.sum()),
            "pruned_edges": int(result.edge_mask.sum()),
            "active_features": graph.active_features.shape[0],
        }
        metrics = {k: logged.data.metrics[k] for k in recomputed}
        assert metrics == pytest.approx(recomputed, rel=1e-6, abs=1e-9)

        run_id = logged.info.run_id
        assert {a.path for a in client.list_artifacts(run_id)} == ARTIFACTS | {path.name}
        # the set's pages summary and labels file go with the run
        features = {a.path for a in client.list_artifacts(run_id, "features")}
        assert features == {"features/summary.json", f"features/{PROFILE}.tsv"}
        summary = client.download_artifacts(run_id, "features/summary.json", str(clone.parent))
        pages = clone / "outputs" / "features" / PROFILE / "summary.json"
        assert Path(summary).read_bytes() == pages.read_bytes()
        assert logged.info.artifact_uri.startswith((clone / "mlartifacts").as_uri())
        copy = client.download_artifacts(run_id, path.name, str(clone.parent))
        uploaded = Graph.load(copy)
        assert torch.equal(uploaded.adjacency_matrix, graph.adjacency_matrix)
        assert uploaded.scores() == full

    lock_before = (clone / "dvc.lock").read_bytes()
    code, again = repro(clone)
    assert code == 0, again
    assert RUNNING.findall(again) == []
    assert "Data and pipelines are up to date." in again
    assert (clone / "dvc.lock").read_bytes() == lock_before
    assert [len(runs) for runs in store_runs(sqlite_uri(clone))] == [1, len(nested)]
    # DVC stages its lock file itself (core.autostage in .dvc/config). Outputs in DVC's cache are
    # git-ignored; the `cache: false` ones (metrics, plots, compare tables) are for git to commit.
    status = run(clone, "git", "status", "--porcelain", "--untracked-files=all").splitlines()
    assert status[0] == "M  dvc.lock"
    untracked = {line[3:] for line in status[1:] if line.startswith("?? ")}
    assert len(untracked) == len(status) - 1
    assert untracked == uncached_files(clone)
    assert {f"outputs/metrics/{PROFILE}.json", "outputs/tracking.json"} <= untracked


def test_metrics_and_plots_show_the_logged_numbers(built: Built) -> None:
    clone = built.clone
    shown = json.loads(run(clone, "dvc", "metrics", "show", "--json"))
    (workspace,) = shown.values()  # one revision: the workspace
    assert "error" not in workspace
    summary = workspace["data"][f"outputs/metrics/{PROFILE}.json"]["data"]
    _, nested = store_runs(sqlite_uri(clone))
    for logged in nested:
        numbers = summary[logged.data.params["prompt_id"]]
        assert numbers == pytest.approx({k: logged.data.metrics[k] for k in numbers})

    plots = json.loads(run(clone, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors")
    (plot,) = plots["data"][f"outputs/plots/{PROFILE}.json"]
    points = plot["content"]["data"]["values"]
    sweep = read_params(clone)["pruning"]["sweep"]
    assert len(points) == N_PROMPTS * len(sweep)
    assert Counter(p["prompt"] for p in points) == Counter(
        {p["id"]: len(sweep) for p in read_params(clone)["prompts"]}
    )


# ---- 2. one profile changes --------------------------------------------------------------------
def stages_run_after(clone: Path, edit: Callable[[dict], None]) -> list[str]:
    edit_params(clone, edit)
    code, output = repro(clone)
    assert code == 0, output
    return RUNNING.findall(output)


def newest_pipeline(uri: str) -> tuple[int, int, list]:
    """(parent runs, nested runs, the nested runs of the newest parent)."""
    parents, nested = store_runs(uri)
    newest = max(parents, key=lambda r: r.info.start_time).info.run_id
    return len(parents), len(nested), [r for r in nested if r.data.tags[PARENT_TAG] == newest]


def stages_of(profile: str) -> list[str]:
    return [f"{stage}@{profile}" for stage in PER_PROFILE]


def test_changing_one_profile_reruns_only_its_stages(built: Built, tmp_path: Path) -> None:
    clone = copy_of(built, tmp_path)
    uri = sqlite_uri(clone)
    untouched = digests(clone, "zoo")

    running = stages_run_after(clone, lambda p: p["profiles"][PROFILE].update(dtype="float64"))
    assert running[0] == "params" and running[-2:] == list(LAST)
    # the profile's stages and its set's pages (built with its model, now in float64); new pages
    # may relabel any graph's nodes, so every prune stage runs (a disabled one just records that)
    prunes = {f"prune@{name}" for name in read_params(clone)["profiles"]}
    assert sorted(running[1:-2]) == sorted({*stages_of(PROFILE), f"features@{PROFILE}"} | prunes)
    n_parents, n_nested, children = newest_pipeline(uri)
    assert (n_parents, n_nested) == (2, 2 * N_PROMPTS)
    assert [r.data.params["dtype"] for r in children] == ["float64"] * N_PROMPTS

    added = "gpt2-plt"
    plt = {"model": "zoo/models/gpt2", "transcoders": "zoo/transcoders/gpt2/plt-jumprelu"}
    running = stages_run_after(clone, lambda p: p["profiles"].update({added: plt}))
    assert running[0] == "params" and running[-2:] == list(LAST)
    assert sorted(running[1:-2]) == sorted(stages_of(added))  # no pages for its set listed
    n_parents, n_nested, children = newest_pipeline(uri)
    assert (n_parents, n_nested) == (3, 3 * N_PROMPTS)  # the unchanged profile is not logged again
    assert [r.data.params["profile"] for r in children] == [added] * N_PROMPTS
    assert digests(clone, "zoo") == untouched


def test_new_thresholds_reprune_without_attributing(built: Built, tmp_path: Path) -> None:
    clone = copy_of(built, tmp_path)
    graphs = digests(clone, "outputs/graphs")
    running = stages_run_after(clone, lambda p: p["pruning"].update(node_threshold=0.6))
    # every profile's prune stage (a disabled one just records that), no other per-profile stage:
    # in particular the feature pages are not built again
    prunes = sorted(f"prune@{name}" for name in read_params(clone)["profiles"])
    assert running[0] == "params" and running[-2:] == list(LAST)
    assert sorted(running[1:-2]) == prunes
    assert digests(clone, "outputs/graphs") == graphs
    _, _, children = newest_pipeline(sqlite_uri(clone))
    assert [r.data.params["node_threshold"] for r in children] == ["0.6"] * N_PROMPTS


def test_a_new_dataset_rebuilds_the_pages_and_relabels(built: Built, tmp_path: Path) -> None:
    clone = copy_of(built, tmp_path)
    before = digests(clone, f"outputs/features/{PROFILE}")
    lines = (clone / "zoo/corpus/train.txt").read_text().splitlines()
    data = "".join(json.dumps({"text": t}) + "\n" for t in lines[::-3]).encode()
    (clone / "datasets/texts.jsonl").write_bytes(data)
    running = stages_run_after(
        clone, lambda p: p["features"].update(dataset="datasets/texts.jsonl")
    )
    prunes = {f"prune@{name}" for name in read_params(clone)["profiles"]}
    assert running[0] == "params" and running[-2:] == list(LAST)
    assert sorted(running[1:-2]) == sorted({"dataset", f"features@{PROFILE}"} | prunes)
    assert digests(clone, f"outputs/features/{PROFILE}") != before
    index = json.loads((clone / f"outputs/features/{PROFILE}/index.json").read_text())
    assert index["dataset"] == "datasets/texts.jsonl"
    assert index["dataset_sha256"] == hashlib.sha256(data).hexdigest()
    # the viewer documents carry the new pages' labels
    document = json.loads(
        (clone / f"outputs/profiles/{PROFILE}/two-hop-tampa/pruned.json").read_text()
    )
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and any(n["clerp"] for n in features)


def test_attributing_again_gives_identical_files_and_logs_nothing(
    built: Built, tmp_path: Path
) -> None:
    """What a clone without the DVC cache does (the stages run again) changes nothing: timings
    live outside the hashed outputs."""
    clone = copy_of(built, tmp_path)
    lock = (clone / "dvc.lock").read_bytes()
    before = digests(clone, "outputs/graphs", "outputs/profiles", "outputs/validation")
    runs = [len(r) for r in store_runs(sqlite_uri(clone))]
    run(clone, "dvc", "repro", "--force", "--downstream", f"fetch@{PROFILE}")
    assert digests(clone, "outputs/graphs", "outputs/profiles", "outputs/validation") == before
    assert (clone / "dvc.lock").read_bytes() == lock
    assert [len(r) for r in store_runs(sqlite_uri(clone))] == runs
    timings = json.loads((clone / "outputs" / "runs" / f"{PROFILE}.json").read_text())
    assert set(timings) == {p["id"] for p in read_params(clone)["prompts"]}
    assert all(
        t["seconds"]["total"] > 0 and t["attribution_peak_growth_bytes"] > 0
        for t in timings.values()
    )


# ---- 2b. code changes ---------------------------------------------------------------------------
EDITED = ("tracer/model/freezing.py", "tracer/graph/storage.py")


def test_editing_engine_code_changes_the_stages_that_execute_it(
    built: Built, tmp_path: Path
) -> None:
    """`dvc status` names every stage that executes an edited module (tests/stage_imports.py),
    and, of the zoo stages, only those: the others must not retrain."""
    clone = tmp_path / "repo"
    shutil.copytree(built.clone, clone, symlinks=True)
    stages = dvc_stages(clone)
    graph = ImportGraph(clone)
    for module in EDITED:
        path = clone / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            changed = set(dvc_status(clone))
        finally:
            path.write_text(original)
        executing = {s.name for s in stages if module in graph.execute(s.cmd).files}
        assert {"attribute", "validate"} <= {name.split("@")[0] for name in executing}
        assert executing <= changed, module
        assert changed == {s.name for s in stages if any(covers(d, module) for d in s.deps)}
        zoo = {name for name in changed if name.startswith("zoo_")}
        assert zoo == {name for name in executing if name.startswith("zoo_")}, module


# ---- 3. invalid params -------------------------------------------------------------------------
def _unknown_key(p: dict) -> None:
    p["pruning"]["node_treshold"] = 0.5


def _node_threshold(p: dict) -> None:
    p["pruning"]["node_threshold"] = 1.5


def _missing_model(p: dict) -> None:
    p["profiles"][PROFILE]["model"] = "zoo/models/missing"


def _duplicate_prompt(p: dict) -> None:
    p["prompts"].append(dict(p["prompts"][0], text="another text"))


def _all_disabled(p: dict) -> None:
    p["profiles"][PROFILE]["enabled"] = False


def _unknown_section(p: dict) -> None:
    p["prunning"] = {"node_threshold": 0.5}  # no stage lists it, the params stage reads it all


INVALID = {
    "unknown-key": (_unknown_key, "pruning.node_treshold: Extra inputs are not permitted"),
    "unknown-section": (_unknown_section, "prunning: Extra inputs are not permitted"),
    "node-threshold": (_node_threshold, "pruning.node_threshold: Input should be less than"),
    "missing-model": (_missing_model, f"profiles.{PROFILE}.model: local path"),
    "duplicate-prompt": (_duplicate_prompt, "prompts: duplicate id(s) ['two-hop-tampa']"),
    "all-disabled": (_all_disabled, "profiles: every profile is disabled"),
}
OUTPUTS = (
    "outputs/fetched",
    "outputs/graphs",
    "outputs/profiles",
    "outputs/validation",
    "outputs/metrics",
    "outputs/plots",
)


@dataclass(frozen=True)
class Snapshot:
    clone: Path
    params: str  # the valid params.yaml
    outputs: dict[str, str]
    lock: bytes
    status: list[str]  # git status --porcelain
    runs: tuple[int, int]


@pytest.fixture(scope="module")
def valid(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """A copy of the built clone, shared by the invalid-params tests, which restore its params.

    Its store is the copied one: nothing may log here, so the count is all that is read."""
    clone = tmp_path_factory.mktemp("invalid") / "repo"
    shutil.copytree(built.clone, clone, symlinks=True)
    parents, nested = store_runs(sqlite_uri(clone))
    return Snapshot(
        clone,
        (clone / "params.yaml").read_text(),
        digests(clone, *OUTPUTS),
        (clone / "dvc.lock").read_bytes(),
        changed_paths(clone),
        (len(parents), len(nested)),
    )


@pytest.mark.parametrize("variant", list(INVALID))
def test_invalid_params_fail_naming_the_key(valid: Snapshot, variant: str) -> None:
    edit, message = INVALID[variant]
    clone = valid.clone
    try:
        edit_params(clone, edit)
        code, output = repro(clone)
    finally:
        (clone / "params.yaml").write_text(valid.params)
    assert code != 0, output
    # The params stage (python -m tracer.experiments.params) prints load_params' message; DVC names the stage.
    errors = [line for line in output.splitlines() if line.startswith("invalid parameters: ")]
    assert len(errors) == 1 and message in errors[0], output
    assert "ERROR: failed to reproduce 'params'" in output
    assert RUNNING.findall(output) == ["params"]
    assert digests(clone, *OUTPUTS) == valid.outputs
    parents, nested = store_runs(sqlite_uri(clone))
    assert (len(parents), len(nested)) == valid.runs
    assert (clone / "dvc.lock").read_bytes() == valid.lock
    assert changed_paths(clone) == valid.status


def test_valid_params_again_run_nothing(valid: Snapshot) -> None:
    code, output = repro(valid.clone)
    assert code == 0, output
    assert RUNNING.findall(output) == []
    assert digests(valid.clone, *OUTPUTS) == valid.outputs


# ---- 4. parallel experiments -------------------------------------------------------------------
def queue_rows(clone: Path, env: dict[str, str]) -> dict[str, str]:
    """Task name -> status, from `dvc queue status`."""
    rows = {}
    for line in run(clone, "dvc", "queue", "status", env=env).splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-1] in {"Queued", "Running", "Success", "Failed"}:
            rows[fields[1]] = fields[-1]
    return rows


def test_queued_experiments_in_parallel_log_every_run(built: Built, tmp_path: Path) -> None:
    clone = tmp_path / "repo"
    shutil.copytree(built.clone, clone, symlinks=True)
    (clone / "mlflow.db").unlink()
    shutil.rmtree(clone / "mlartifacts")
    # Experiments run in temporary copies under .dvc/tmp/exps, where track.py's default store
    # (mlflow.db next to pipelines/) is thrown away with the copy: name one store for all.
    uri = sqlite_uri(clone)
    env = clone_env(clone, MLFLOW_TRACKING_URI=uri)
    ensure_store(uri, read_params(clone)["tracking"]["experiment"])  # before any fan-out

    thresholds = ("0.7", "0.9")
    for node_t in thresholds:
        run(
            clone, "dvc", "exp", "run", "--queue", "-S", f"pruning.node_threshold={node_t}", env=env
        )
    assert list(queue_rows(clone, env).values()) == ["Queued"] * len(thresholds)
    try:
        # The workers it spawns inherit its stdout: not a pipe, or waiting for the command's output
        # waits for the workers too (a worker that lingers after "shutting down due to empty
        # queue" then hangs the test); the queue's status below says how they did.
        subprocess.run(
            ("dvc", "queue", "start", "-j", str(len(thresholds))),
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=True,
        )
        deadline = time.monotonic() + 900  # each experiment also rebuilds its (uncommitted) pages
        rows = queue_rows(clone, env)
        while {"Queued", "Running"} & set(rows.values()) and time.monotonic() < deadline:
            time.sleep(5)
            rows = queue_rows(clone, env)
    finally:
        execute(clone, "dvc", "queue", "stop", "--kill", env=env)
    logs = "\n".join(p.read_text() for p in (clone / ".dvc/tmp/exps/celery").glob("*.out"))
    assert list(rows.values()) == ["Success"] * len(thresholds), f"{rows}\n{logs[-4000:]}"

    parents, nested = store_runs(uri)
    assert len(parents) == len(thresholds)
    assert all(r.info.status == "FINISHED" for r in parents + nested)
    assert Counter(r.data.params["node_threshold"] for r in nested) == Counter(
        {t: N_PROMPTS for t in thresholds}
    )
    assert Counter(r.data.tags[PARENT_TAG] for r in nested) == Counter(
        {p.info.run_id: N_PROMPTS for p in parents}
    )
    for logged in nested:
        threshold = float(logged.data.params["node_threshold"])
        assert logged.data.metrics["pruned_nodes"] > 0
        assert logged.info.artifact_uri.startswith((clone / "mlartifacts").as_uri())
        name = f"{logged.data.params['prompt_id']}.safetensors"
        graph = Graph.load(
            MlflowClient(tracking_uri=uri).download_artifacts(
                logged.info.run_id, name, str(tmp_path)
            )
        )
        pruned = graph.prune(threshold, float(logged.data.params["edge_threshold"]))
        assert logged.data.metrics["pruned_nodes"] == int(pruned.node_mask.sum())


# ---- 5. sharing through git and a DVC remote ---------------------------------------------------
def test_a_clone_pulled_from_a_remote_runs_nothing(built: Built, tmp_path: Path) -> None:
    """As a team shares results: the author pushes DVC's cache to a remote and commits dvc.lock
    with the `cache: false` outputs; a teammate clones, pulls, and `dvc repro` runs nothing."""
    origin = tmp_path / "origin"
    shutil.copytree(built.clone, origin, symlinks=True)
    run(origin, "dvc", "remote", "add", "--default", "shared", str(tmp_path / "remote"))
    run(origin, "dvc", "push")
    run(origin, "git", "add", "--all")
    run(origin, "git", "commit", "--quiet", "-m", "results")

    team = tmp_path / "team"
    run(tmp_path, "git", "clone", "--quiet", str(origin), str(team))
    run(team, "dvc", "pull")
    assert dvc_status(team) == {}
    code, output = repro(team)
    assert code == 0, output
    assert RUNNING.findall(output) == []
    assert "Data and pipelines are up to date." in output
    shared = (*OUTPUTS, "outputs/compare")
    assert digests(team, *shared) == digests(origin, *shared)
    assert run(team, "git", "status", "--porcelain", "--untracked-files=all") == ""
    # .gitignore let exactly the `cache: false` outputs through
    assert set(run(origin, "git", "ls-files", "outputs").splitlines()) == uncached_files(origin)


# ---- 6. the explorer's subgraphs and Runs page -------------------------------------------------
def test_a_saved_subgraph_joins_its_results_existing_run(built: Built, tmp_path: Path) -> None:
    clone = copy_of(built, tmp_path)
    uri = sqlite_uri(clone)
    _, before = store_runs(uri)
    prompt = read_params(clone)["prompts"][0]["id"]
    document = json.loads((clone / f"outputs/profiles/{PROFILE}/{prompt}/pruned.json").read_text())
    ids = [n["node_id"] for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    saved = clone / "subgraphs" / PROFILE / prompt / "x.json"
    saved.parent.mkdir(parents=True)
    subgraph = {"pinnedIds": ids[:3], "supernodes": [["pair", *ids[:2]]]}
    saved.write_text(
        json.dumps({"name": "x", "profile": PROFILE, "prompt": prompt} | {"qParams": subgraph})
    )
    code, output = repro(clone)
    assert code == 0, output
    assert RUNNING.findall(output) == ["track"]
    _, after = store_runs(uri)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    client = MlflowClient(tracking_uri=uri)
    for logged in after:
        found = {a.path for a in client.list_artifacts(logged.info.run_id, "subgraphs")}
        assert found == (
            {"subgraphs/x.json"} if logged.data.params["prompt_id"] == prompt else set()
        )
    (run_id,) = [r.info.run_id for r in after if r.data.params["prompt_id"] == prompt]
    copy = client.download_artifacts(run_id, "subgraphs/x.json", str(tmp_path))
    assert Path(copy).read_bytes() == saved.read_bytes()


def test_runs_page_lists_the_logged_runs_and_opens_one(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest
    from test_dashboard_runs import runs_table

    from dashboards.runs import SCORE_COLUMNS, open_runs, opened_profile

    clone, uri = built.clone, sqlite_uri(built.clone)
    monkeypatch.setenv("TRACER_OUTPUTS", str(clone / "outputs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TRACER_RUNS_CACHE", str(tmp_path / "cache"))
    app = AppTest.from_file(str(REPO / "dashboards" / "app.py"), default_timeout=120).run()
    app.switch_page("views/runs.py").run()
    assert not app.exception, [e.value for e in app.exception]
    table = runs_table(app)
    _, nested = store_runs(uri)
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in nested)
    assert len(table) == N_PROMPTS
    for row in table.itertuples():
        (logged,) = [r for r in nested if r.info.run_id == row.run_id]
        scores = json.loads(
            (clone / f"outputs/profiles/{row.profile}/{row.prompt}/scores.json").read_text()
        )
        shown = {c: getattr(row, c) for c in SCORE_COLUMNS}
        assert shown == {c: logged.data.metrics[c] for c in SCORE_COLUMNS}
        assert shown == {c: scores[c] for c in SCORE_COLUMNS}
        assert (row.profile, row.git_commit) == (PROFILE, built.head)

    logged = nested[0]
    folder = open_runs(uri, [logged.info.run_id], tmp_path / "cache")
    prompt = logged.data.params["prompt_id"]
    opened = folder / "profiles" / opened_profile(PROFILE, logged.info.run_id) / prompt
    original = clone / "outputs" / "profiles" / PROFILE / prompt
    assert (opened / "pruned.json").read_bytes() == (original / "pruned.json").read_bytes()


def test_pinning_and_ablating_on_the_pipelines_outputs(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Graph and Interventions pages on what `dvc repro` wrote: the subgraph of two pinned
    features scores as `Graph.scores` on those nodes, and ablating them on the profile's fetched
    zoo model in direct mode changes each graph logit by the graph's direct prediction."""
    from streamlit.testing.v1 import AppTest
    from test_subgraphs import independent_scores, index_of

    clone = built.clone
    prompt = read_params(clone)["prompts"][0]["id"]
    monkeypatch.setenv("TRACER_OUTPUTS", str(clone / "outputs"))
    app = AppTest.from_file(str(REPO / "dashboards" / "app.py"), default_timeout=300)
    app.query_params.update(profile=PROFILE, prompt=prompt)  # a link to that graph
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.title[0].value == f"{PROFILE} / {prompt}"
    document = json.loads((clone / f"outputs/profiles/{PROFILE}/{prompt}/pruned.json").read_text())
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    two = [n["node_id"] for n in sorted(features, key=lambda n: -n["influence"])[:2]]
    (picker,) = [w for w in app.multiselect if w.label == "pinned nodes"]
    picker.set_value(two).run()
    assert not app.exception, [e.value for e in app.exception]
    graph = Graph.load(clone / "outputs" / "graphs" / PROFILE / f"{prompt}.safetensors")
    expected = independent_scores(graph, [index_of(graph, n) for n in two])
    shown = {m.label: m.value for m in app.metric}
    assert float(shown["replacement (subgraph)"]) == pytest.approx(expected.replacement, abs=6e-5)
    assert float(shown["completeness (subgraph)"]) == pytest.approx(expected.completeness, abs=6e-5)

    app.switch_page("views/interventions.py").run()
    (mode,) = [w for w in app.selectbox if w.label == "mode"]
    mode.set_value("direct")
    (button,) = [b for b in app.button if b.label == "Run intervention"]
    button.click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    (logits,) = [d.value for d in app.dataframe if "predicted_direct" in d.value.columns]
    assert len(logits) == len(graph.logit_targets)
    scale = float(logits["measured"].abs().max())
    assert scale > 0  # the ablation moved the logits
    assert logits["measured"].tolist() == pytest.approx(
        logits["predicted_direct"].tolist(), abs=1e-4 * scale
    )
