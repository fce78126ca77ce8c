"""`tracer sweep`: two zoo profiles x 8 prompts, here and on a local Ray instance (2 CPUs).

The local engine's graphs are the reference: the Ray engine's must be the same bytes, also for a
prompt whose worker was killed mid-attribution and retried. MLflow gets one parent run and one
nested run per (profile, prompt), and a re-run logs nothing new. A prompt that always fails is
reported while the others are written, and a sweep that was interrupted or had failures finishes
only what is missing when run again. Budget: ~2 minutes on 2 cores (32 attributions of short
prompts, plus Ray's start).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import ray_cluster

from tracer.cli import main
from tracer.cli.sweep_commands import resolve_profile
from tracer.experiments.execution import FAULT_VARIABLE
from tracer.experiments.params import AttributionParams, ExecutionParams, PromptSpec, load_params
from tracer.experiments.sweep import read_prompts, run_sweep
from tracer.experiments.tracking import RUN_KEY_TAG
from tracer.graph.graph import Graph

from mlflow import MlflowClient  # isort: skip  (after tracer's tracking disables telemetry)

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("gpt2-plt", "llama-clt")
PROMPTS = [
    {"id": "days", "text": "monday tuesday"},
    {"id": "numbers", "text": "three four five"},
    {"id": "antonym", "text": "hot is the opposite of"},
    {"id": "capital", "text": "the capital of texas is"},
    {"id": "state", "text": "dallas is in the state of"},
    {"id": "cold", "text": "the opposite of cold is"},
    {"id": "count", "text": "one two three"},
    {"id": "target", "text": "tuesday wednesday", "targets": ["thursday", "friday"]},
]
PARENT_TAG = "mlflow.parentRunId"


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def sweep(prompts: Path, out: Path, *extra: str, profiles=PROFILES) -> None:
    args = [
        "sweep",
        str(prompts),
        "--out",
        str(out),
        "--quiet",
        "--params",
        str(REPO / "params.yaml"),
    ]
    for name in profiles:
        args += ["--profile", name]
    assert main([*args, *extra]) == 0


def store_runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracer")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return (
        [r for r in runs if PARENT_TAG not in r.data.tags],
        [r for r in runs if PARENT_TAG in r.data.tags],
    )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(prompts_file: Path, tmp_path_factory) -> Path:
    """The local engine's sweep: the graphs every other run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    sweep(prompts_file, out, "--engine", "local", "--no-mlflow")
    return out


@pytest.fixture(scope="module")
def local_ray():
    with ray_cluster.local_ray(num_cpus=2) as temp_dir:
        yield temp_dir


@pytest.fixture(autouse=True)
def in_repo(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the zoo profiles name folders relative to the checkout


def test_ray_sweep_gives_the_local_graphs_and_logs_each_prompt_once(
    reference: Path, prompts_file: Path, local_ray, tmp_path: Path, monkeypatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    killed = tmp_path / "killed"
    monkeypatch.setenv(FAULT_VARIABLE, f"kill-once:llama-clt/state:{killed}")
    out = tmp_path / "sweep"
    sweep(prompts_file, out, "--engine", "ray", "--workers", "1", "--retries", "1")
    assert killed.is_file()  # a worker died mid-sweep; its prompt was retried on a new one

    expected = digests(reference)
    assert len(expected) == len(PROFILES) * len(PROMPTS)
    assert digests(out) == expected
    records = {
        path.relative_to(out).with_suffix("").as_posix(): json.loads(path.read_text())
        for path in out.glob("*/*.json")
    }
    assert records["llama-clt/state"]["attempts"] == 2
    graph = Graph.load(out / "gpt2-plt" / "target.safetensors")
    assert graph.input_string == "tuesday wednesday"
    assert [t.label for t in graph.logit_targets] == ["thursday", "friday"]

    parents, nested = store_runs(uri)
    assert len(parents) == 1
    assert {r.data.tags[PARENT_TAG] for r in nested} == {parents[0].info.run_id}
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in nested) == sorted(
        r["inputs"] for r in records.values()
    )
    assert {r.info.run_name for r in nested} == set(records)
    assert all(r.info.status == "FINISHED" for r in [*parents, *nested])

    # a second run finds everything: it computes nothing and logs nothing new
    monkeypatch.delenv(FAULT_VARIABLE)
    sweep(prompts_file, out, "--engine", "ray")
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["finished"], summary["skipped"]) == (0, len(expected))
    again_parents, again_nested = store_runs(uri)
    assert [r.info.run_id for r in again_parents] == [parents[0].info.run_id]
    assert sorted(r.info.run_id for r in again_nested) == sorted(r.info.run_id for r in nested)


