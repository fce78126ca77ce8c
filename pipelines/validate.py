"""DVC stage validate@PROFILE: do the graphs' predicted ablation effects match real interventions?

For every prompt's graph (`outputs/graphs/PROFILE/`), the `validation.top_n` most influential
feature nodes are ablated one at a time in each of `validation.modes` and the change of each logit
target is compared with the graph's prediction (`tracer.interventions.validation`). Writes
`outputs/validation/PROFILE/PROMPT.csv` (one row per node, target and mode) and `PROMPT.json`
(summary and rows), and `outputs/metrics/validation/PROFILE.json` (Spearman correlation and median
relative error per prompt and mode) for `dvc metrics show`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipelines.attribute import load_fetched, load_model
from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs
from tracer.experiments.params import load_params
from tracer.graph.graph import Graph
from tracer.interventions.validation import json_safe, validate_graph
from tracer.memory import return_freed_memory

ROOT = Path("outputs")
METRICS = ROOT / "metrics" / "validation"


def main(name: str) -> None:
    return_freed_memory()  # process-wide allocator setting: freed buffers go back to the OS
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    settings = params.validation
    summary: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        if not params.profiles[name].enabled:
            return
        model = load_model(load_fetched(name))
        for spec in params.prompts:
            graph = Graph.load(outputs.graph_path(ROOT, name, spec.id))
            report = validate_graph(
                graph,
                model,
                prompt=spec.text,
                top_n=settings.top_n,
                modes=settings.modes,
                batch_size=settings.batch_size,
            )
            report.to_csv(folder / f"{spec.id}.csv")
            report.to_json(folder / f"{spec.id}.json")
            summary[spec.id] = report.summary
            print(
                f"{name}/{spec.id}: "
                + ", ".join(
                    f"{mode} spearman {s['spearman']:.3f}" for mode, s in report.summary.items()
                )
            )

    write_folder(outputs.validation_dir(ROOT, name), fill)
    write_json(METRICS / f"{name}.json", json_safe(summary))


if __name__ == "__main__":
    main(sys.argv[1])
