"""MLflow tracking of pipeline outputs: real tiny graphs written in the prune stage's layout, logged
to a sqlite store, a real `mlflow server` and two concurrent writers, read back and compared with
numbers recomputed from the graph files."""

from __future__ import annotations

import csv
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port, stop_process

from tracer.atomic import write_json
from tracer.attribution.attribute import attribute
from tracer.experiments import outputs, tracking
from tracer.experiments.report import prompt_report
from tracer.experiments.results import dvc_stage_tags, file_sha256, run_key
from tracer.experiments.tracking import RUN_KEY_TAG, ensure_store, log_pipeline, tracking_uri
from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph
from tracer.interventions.validation import spearman, validate_graph
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders

MLFLOW = Path(sys.executable).with_name("mlflow")
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
PROMPTS = {"capital": "the capital of the state containing Dallas is", "short": "the state of"}
PROFILES = {"tiny-plt": "plt-relu", "tiny-clt": "clt"}
CURVE = [(0.5, 0.9), (0.8, 0.98), (0.95, 0.995)]
THRESHOLDS = (0.8, 0.98)
PARENT_TAG = "mlflow.parentRunId"


# ---- the pipeline stages' files, written with tracer's own functions ---------------------------
def write_prompt(
    graph: Graph, root: Path, profile: str, prompt: str, *, plot: bool, validation=None
) -> dict:
    """The attribute, prune and (optionally) validate stages' files; returns the run's timings."""
    directory = outputs.prompt_dir(root, profile, prompt)
    start = time.perf_counter()
    pruned = prune_graph(graph, *THRESHOLDS, slug=prompt)
    seconds = graph.metadata.pop("timings") | {"prune": time.perf_counter() - start}
    scores = prompt_report(graph, pruned, CURVE)
    graph.save(outputs.graph_path(root, profile, prompt))
    write_json(directory / "pruned.json", pruned.document)
    write_json(directory / "scores.json", scores)
    if plot:  # any bytes do: the tracker uploads the file as it is
        (directory / "pruning_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    if validation is not None:
        report = validate_graph(graph, validation, top_n=2, modes=("direct", "full"))
        report.to_json(outputs.validation_dir(root, profile) / f"{prompt}.json")
        report.to_csv(outputs.validation_dir(root, profile) / f"{prompt}.csv")
    return {
        "seconds": seconds | {"total": sum(seconds.values())},
        "attribution_peak_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def write_profile(root: Path, name: str, model: ReplacementModel, *, enabled: bool = True) -> None:
    profile_dir = root / "profiles" / name
    profile = {
        "name": name,
        "model": model.model_id,
        "revision": None,
        "transcoders": f"fixtures/{name}",
        "transcoder_revision": "v1",
        "dtype": "float32",
        "enabled": enabled,
    }
    write_json(profile_dir / "profile.json", profile)
    runs = {}
    for index, (prompt_id, prompt) in enumerate(PROMPTS.items()):
        graph = attribute(prompt, model, max_n_logits=3, progress=False)
        validation = model if name == "tiny-clt" else None
        runs[prompt_id] = write_prompt(
            graph, root, name, prompt_id, plot=index == 0, validation=validation
        )
    write_json(outputs.runs_path(root, name), runs)


def copy_profile(pipeline_root: Path, root: Path, name: str, new_name: str | None = None) -> None:
    """One profile's files of every stage, optionally under a new profile name."""
    new_name = new_name or name
    for part in ("profiles", "graphs", "validation"):
        if (pipeline_root / part / name).is_dir():
            shutil.copytree(pipeline_root / part / name, root / part / new_name)
    info_path = outputs.profile_dir(root, new_name) / outputs.PROFILE_FILE
    info_path.write_text(json.dumps(json.loads(info_path.read_text()) | {"name": new_name}))
    if outputs.runs_path(pipeline_root, name).is_file():
        outputs.runs_path(root, new_name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(outputs.runs_path(pipeline_root, name), outputs.runs_path(root, new_name))


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 enabled profiles x 2 prompts, a disabled profile and two compare tables."""
    root = tmp_path_factory.mktemp("pipeline") / "outputs"
    tokenizer = build_tokenizer()
    for name, kind in PROFILES.items():
        model = ReplacementModel(
            build_model("gpt2", vocab=len(tokenizer)),
            build_transcoders(kind, n_layers=2, d_model=32),
            tokenizer=tokenizer,
            model_id=f"tiny-gpt2-{kind}",
        )
        write_profile(root, name, model)
    write_profile(root, "off", model, enabled=False)
    (root / "compare").mkdir()
    (root / "compare" / "scores.csv").write_text("profile,replacement\ntiny-plt,0.5\n")
    write_json(root / "compare" / "scores.json", {"rows": 2})
    return root


def validation_file(root: Path, name: str) -> Path | None:
    """The validate stage's JSON of `name` ("profile/prompt"), if that profile was validated."""
    profile, prompt = name.split("/")
    path = outputs.validation_dir(root, profile) / f"{prompt}.json"
    return path if path.is_file() else None


def mlflow_client(uri: str):
    # Imported here, after tracer.experiments.tracking has switched MLflow's telemetry off.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def copy_root(pipeline_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pipeline_root, tmp_path / "outputs"))


def all_runs(client, experiment: str = "tracer") -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], max_results=1000)


def write_dvc_lock(path: Path, root: Path) -> None:
    """A dvc.lock with the graph stage of each profile and an unrelated stage."""
    stages = {
        f"prune@{name}": {
            "cmd": f"python -m pipelines.prune {name}",
            "deps": [{"path": "tracer/attribution/attribute.py", "md5": "a" * 32}],
            "outs": [{"path": f"{root.name}/profiles/{name}", "md5": f"{i:032d}.dir"}],
        }
        for i, name in enumerate(PROFILES)
    }
    stages["zoo_corpus"] = {"cmd": "x", "outs": [{"path": "zoo/corpus", "md5": "b" * 32}]}
    import yaml

    path.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


# ---- sqlite store ------------------------------------------------------------------------------
def test_runs_hold_params_metrics_artifacts_of_the_files(pipeline_root: Path, tmp_path: Path):
    root = copy_root(pipeline_root, tmp_path)
    write_dvc_lock(tmp_path / "dvc.lock", root)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    summary = log_pipeline(
        root, uri=uri, tags={"mlflow.source.git.commit": "c0ffee"}, dvc_lock=tmp_path / "dvc.lock"
    )
    client = mlflow_client(uri)
    runs = all_runs(client)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    nested = {
        f"{r.data.tags['tracer.profile']}/{r.data.tags['tracer.prompt_id']}": r
        for r in runs
        if PARENT_TAG in r.data.tags
    }
    expected = {f"{p}/{q}" for p in PROFILES for q in PROMPTS}
    assert len(runs) == 5 and len(parents) == 1 and set(nested) == expected
    parent = parents[0]
    assert summary["parent_run_id"] == parent.info.run_id
    assert summary["disabled_profiles"] == ["off"] and summary["skipped"] == []
    assert {entry["name"] for entry in summary["logged"]} == expected
    assert (
        parent.info.status == "FINISHED"
        and parent.data.tags["mlflow.source.git.commit"] == "c0ffee"
    )
    compare = {f.path for f in client.list_artifacts(parent.info.run_id, "compare")}
    assert compare == {"compare/scores.csv", "compare/scores.json"}

    for name, run in nested.items():
        profile, prompt_id = name.split("/")
        directory = root / "profiles" / profile / prompt_id
        graph_file = outputs.graph_path(root, profile, prompt_id)
        graph = Graph.load(graph_file)
        profile_json = json.loads((directory.parent / "profile.json").read_text())
        assert run.data.tags[PARENT_TAG] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.source.git.commit"] == "c0ffee"
        key = run_key(
            profile,
            prompt_id,
            (directory / "scores.json").read_bytes(),
            file_sha256(graph_file),
            validation.read_bytes() if (validation := validation_file(root, name)) else b"",
        )
        assert run.data.tags[RUN_KEY_TAG] == key
        assert run.data.tags["tracer.dvc.stages"] == f"prune@{profile}"
        assert len(run.data.tags["tracer.dvc.hash"]) == 64

        params = run.data.params
        for field in ("model", "revision", "transcoders", "transcoder_revision", "dtype"):
            assert params[field] == str(profile_json[field])
        for setting, value in graph.metadata["config"].items():
            assert params[setting] == str(value)
        assert params["max_n_logits"] == "3" and params["family"] == graph.metadata["family"]
        assert (params["profile"], params["prompt_id"]) == (profile, prompt_id)
        assert (float(params["node_threshold"]), float(params["edge_threshold"])) == THRESHOLDS

        # Recomputed from the graph file, not read back from scores.json.
        metrics = run.data.metrics
        full, pruned_graph = graph.scores(), graph.prune(*THRESHOLDS)
        pruned = graph.scores(pruned_graph)
        assert metrics["replacement"] == pytest.approx(full.replacement, abs=1e-12)
        assert metrics["completeness"] == pytest.approx(full.completeness, abs=1e-12)
        assert metrics["pruned_replacement"] == pytest.approx(pruned.replacement, abs=1e-12)
        assert metrics["pruned_completeness"] == pytest.approx(pruned.completeness, abs=1e-12)
        assert metrics["nodes"] == graph.layout.n_nodes
        assert metrics["edges"] == int((graph.adjacency_matrix != 0).sum())
        assert metrics["pruned_nodes"] == int(pruned_graph.node_mask.sum())
        assert metrics["pruned_edges"] == int(pruned_graph.edge_mask.sum())
        assert metrics["active_features"] == graph.active_features.shape[0]
        assert metrics["selected_features"] == graph.selected_features.shape[0]
        assert metrics["n_backward"] == graph.metadata["n_backward"]
        timings = json.loads(outputs.runs_path(root, profile).read_text())[prompt_id]
        seconds = dict(timings["seconds"])
        assert metrics["total_seconds"] == pytest.approx(seconds.pop("total"), abs=1e-12)
        for phase, value in seconds.items():
            assert metrics[f"seconds_{phase}"] == pytest.approx(value, abs=1e-12)
        growth = "attribution_peak_growth_bytes"
        assert metrics[growth] == timings[growth]
        validation = validation_file(root, name)
        if validation is not None:  # recomputed from the CSV rows, not read from the summary
            rows = list(csv.DictReader(validation.with_suffix(".csv").open()))
            for mode in ("direct", "full"):
                measured = [float(r["measured"]) for r in rows if r["mode"] == mode]
                kind = "predicted_direct" if mode == "direct" else "predicted_total"
                predicted = [float(r[kind]) for r in rows if r["mode"] == mode]
                assert metrics[f"validation_{mode}_spearman"] == pytest.approx(
                    spearman(torch.tensor(predicted), torch.tensor(measured)), abs=1e-9
                )
        else:
            assert not any(k.startswith("validation_") for k in metrics)
        history = client.get_metric_history(run.info.run_id, "curve_replacement")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
        for metric in history:
            point = graph.scores(graph.prune(*CURVE[metric.step]))
            assert metric.value == pytest.approx(point.replacement, abs=1e-12)

        artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
        expected_files = {graph_file.name, "pruned.json", "scores.json"}
        if prompt_id == "capital":
            expected_files.add("pruning_curve.png")
        if validation is not None:
            expected_files.add("validation")
            tables = {f.path for f in client.list_artifacts(run.info.run_id, "validation")}
            assert tables == {f"validation/{prompt_id}.json", f"validation/{prompt_id}.csv"}
        assert artifacts == expected_files
        downloaded = Path(
            client.download_artifacts(run.info.run_id, graph_file.name, str(tmp_path))
        )
        assert file_sha256(downloaded) == file_sha256(graph_file)
        back = Graph.load(downloaded)
        assert torch.equal(back.adjacency_matrix, graph.adjacency_matrix)
        assert back.metadata == graph.metadata
        downloaded.unlink()
    assert (tmp_path / "store" / "mlartifacts" / "tracer").is_dir()  # next to the db, not ./mlruns


def test_second_call_logs_nothing_and_a_changed_result_one_run(pipeline_root: Path, tmp_path):
    root = copy_root(pipeline_root, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = log_pipeline(root, uri=uri)
    client = mlflow_client(uri)
    assert len(first["logged"]) == 4 and len(all_runs(client)) == 5

    again = log_pipeline(root, uri=uri)
    assert again["parent_run_id"] is None and again["logged"] == []
    assert sorted(again["skipped"]) == sorted(e["name"] for e in first["logged"])
    assert len(all_runs(client)) == 5

    # other timings (a re-run of the same stage) are not a new result
    runs_file = outputs.runs_path(root, "tiny-clt")
    timings = json.loads(runs_file.read_text())
    timings["short"]["seconds"]["prune"] = 1.5
    write_json(runs_file, timings)
    assert log_pipeline(root, uri=uri)["logged"] == []

    scores_path = root / "profiles" / "tiny-clt" / "short" / "scores.json"
    scores = json.loads(scores_path.read_text())
    write_json(scores_path, scores | {"pruned_nodes": scores["pruned_nodes"] + 1})
    third = log_pipeline(root, uri=uri)
    assert [e["name"] for e in third["logged"]] == ["tiny-clt/short"]
    runs = all_runs(client)
    assert len(runs) == 7
    new_run = client.get_run(third["logged"][0]["run_id"])
    assert new_run.data.tags[PARENT_TAG] == third["parent_run_id"]
    assert new_run.data.metrics["seconds_prune"] == 1.5
    assert new_run.data.metrics["pruned_nodes"] == scores["pruned_nodes"] + 1


def test_disabled_profile_is_skipped(pipeline_root: Path, tmp_path: Path):
    root = tmp_path / "outputs"
    copy_profile(pipeline_root, root, "off")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = log_pipeline(root, uri=uri)
    assert summary["disabled_profiles"] == ["off"] and summary["logged"] == []
    assert summary["parent_run_id"] is None
    assert all_runs(mlflow_client(uri)) == []


def test_an_interrupted_run_is_logged_again(
    pipeline_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root = tmp_path / "outputs"
    copy_profile(pipeline_root, root, "tiny-plt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_result = tracking._log_result

    def interrupted(client, run_id, result):
        if result.name == "tiny-plt/short":
            raise ConnectionError("store went away")
        log_result(client, run_id, result)

    monkeypatch.setattr(tracking, "_log_result", interrupted)
    with pytest.raises(ConnectionError):
        log_pipeline(root, uri=uri)
    client = mlflow_client(uri)
    assert sorted(r.info.status for r in all_runs(client)) == ["FAILED", "FAILED", "FINISHED"]
    monkeypatch.setattr(tracking, "_log_result", log_result)
    summary = log_pipeline(root, uri=uri)
    assert [e["name"] for e in summary["logged"]] == ["tiny-plt/short"]
    assert summary["skipped"] == ["tiny-plt/capital"]


def test_a_score_that_is_not_a_number_is_refused(pipeline_root: Path, tmp_path: Path):
    root = tmp_path / "outputs"
    copy_profile(pipeline_root, root, "tiny-plt")
    path = root / "profiles" / "tiny-plt" / "short" / "scores.json"
    write_json(path, json.loads(path.read_text()) | {"replacement": "high"})
    with pytest.raises(ValueError, match="short/scores.json: replacement must be a number"):
        log_pipeline(root, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_missing_contract_file_names_the_path(pipeline_root: Path, tmp_path: Path):
    root = copy_root(pipeline_root, tmp_path)
    (root / "profiles" / "tiny-plt" / "capital" / "pruned.json").unlink()
    with pytest.raises(FileNotFoundError, match="tiny-plt/capital/pruned.json"):
        log_pipeline(root, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(FileNotFoundError, match="nowhere/profiles does not exist"):
        log_pipeline(tmp_path / "nowhere", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_dvc_stage_tags_match_the_profile_not_its_prefix(tmp_path: Path):
    root = tmp_path / "outputs"
    write_dvc_lock(tmp_path / "dvc.lock", root)
    tags = dvc_stage_tags(tmp_path / "dvc.lock", "tiny-plt", root / "profiles" / "tiny-plt")
    assert tags["tracer.dvc.stages"] == "prune@tiny-plt"
    other = dvc_stage_tags(tmp_path / "dvc.lock", "tiny-clt", root / "profiles" / "tiny-clt")
    assert other["tracer.dvc.hash"] != tags["tracer.dvc.hash"]
    assert dvc_stage_tags(tmp_path / "dvc.lock", "tiny", root / "profiles" / "tiny") == {}


def test_tracking_uri_prefers_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path / "m.db") == f"sqlite:///{(tmp_path / 'm.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(tmp_path / "m.db") == "http://127.0.0.1:1"


def test_track_script_prints_the_summary(
    pipeline_root: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
):
    root = copy_root(pipeline_root, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    track = runpy.run_path(str(PIPELINES / "track.py"))
    track["main"](["--root", str(root), "--summary", str(tmp_path / "first.json")])
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["logged"]) == 4 and summary["parent_run_id"]
    parent = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_run(summary["parent_run_id"])
    assert "mlflow.source.git.commit" in parent.data.tags  # the repository is a git checkout
    # the summary file says what the store holds, so a call that logs nothing writes the same
    track["main"](["--root", str(root), "--summary", str(tmp_path / "second.json")])
    assert json.loads(capsys.readouterr().out)["logged"] == []
    first = (tmp_path / "first.json").read_bytes()
    assert first == (tmp_path / "second.json").read_bytes()
    assert set(json.loads(first)["run_keys"]) == {e["name"] for e in summary["logged"]}


# ---- concurrent writers ------------------------------------------------------------------------
WRITER = """
import sys
from tracer.experiments.tracking import log_pipeline
log_pipeline(sys.argv[1], uri=sys.argv[2])
"""


def test_parallel_writers_to_one_prepared_sqlite_store(pipeline_root: Path, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    ensure_store(uri)
    roots = []
    for name in ("writer-a", "writer-b"):
        root = tmp_path / name
        copy_profile(pipeline_root, root, "tiny-plt", name)
        roots.append(root)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), uri], env=env) for root in roots
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    runs = all_runs(mlflow_client(uri))
    assert len(runs) == 2 * (1 + len(PROMPTS))
    assert {r.data.tags.get("tracer.profile") for r in runs} == {None, "writer-a", "writer-b"}


# ---- a real tracking server --------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` on a free loopback port, artifacts proxied to a tmp folder; its URI."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    command = [
        str(MLFLOW),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    # Its own session, so stopping it also stops the uvicorn worker it starts.
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)
        yield uri
    finally:
        stop_process(server)
        log.close()


@pytest.mark.slow
def test_logs_to_a_real_server(pipeline_root: Path, tmp_path: Path, mlflow_server: str):
    root = tmp_path / "outputs"
    copy_profile(pipeline_root, root, "tiny-clt")
    summary = log_pipeline(root, uri=mlflow_server)
    assert len(summary["logged"]) == 2
    client = mlflow_client(mlflow_server)
    runs = all_runs(client)
    assert len(runs) == 3
    for entry in summary["logged"]:
        run = client.get_run(entry["run_id"])
        graph_file = outputs.graph_path(root, *entry["name"].split("/"))
        expected = Graph.load(graph_file).scores().replacement
        assert run.data.metrics["replacement"] == pytest.approx(expected, abs=1e-12)
        downloaded = client.download_artifacts(
            entry["run_id"], graph_file.name, str(tmp_path / entry["name"].replace("/", "-"))
        )
        assert file_sha256(downloaded) == file_sha256(graph_file)
    assert any((tmp_path / "artifacts").rglob("*.safetensors"))  # proxied to the server
    assert log_pipeline(root, uri=mlflow_server)["logged"] == []


# ---- the MLflow UI: experiment kind, run names, the parent's description -----------------------
def test_experiment_is_of_the_model_training_kind_new_or_existing(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri, "fresh")
    client = mlflow_client(uri)
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    old_id = client.create_experiment("older")  # made before the tag existed
    assert "mlflow.experimentKind" not in client.get_experiment(old_id).tags
    assert ensure_store(uri, "older") == old_id
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_parent_run_describes_the_results_it_logged(pipeline_root: Path, tmp_path: Path):
    root = copy_root(pipeline_root, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tags = {"mlflow.source.git.commit": commit, "mlflow.source.git.dirty": "true"}
    summary = log_pipeline(root, uri=uri, tags=tags)
    client = mlflow_client(uri)
    note = client.get_run(summary["parent_run_id"]).data.tags["mlflow.note.content"]
    assert commit[:12] in note and "uncommitted changes" in note
    assert f"{THRESHOLDS[0]} / {THRESHOLDS[1]}" in note
    for profile in PROFILES:
        info = json.loads((root / "profiles" / profile / "profile.json").read_text())
        row = next(line for line in note.splitlines() if line.startswith(f"| {profile} |"))
        assert f"`{info['model']}`" in row and f"`{info['transcoders']}@v1`" in row
        assert all(prompt in row for prompt in PROMPTS)
    for entry in summary["logged"]:  # the UI lists nested runs by name
        run = client.get_run(entry["run_id"])
        profile, prompt = entry["name"].split("/")
        assert run.info.run_name == f"{profile}/{prompt}"
        assert run.data.tags["tracer.prompt_text"] == PROMPTS[prompt]


# ---- subgraphs saved from the explorer ---------------------------------------------------------
def test_saved_subgraphs_join_their_results_run(
    pipeline_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tracer.experiments.subgraphs import Subgraph, save_subgraph, subgraph_files

    root = copy_root(pipeline_root, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    uploads: list[tuple[str, str]] = []
    log_artifact = tracking.MlflowClient.log_artifact

    def counted(self, run_id, local_path, artifact_path=None):
        if artifact_path == "subgraphs":
            uploads.append((run_id, Path(local_path).name))
        return log_artifact(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(tracking.MlflowClient, "log_artifact", counted)

    def node_ids(profile: str, prompt: str) -> list[str]:
        document = json.loads((root / "profiles" / profile / prompt / "pruned.json").read_text())
        return [node["node_id"] for node in document["nodes"]]

    def saved() -> dict[str, list[Path]]:
        return {
            f"{p}/{q}": files
            for p in PROFILES
            for q in PROMPTS
            if (files := subgraph_files(tmp_path, p, q))
        }

    def logged_file(run_id: str, name: str) -> bytes:
        folder = tempfile.mkdtemp(dir=tmp_path)
        return Path(
            client.download_artifacts(run_id, f"subgraphs/{name}", str(folder))
        ).read_bytes()

    # a new result logs the subgraphs saved before it
    short = save_subgraph(
        tmp_path, "tiny-plt", "short", Subgraph("path", tuple(node_ids("tiny-plt", "short")[:2]))
    )
    first = log_pipeline(root, uri=uri, subgraph_files=saved())
    client = mlflow_client(uri)
    run_ids = {e["name"]: e["run_id"] for e in first["logged"]}
    assert first["subgraphs"] == [{"name": "tiny-plt/short", "run_id": run_ids["tiny-plt/short"]}]
    assert logged_file(run_ids["tiny-plt/short"], "path.json") == short.read_bytes()

    # one saved after its result was logged: the same run, no new run
    ids = node_ids("tiny-clt", "capital")
    circuit = Subgraph("circuit", tuple(ids[:3]), (("pair", tuple(ids[:2])),))
    path = save_subgraph(tmp_path, "tiny-clt", "capital", circuit)
    uploads.clear()
    second = log_pipeline(root, uri=uri, subgraph_files=saved())
    capital = run_ids["tiny-clt/capital"]
    assert second["parent_run_id"] is None and second["logged"] == []
    assert second["subgraphs"] == [{"name": "tiny-clt/capital", "run_id": capital}]
    assert uploads == [(capital, "circuit.json")]
    assert len(all_runs(client)) == 5
    assert {a.path for a in client.list_artifacts(capital, "subgraphs")} == {
        "subgraphs/circuit.json"
    }
    assert logged_file(capital, "circuit.json") == path.read_bytes()
    assert client.get_run(capital).info.status == "FINISHED"

    # unchanged files are not uploaded again
    uploads.clear()
    assert log_pipeline(root, uri=uri, subgraph_files=saved())["subgraphs"] == []
    assert uploads == []

    # a changed file replaces the logged one
    save_subgraph(tmp_path, "tiny-clt", "capital", circuit.ungroup("pair"))
    third = log_pipeline(root, uri=uri, subgraph_files=saved())
    assert [e["run_id"] for e in third["subgraphs"]] == [capital]
    assert json.loads(logged_file(capital, "circuit.json"))["qParams"]["supernodes"] == []
    assert len(all_runs(client)) == 5

    # the track stage finds them beside the outputs folder
    track = runpy.run_path(str(PIPELINES / "track.py"))
    assert track["saved_subgraphs"](root) == saved()
    assert set(saved()) == {"tiny-plt/short", "tiny-clt/capital"}