def test_a_failing_prompt_is_reported_and_a_rerun_finishes_it(
    reference: Path, prompts_file: Path, local_ray, tmp_path: Path, monkeypatch, capsys
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(FAULT_VARIABLE, "raise:gpt2-plt/capital")
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exited:
        sweep(prompts_file, out, "--engine", "ray", "--retries", "1", profiles=["gpt2-plt"])
    assert exited.value.code == 1
    assert "gpt2-plt/capital: RuntimeError: injected fault" in capsys.readouterr().err
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["failed"]["gpt2-plt/capital"]["attempts"] == 2
    assert "injected fault" in summary["failed"]["gpt2-plt/capital"]["error"]
    done = digests(out)
    assert set(done) == {f"gpt2-plt/{p['id']}.safetensors" for p in PROMPTS} - {
        "gpt2-plt/capital.safetensors"
    }
    assert all(digests(reference)[name] == digest for name, digest in done.items())

    monkeypatch.delenv(FAULT_VARIABLE)
    sweep(prompts_file, out, "--engine", "ray", profiles=["gpt2-plt"])
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["finished"], summary["skipped"], summary["failed"]) == (1, 7, {})
    assert digests(out) == {k: v for k, v in digests(reference).items() if k.startswith("gpt2")}
    parents, nested = store_runs(uri)
    assert len(parents) == 1 and len(nested) == len(PROMPTS)  # the parent was reopened


def test_an_interrupted_sweep_finishes_only_what_is_missing(reference: Path, tmp_path) -> None:
    params = load_params(REPO / "params.yaml")
    profiles = {"gpt2-plt": resolve_profile(params.profiles["gpt2-plt"])}
    prompts = [PromptSpec.model_validate(p) for p in PROMPTS[:4]]
    out = tmp_path / "sweep"
    seen = []

    def interrupt(result) -> None:
        seen.append(result)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            profiles, prompts, out, AttributionParams(), ExecutionParams(), on_result=interrupt
        )
    first = sorted(digests(out))
    assert len(first) == 2
    report = run_sweep(profiles, prompts, out, AttributionParams(), ExecutionParams())
    assert sorted(r.name for r in report.skipped) == [n.removesuffix(".safetensors") for n in first]
    assert len(report.finished) == 2 and not report.failed
    assert digests(out) == {
        f"gpt2-plt/{p.id}.safetensors": digests(reference)[f"gpt2-plt/{p.id}.safetensors"]
        for p in prompts
    }
    # a changed setting changes the inputs: nothing is skipped
    changed = run_sweep(
        profiles, prompts[:1], out, AttributionParams(max_n_logits=3), ExecutionParams()
    )
    assert len(changed.finished) == 1 and not changed.skipped


def test_prompts_files(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("monday tuesday\n\n  three four five  \n")
    assert [(p.id, p.text) for p in read_prompts(text)] == [
        ("line-1", "monday tuesday"),
        ("line-3", "three four five"),
    ]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"duplicate prompt id\(s\) \['a'\]"):
        read_prompts(lines)
    lines.write_text('{"id": "a b", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: not a valid prompt"):
        read_prompts(lines)
    lines.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(lines)


def test_sweep_refuses_bad_arguments(prompts_file: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    code = main(["sweep", str(prompts_file), "--out", out, "--profile", "nope"])
    assert code == 2 and "unknown profile(s) ['nope']" in capsys.readouterr().err
    code = main(["sweep", str(prompts_file), "--out", out, "--model", "zoo/models/gpt2"])
    assert code == 2 and "--model and --transcoders go together" in capsys.readouterr().err
    code = main(
        ["sweep", str(prompts_file), "--out", out, "--profile", "gpt2-plt", "--memory", "lots"]
    )
    assert code == 2 and "memory must be bytes or a size" in capsys.readouterr().err
