"""The explorer's Runs page and `dashboards.runs`, on an MLflow store logged here by the track
stage's own function (`log_pipeline`) from the tiny outputs folder: what the page lists is checked
against the scores.json files, and runs opened as an outputs folder against the files logged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from conftest import free_port
from streamlit.testing.v1 import AppTest
from test_dashboard_outputs import DISABLED, VALIDATED, built_outputs

from dashboards import catalog, runs
from dashboards.catalog import ENV_OUTPUTS, MissingOutputs
from tracer.experiments import outputs as paths
from tracer.experiments.tracking import log_pipeline

from mlflow import MlflowClient  # isort: skip  (after tracking has switched telemetry off)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboards" / "app.py"
COMMITS = {"tracer": "1" * 8 + "a" * 32, "other": "2" * 8 + "b" * 32}  # experiment -> commit
UI = "http://mlflow.example:5555"


class Store:
    """A sqlite store with the tiny outputs logged into two experiments (one commit each).

    The outputs are a copy without the disabled profile, whose profile.json is too sparse for
    the track stage (it names no revisions or dtype)."""

    def __init__(self, built: Path, folder: Path) -> None:
        self.root = Path(shutil.copytree(built, folder / "outputs"))
        shutil.rmtree(paths.profile_dir(self.root, DISABLED))
        self.db = folder / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        self.logged: dict[str, dict[str, str]] = {}  # experiment -> {profile/prompt: run id}
        self.parents: list[str] = []
        for experiment, commit in COMMITS.items():
            tags = {"mlflow.source.git.commit": commit, "mlflow.source.git.dirty": "false"}
            summary = log_pipeline(self.root, experiment=experiment, uri=self.uri, tags=tags)
            self.logged[experiment] = {e["name"]: e["run_id"] for e in summary["logged"]}
            self.parents.append(summary["parent_run_id"])

    def run_ids(self) -> dict[str, str]:
        """run id -> `profile/prompt`, over both experiments."""
        return {i: name for logged in self.logged.values() for name, i in logged.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = built_outputs(tmp_path_factory)
    return Store(root, tmp_path_factory.mktemp("store"))


def prompt_files(root: Path, name: str) -> dict[str, Path]:
    """The files the track stage logs for `profile/prompt`, by their name in an outputs folder."""
    profile, prompt = name.split("/")
    found = {
        paths.PRUNED_FILE: paths.prompt_dir(root, profile, prompt) / paths.PRUNED_FILE,
        paths.SCORES_FILE: paths.prompt_dir(root, profile, prompt) / paths.SCORES_FILE,
        paths.CURVE_PLOT: paths.prompt_dir(root, profile, prompt) / paths.CURVE_PLOT,
        "graph": paths.graph_path(root, profile, prompt),
        "validation": paths.validation_dir(root, profile) / f"{prompt}.json",
    }
    return {k: v for k, v in found.items() if v.is_file()}


def open_runs_page(monkeypatch, store: Store, tmp_path: Path, uri: str | None = None) -> AppTest:
    monkeypatch.setenv(ENV_OUTPUTS, str(store.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri or store.uri)
    monkeypatch.setenv(runs.ENV_UI, UI)
    monkeypatch.setenv(runs.ENV_CACHE, str(tmp_path / "cache"))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    app.switch_page("views/runs.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def runs_table(app: AppTest) -> pd.DataFrame:
    (table,) = [d.value for d in app.dataframe if {"run_id", "mlflow"} <= set(d.value.columns)]
    return table


def widget(elements, label: str):
    (found,) = [e for e in elements if e.label == label]
    return found


# ---- where things are ---------------------------------------------------------------------------
def test_store_ui_and_cache_from_argument_then_environment_then_default(tmp_path: Path):
    env = {"MLFLOW_TRACKING_URI": "http://env:5000", runs.ENV_UI: "http://ui-env:1/"}
    assert runs.store_uri(["--mlflow", "sqlite:///a.db", "-x"], env, tmp_path) == "sqlite:///a.db"
    assert runs.store_uri(["--other"], env, tmp_path) == "http://env:5000"
    assert runs.store_uri([], {}, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert runs.store_uri(["--mlf", "x"], {}, tmp_path).endswith("/mlflow.db")  # no abbreviations
    assert runs.ui_url(["--mlflow-ui", "http://arg:2"], env) == "http://arg:2"
    assert runs.ui_url([], env) == "http://ui-env:1"
    assert runs.ui_url([], {}) == "http://127.0.0.1:5000"
    assert runs.run_cache_folder(tmp_path, {runs.ENV_CACHE: "c"}) == tmp_path / "c"
    assert runs.run_cache_folder(tmp_path, {runs.ENV_CACHE: "/abs"}) == Path("/abs")
    assert runs.run_cache_folder(tmp_path, {}) == Path.home() / ".cache" / "tracer" / "runs"


# ---- runs opened as an outputs folder -----------------------------------------------------------
def test_open_runs_gives_the_logged_files_as_an_outputs_folder(store: Store, tmp_path: Path):
    ids = store.run_ids()
    picked = [store.logged["tracer"][f"{VALIDATED}/dallas"], store.logged["other"]["tiny-plt/mary"]]
    folder = runs.open_runs(store.uri, picked, tmp_path)
    assert folder.parent == tmp_path
    scanned = catalog.scan_outputs(folder)
    names = {runs.opened_profile(ids[i].split("/")[0], i): i for i in picked}
    assert [p.name for p in scanned.profiles] == sorted(names) and scanned.skipped == {}
    for name, run_id in names.items():
        profile, prompt = ids[run_id].split("/")
        assert scanned.profile(name).prompts == (prompt,)
        original = json.loads((paths.profile_dir(store.root, profile) / "profile.json").read_text())
        opened = json.loads((paths.profile_dir(folder, name) / "profile.json").read_text())
        assert opened == original | {"name": name}
        logged = prompt_files(store.root, ids[run_id])
        copied = prompt_files(folder, f"{name}/{prompt}")
        assert set(copied) == set(
            logged
        )  # curve plot and validation only where the stage wrote them
        for kind, path in logged.items():
            assert copied[kind].read_bytes() == path.read_bytes(), kind
    assert set(prompt_files(folder, f"{runs.opened_profile(VALIDATED, picked[0])}/dallas")) == {
        paths.PRUNED_FILE,
        paths.SCORES_FILE,
        paths.CURVE_PLOT,
        "graph",
        "validation",
    }
    # opened again (any order): the same folder, not downloaded again
    stamp = (folder / "profiles").stat().st_mtime_ns
    assert runs.open_runs(store.uri, picked[::-1], tmp_path) == folder
    assert (folder / "profiles").stat().st_mtime_ns == stamp
    assert runs.open_runs(store.uri, picked[:1], tmp_path) != folder


def test_open_runs_names_what_cannot_be_opened(store: Store, tmp_path: Path):
    with pytest.raises(MissingOutputs, match="No run `0123456789abcdef` in the MLflow store"):
        runs.open_runs(store.uri, ["0123456789abcdef"], tmp_path / "cache")
    with pytest.raises(MissingOutputs, match=r"is not a logged graph.*parent run"):
        runs.open_runs(store.uri, [store.parents[0]], tmp_path / "cache")
    missing = tmp_path / "none.db"
    with pytest.raises(MissingOutputs, match=r"none.db` does not exist.*dvc repro"):
        runs.open_runs(f"sqlite:///{missing}", ["abc"], tmp_path / "cache")
    assert not missing.exists()
    assert not any((tmp_path / "cache").glob("*"))  # nothing half written


def copied_store(store: Store, tmp_path: Path) -> tuple[str, MlflowClient]:
    """A copy of the store's database (its runs' artifacts stay where they are)."""
    shutil.copy(store.db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def test_a_run_without_its_graph_file_opens_with_the_pruned_graph(store: Store, tmp_path: Path):
    uri, client = copied_store(store, tmp_path)
    source_id = store.logged["tracer"]["tiny-plt/mary"]
    source = client.get_run(source_id)
    run_id = client.create_run(source.info.experiment_id, run_name="tiny-plt/mary").info.run_id
    for key, value in source.data.params.items():
        client.log_param(run_id, key, value)
    client.set_tag(run_id, runs.PROFILE_TAG, "tiny-plt")
    files = prompt_files(store.root, "tiny-plt/mary")
    for kind in (paths.PRUNED_FILE, paths.SCORES_FILE):
        client.log_artifact(run_id, str(files[kind]))
    client.set_terminated(run_id)
    folder = runs.open_runs(uri, [run_id], tmp_path / "cache")
    name = runs.opened_profile("tiny-plt", run_id)
    assert [p.name for p in catalog.scan_outputs(folder).profiles] == [name]
    assert catalog.graph_file(folder, name, "mary") is None
    assert catalog.read_document(folder, name, "mary") == json.loads(
        files[paths.PRUNED_FILE].read_text()
    )


# ---- the Runs page ------------------------------------------------------------------------------
def test_runs_page_lists_every_logged_result_with_its_scores(monkeypatch, store, tmp_path):
    app = open_runs_page(monkeypatch, store, tmp_path)
    table = runs_table(app)
    ids = store.run_ids()
    assert sorted(table["run_id"]) == sorted(ids)  # both experiments, no parent runs
    assert list(table["started"]) == sorted(table["started"], reverse=True)  # newest first
    experiments = {
        e: MlflowClient(tracking_uri=store.uri).get_experiment_by_name(e) for e in COMMITS
    }
    for row in table.itertuples():
        name = ids[row.run_id]
        profile, prompt = name.split("/")
        assert (row.run, row.profile, row.prompt) == (name, profile, prompt)
        info = json.loads((paths.profile_dir(store.root, profile) / "profile.json").read_text())
        assert (row.model, row.transcoders) == (info["model"], info["transcoders"])
        scores = json.loads(prompt_files(store.root, name)[paths.SCORES_FILE].read_text())
        for column in runs.SCORE_COLUMNS:
            assert getattr(row, column) == scores[column], (name, column)
        experiment = next(e for e, logged in store.logged.items() if row.run_id in logged.values())
        assert row.git_commit == COMMITS[experiment] and row.commit == COMMITS[experiment][:8]
        assert row.status == "FINISHED"
        url = urlsplit(row.mlflow)
        assert f"{url.scheme}://{url.netloc}" == UI and url.path == "/"
        experiment_id = experiments[experiment].experiment_id
        assert url.fragment == f"/experiments/{experiment_id}/runs/{row.run_id}"


def test_runs_page_filters_narrow_the_table(monkeypatch, store, tmp_path):
    app = open_runs_page(monkeypatch, store, tmp_path)
    ids = store.run_ids()
    widget(app.multiselect, "profiles").set_value(["tiny-plt"]).run()
    assert sorted(runs_table(app)["run_id"]) == sorted(
        i for i, n in ids.items() if n.startswith("tiny-plt/")
    )
    widget(app.text_input, "prompt").set_value("MARY and john").run()  # the prompt's text
    assert sorted(runs_table(app)["run_id"]) == sorted(
        i for i, n in ids.items() if n == "tiny-plt/mary"
    )
    widget(app.text_input, "commit").set_value(COMMITS["other"][:6]).run()
    assert list(runs_table(app)["run_id"]) == [store.logged["other"]["tiny-plt/mary"]]
    widget(app.multiselect, "profiles").set_value([]).run()
    widget(app.text_input, "prompt").set_value("").run()
    assert sorted(runs_table(app)["run_id"]) == sorted(store.logged["other"].values())
    clt_set = json.loads((paths.profile_dir(store.root, "tiny-clt") / "profile.json").read_text())
    widget(app.multiselect, "transcoder sets").set_value([clt_set["transcoders"]]).run()
    assert sorted(runs_table(app)["run_id"]) == sorted(
        i for n, i in store.logged["other"].items() if n.startswith("tiny-clt/")
    )
    widget(app.text_input, "commit").set_value("ffff").run()
    assert runs_table(app).empty
    assert not app.exception


def test_one_run_opens_in_the_graph_page(monkeypatch, store, tmp_path):
    app = open_runs_page(monkeypatch, store, tmp_path)
    run_id = store.logged["tracer"][f"{VALIDATED}/dallas"]
    widget(app.multiselect, "Runs to open").set_value([run_id]).run()
    widget(app.button, "Open in Graph page").click().run()
    assert not app.exception, [e.value for e in app.exception]
    name = runs.opened_profile(VALIDATED, run_id)
    assert app.query_params["runs"] == run_id
    assert app.title[0].value == f"{name} / dallas"
    (folder,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in catalog.scan_outputs(folder).profiles] == [name]


def test_two_runs_open_in_the_compare_page(monkeypatch, store, tmp_path):
    app = open_runs_page(monkeypatch, store, tmp_path)
    picked = [store.logged["other"]["tiny-plt/mary"], store.logged["tracer"]["tiny-clt/dallas"]]
    widget(app.multiselect, "Runs to open").set_value(picked).run()
    widget(app.button, "Compare these two runs").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.query_params["runs"] == ",".join(picked)
    assert widget(app.selectbox, "A: profile").value == runs.opened_profile("tiny-plt", picked[0])
    assert widget(app.selectbox, "A: prompt").value == "mary"
    assert widget(app.selectbox, "B: profile").value == runs.opened_profile("tiny-clt", picked[1])
    assert widget(app.selectbox, "B: prompt").value == "dallas"


def test_compare_page_takes_its_picks_from_the_query(monkeypatch, tmp_path_factory):
    root = built_outputs(tmp_path_factory)
    monkeypatch.setenv(ENV_OUTPUTS, str(root))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    app.query_params.update(a="tiny-plt", prompt_a="mary", b="tiny-clt", prompt_b="dallas")
    app.switch_page("views/compare.py").run()
    assert not app.exception, [e.value for e in app.exception]
    shown = [widget(app.selectbox, f"{t}: {w}").value for t in "AB" for w in ("profile", "prompt")]
    assert shown == ["tiny-plt", "mary", "tiny-clt", "dallas"]


def test_a_run_without_files_shows_why_it_cannot_open(monkeypatch, store, tmp_path):
    uri, client = copied_store(store, tmp_path)
    experiment_id = client.get_experiment_by_name("tracer").experiment_id
    failed = client.create_run(experiment_id, run_name="tiny-clt/dallas")
    client.set_tag(failed.info.run_id, runs.PROFILE_TAG, "tiny-clt")
    client.set_terminated(failed.info.run_id, "FAILED")
    app = open_runs_page(monkeypatch, store, tmp_path, uri)
    assert failed.info.run_id in set(runs_table(app)["run_id"])
    widget(app.multiselect, "Runs to open").set_value([failed.info.run_id]).run()
    widget(app.button, "Open in Graph page").click().run()
    assert not app.exception
    (error,) = app.error
    assert f"Run `{failed.info.run_id}`" in error.value and "FAILED" in error.value
    assert app.title[0].value == "Tracked runs"  # stayed on the page


@pytest.mark.parametrize("kind", ["sqlite", "server"])
def test_a_store_that_is_not_there_is_named_on_the_page(monkeypatch, store, tmp_path, kind):
    missing = tmp_path / "nowhere" / "mlflow.db"
    uri = f"sqlite:///{missing}" if kind == "sqlite" else f"http://127.0.0.1:{free_port()}"
    app = open_runs_page(monkeypatch, store, tmp_path, uri)
    (warning,) = app.warning
    assert f"`{uri}`" in warning.value and "dvc repro" in warning.value
    assert "MLFLOW_TRACKING_URI" in warning.value
    assert not app.dataframe and not missing.exists() and not missing.parent.exists()


def test_an_opened_run_intervenes_on_its_profiles_model(
    monkeypatch, store, tmp_path, tmp_path_factory
):
    """Interventions on a run opened from MLflow use the profile's model as the repository has it
    (its fetch record): the same numbers as on the outputs folder's own graph."""
    models = store.root.parent / "models"  # the fetch records name it relative to the project
    if not models.is_dir():
        shutil.copytree(built_outputs(tmp_path_factory).parent / "models", models)
    run_id = store.logged["tracer"][f"{VALIDATED}/dallas"]
    name = runs.opened_profile(VALIDATED, run_id)

    def ablate(profile: str) -> AppTest:
        app = open_runs_page(monkeypatch, store, tmp_path)
        app.switch_page("views/interventions.py")
        if profile != VALIDATED:
            app.query_params["runs"] = run_id
        app.query_params.update(profile=profile, prompt="dallas")
        app.run()
        assert app.title[0].value == f"Interventions: {profile} / dallas"
        widget(app.button, "Run intervention").click().run()
        assert not app.exception, [e.value for e in app.exception]
        assert not app.error, [e.value for e in app.error]
        return app

    opened, own = ablate(name), ablate(VALIDATED)
    assert any(f"{VALIDATED}'s model" in c.value for c in opened.caption)
    shown = [{m.label: m.value for m in app.metric} for app in (opened, own)]
    assert shown[0]["its probability after"] == shown[1]["its probability after"]
    assert shown[0]["top token before"] == shown[1]["top token before"]
