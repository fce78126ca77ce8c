"""DVC stage prune@PROFILE: prune and score every prompt's graph under one profile, plot the curve.

Reads `outputs/graphs/PROFILE/` (the attribute stage) and writes `outputs/profiles/PROFILE/`:
`profile.json`, and per prompt `PROMPT/pruned.json` (viewer document of the pruned graph; only
pruned graphs ever go to a viewer), `scores.json` (scores and sizes, full and pruned, and the
pruning curve over `pruning.sweep`) and `pruning_curve.png`; plus `outputs/metrics/PROFILE.json`
and `outputs/plots/PROFILE.json` for `dvc metrics show` and `dvc plots show`. Changing only the
thresholds re-runs this stage, not attribution. Feature nodes are labelled (`clerp`) from the
feature pages of the profile's transcoder set and `labels/SET.tsv`, when the pages exist. One
task per prompt, here or on Ray (`execution:` in params.yaml); either way the files are written
here, the same bytes.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from transformers import AutoTokenizer

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
from tracer.experiments.pages import profile_labels
from tracer.experiments.params import load_params
from tracer.experiments.report import prompt_report
from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph
from tracer.memory import return_freed_memory

ROOT = Path("outputs")
METRICS = ROOT / "metrics"  # one small file per profile for `dvc metrics show`
PLOTS = ROOT / "plots"  # pruning curves for `dvc plots show`

SUMMARY_KEYS = (
    "replacement",
    "completeness",
    "pruned_replacement",
    "pruned_completeness",
    "pruned_nodes",
    "pruned_edges",
    "active_features",
)


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(5, 3.2), dpi=100)
    x = [c["node_threshold"] for c in curve]
    left.plot(x, [c["nodes"] for c in curve], "o-", color="tab:blue", label="nodes")
    left.set_xlabel("node threshold (edge threshold alongside)")
    left.set_ylabel("nodes kept", color="tab:blue")
    right = left.twinx()
    right.plot(x, [c["replacement"] for c in curve], "s--", color="tab:red", label="replacement")
    right.plot(
        x, [c["completeness"] for c in curve], "^--", color="tab:green", label="completeness"
    )
    right.set_ylim(0, 1.02)
    right.set_ylabel("score")
    right.legend(loc="lower left", fontsize=7)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_folder(name: str) -> str:
    """The profile's model folder the fetch stage recorded, absolute (workers may run elsewhere)."""
    fetched = json.loads((outputs.fetched_dir(ROOT, name) / outputs.FETCHED_FILE).read_text())
    return str(Path(fetched["model"]["path"]).resolve())


def load_tokenizer(folder: str):
    """The model's tokenizer (labels for the viewer)."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None  # a model without tokenizer files: token ids as labels


def prune_prompt(
    graph: Graph, tokenizer, params, profile: str, prompt: str, folder: Path, labels=None
) -> dict:
    pruning = params.pruning
    pruned = prune_graph(
        graph,
        pruning.node_threshold,
        pruning.edge_threshold,
        slug=f"{profile}-{prompt}",
        tokenizer=tokenizer,
        labels=labels,  # feature nodes' clerp: human label, else the page's automatic one
    )
    write_json(folder / outputs.PRUNED_FILE, pruned.document, indent=None)
    scores = prompt_report(graph, pruned, pruning.sweep)
    if scores["curve"]:
        plot_curve(scores["curve"], folder / outputs.CURVE_PLOT, f"{profile} / {prompt}")
    write_json(folder / outputs.SCORES_FILE, scores)
    return scores


def prune_job(tokenizer, payload: tuple, *, params, profile: str, labels=None) -> dict:
    """One prompt as a job (here or on a Ray worker): payload (prompt id, graph file bytes) ->
    {"files": the prompt folder's files as bytes, "scores": its scores}."""
    prompt, data = payload
    graph = read_bytes_as_file(data, Graph.load, outputs.GRAPH_SUFFIX)
    scores: list[dict] = []

    def fill(folder: Path) -> None:
        (folder / prompt).mkdir()
        scores.append(
            prune_prompt(graph, tokenizer, params, profile, prompt, folder / prompt, labels)
        )

    return {"files": files_of(fill), "scores": scores[0]}


def main(name: str) -> None:
    return_freed_memory()  # process-wide allocator setting: freed buffers go back to the OS
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    graphs = outputs.graphs_dir(ROOT, name)
    info_path = graphs / outputs.PROFILE_FILE
    if not info_path.is_file():
        raise SystemExit(f"{info_path} does not exist; run the attribute stage first (`dvc repro`)")
    info = json.loads(info_path.read_text())
    results: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        write_json(folder / outputs.PROFILE_FILE, info)
        if not info["enabled"]:
            return
        # one job per prompt, here or on Ray (params.yaml `execution:`): the graph travels with
        # the job, the files come back as bytes and are written here by both engines
        jobs = [
            Job(
                name,
                f"{name}/{spec.id}",
                (spec.id, outputs.graph_path(ROOT, name, spec.id).read_bytes()),
            )
            for spec in params.prompts
        ]
        labels = profile_labels(ROOT, name, info)  # None: no pages for its set
        work = partial(prune_job, params=params, profile=name, labels=labels)
        groups = {name: model_folder(name)}
        outcomes = run_jobs(groups, jobs, load_tokenizer, work, params.execution)
        raise_failures(outcomes)
        for spec, outcome in zip(params.prompts, outcomes, strict=True):
            write_files(folder, outcome.result["files"])
            results[spec.id] = outcome.result["scores"]
            print(f"{name}/{spec.id}: {results[spec.id]['pruned_nodes']} nodes kept")

    write_folder(outputs.profile_dir(ROOT, name), fill)
    summary = {prompt: {k: r[k] for k in SUMMARY_KEYS} for prompt, r in results.items()}
    write_json(METRICS / f"{name}.json", summary)
    curve = [dict(point, prompt=prompt) for prompt, r in results.items() for point in r["curve"]]
    write_json(PLOTS / f"{name}.json", curve)


if __name__ == "__main__":
    main(sys.argv[1])
