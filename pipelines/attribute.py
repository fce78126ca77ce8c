"""DVC stage attribute@PROFILE: the full attribution graph of every prompt under one profile.

Reads `outputs/fetched/PROFILE/fetched.json` (where to load the model and transcoders from) and
writes `outputs/graphs/PROFILE/`: `profile.json` and `PROMPT.safetensors` per prompt. Per prompt,
seconds per phase and `attribution_peak_growth_bytes` (how far the process's peak RSS rose above
its RSS during that prompt's attribution: model loading and earlier prompts excluded) go to
`outputs/runs/PROFILE.json`, outside every DVC output, so the graphs are byte-identical for
identical inputs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tracer.atomic import write_folder, write_json
from tracer.attribution.attribute import attribute
from tracer.experiments import outputs
from tracer.experiments.params import AttributionParams, PromptSpec, load_params
from tracer.graph.graph import Graph
from tracer.memory import peak_growth, return_freed_memory
from tracer.model.replacement import ReplacementModel

ROOT = Path("outputs")


def load_fetched(name: str) -> dict:
    path = outputs.fetched_dir(ROOT, name) / outputs.FETCHED_FILE
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; run the fetch stage first (`dvc repro`)")
    return json.loads(path.read_text())


def load_model(fetched: dict) -> ReplacementModel:
    """The profile's model from the folders the fetch stage recorded."""
    model, transcoders = fetched["model"], fetched["transcoders"]
    replacement = ReplacementModel.from_pretrained(
        model["path"], transcoders["path"], dtype=fetched["dtype"]
    )
    # Graphs name what was fetched (hub id and commit), not the local folder it was copied to.
    replacement.model_id, replacement.model_revision = model["source"], model["revision"]
    replacement.transcoders.source = transcoders["source"]
    replacement.transcoders.revision = transcoders["revision"]
    return replacement


def attribute_prompt(
    model: ReplacementModel, spec: PromptSpec, settings: AttributionParams
) -> tuple[Graph, dict]:
    """One prompt's graph and its run record: seconds per phase and, in bytes, the growth of the
    process's peak RSS during this attribution (as the benchmarks measure it)."""
    start = time.perf_counter()
    graphs: list[Graph] = []
    growth = peak_growth(
        lambda: graphs.append(
            # params.yaml's `attribution:` keys are `attribute`'s own keyword arguments
            attribute(
                spec.text, model, targets=spec.targets, progress=False, **settings.model_dump()
            )
        )
    )
    (graph,) = graphs
    timings = graph.metadata.pop("timings")
    record = {
        "seconds": timings | {"total": time.perf_counter() - start},
        "attribution_peak_growth_bytes": growth,
    }
    return graph, record


def main(name: str) -> None:
    return_freed_memory()  # process-wide allocator setting: freed batch buffers go back to the OS
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    profile = params.profiles[name]
    settings = params.attribution
    runs: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        write_json(folder / outputs.PROFILE_FILE, {"name": name, **profile.model_dump()})
        if not profile.enabled:
            return
        model = load_model(load_fetched(name))
        for spec in params.prompts:
            graph, runs[spec.id] = attribute_prompt(model, spec, settings)
            graph.save(folder / f"{spec.id}{outputs.GRAPH_SUFFIX}")
            print(f"{name}/{spec.id}: {graph.adjacency_matrix.shape[0]} nodes")

    write_folder(outputs.graphs_dir(ROOT, name), fill)
    write_json(outputs.runs_path(ROOT, name), runs)


if __name__ == "__main__":
    main(sys.argv[1])
