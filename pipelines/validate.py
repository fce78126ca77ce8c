"""DVC stage validate@PROFILE: do the graphs' predicted ablation effects match real interventions?

For every prompt's graph (`outputs/graphs/PROFILE/`), the `validation.top_n` most influential
feature nodes are ablated one at a time in each of `validation.modes` and the change of each logit
target is compared with the graph's prediction (`tracer.interventions.validation`). Writes
`outputs/validation/PROFILE/PROMPT.csv` (one row per node, target and mode) and `PROMPT.json`
(summary and rows), and `outputs/metrics/validation/PROFILE.json` (Spearman correlation and median
relative error per prompt and mode) for `dvc metrics show`. One task per prompt, here or on Ray
(`execution:` in params.yaml); either way the tables are written here, the same bytes.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from pipelines.attribute import load_fetched, load_model
from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs
from tracer.experiments.execution import (
    Job,
    files_of,
    raise_failures,
    read_bytes_as_file,
    run_jobs,
    write_files,
)
from tracer.experiments.params import PromptSpec, ValidationParams, load_params
from tracer.experiments.sweep import with_absolute_paths
from tracer.graph.graph import Graph
from tracer.interventions.validation import json_safe, validate_graph
from tracer.memory import return_freed_memory

ROOT = Path("outputs")
METRICS = ROOT / "metrics" / "validation"


def validate_job(model, payload: tuple, *, settings: ValidationParams) -> dict:
    """One prompt as a job (here or on a Ray worker): payload (prompt, graph file bytes) ->
    {"files": PROMPT.csv and PROMPT.json as bytes, "summary": per mode}."""
    spec, data = payload
    graph = read_bytes_as_file(data, Graph.load, outputs.GRAPH_SUFFIX)
    report = validate_graph(
        graph,
        model,
        prompt=spec.text,
        top_n=settings.top_n,
        modes=settings.modes,
        batch_size=settings.batch_size,
    )

    def fill(folder: Path) -> None:
        report.to_csv(folder / f"{spec.id}.csv")
        report.to_json(folder / f"{spec.id}.json")

    return {"files": files_of(fill), "summary": report.summary}


def main(name: str) -> None:
    return_freed_memory()  # process-wide allocator setting: freed buffers go back to the OS
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    summary: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        if not params.profiles[name].enabled:
            return
        # one job per prompt, here or on Ray (params.yaml `execution:`): the graph travels with
        # the job, the tables come back as bytes and are written here by both engines
        jobs = [job(name, spec) for spec in params.prompts]
        work = partial(validate_job, settings=params.validation)
        groups = {name: with_absolute_paths(load_fetched(name))}
        outcomes = run_jobs(groups, jobs, load_model, work, params.execution)
        raise_failures(outcomes)
        for spec, outcome in zip(params.prompts, outcomes, strict=True):
            write_files(folder, outcome.result["files"])
            summary[spec.id] = outcome.result["summary"]
            print(
                f"{name}/{spec.id}: "
                + ", ".join(
                    f"{mode} spearman {s['spearman']:.3f}" for mode, s in summary[spec.id].items()
                )
            )

    write_folder(outputs.validation_dir(ROOT, name), fill)
    write_json(METRICS / f"{name}.json", json_safe(summary))


def job(name: str, spec: PromptSpec) -> Job:
    data = outputs.graph_path(ROOT, name, spec.id).read_bytes()
    return Job(name, f"{name}/{spec.id}", (spec, data))


if __name__ == "__main__":
    main(sys.argv[1])
