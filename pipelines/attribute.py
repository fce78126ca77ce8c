"""DVC stage attribute@PROFILE: the full attribution graph of every prompt under one profile.

Reads `outputs/fetched/PROFILE/fetched.json` (where to load the model and transcoders from) and
writes `outputs/graphs/PROFILE/`: `profile.json` and `PROMPT.safetensors` per prompt. Per prompt,
seconds per phase and `attribution_peak_growth_bytes` (how far the process's peak RSS rose above
its RSS during that prompt's attribution: model loading and earlier prompts excluded) go to
`outputs/runs/PROFILE.json`, outside every DVC output, so the graphs are byte-identical for
identical inputs. One task per prompt, run here or on Ray (`execution:` in params.yaml,
`tracer/experiments/execution.py`); either way the graphs are written here, the same bytes.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs
from tracer.experiments.execution import Job, raise_failures, run_jobs, write_files
from tracer.experiments.fetched import read_record
from tracer.experiments.params import load_params
from tracer.experiments.sweep import (
    attribute_files,
    attribute_prompt,
    load_model,
    with_absolute_paths,
)
from tracer.memory import return_freed_memory

ROOT = Path("outputs")
__all__ = ["attribute_prompt", "load_fetched", "load_model", "main"]  # validate uses them


def load_fetched(name: str) -> dict:
    try:
        return read_record(ROOT, name)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def main(name: str) -> None:
    return_freed_memory()  # process-wide allocator setting: freed batch buffers go back to the OS
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    profile = params.profiles[name]
    runs: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        write_json(folder / outputs.PROFILE_FILE, {"name": name, **profile.model_dump()})
        if not profile.enabled:
            return
        # one job per prompt, run here or on Ray (params.yaml `execution:`); the graphs come back
        # as bytes and are written here, so both engines write the same files
        jobs = [Job(name, f"{name}/{spec.id}", spec) for spec in params.prompts]
        work = partial(attribute_files, settings=params.attribution)
        outcomes = run_jobs(
            {name: with_absolute_paths(load_fetched(name))},
            jobs,
            load_model,
            work,
            params.execution,
        )
        raise_failures(outcomes)
        for outcome in outcomes:
            write_files(folder, outcome.result["files"])
            runs[outcome.job.payload.id] = outcome.result["record"]
            print(f"{outcome.job.key}: {outcome.result['summary']['nodes']} nodes")

    write_folder(outputs.graphs_dir(ROOT, name), fill)
    write_json(outputs.runs_path(ROOT, name), runs)


if __name__ == "__main__":
    main(sys.argv[1])
