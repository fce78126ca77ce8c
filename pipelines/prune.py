"""DVC stage prune@PROFILE: prune and score every prompt's graph under one profile, plot the curve.

Reads `outputs/graphs/PROFILE/` (the attribute stage) and writes `outputs/profiles/PROFILE/`:
`profile.json`, and per prompt `PROMPT/pruned.json` (viewer document of the pruned graph; only
pruned graphs ever go to a viewer), `scores.json` (scores and sizes, full and pruned, and the
pruning curve over `pruning.sweep`) and `pruning_curve.png`; plus `outputs/metrics/PROFILE.json`
and `outputs/plots/PROFILE.json` for `dvc metrics show` and `dvc plots show`. Changing only the
thresholds re-runs this stage, not attribution.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs
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


def load_tokenizer(name: str):
    """The profile's tokenizer (labels for the viewer), from the folder the fetch stage recorded."""
    fetched = json.loads((outputs.fetched_dir(ROOT, name) / outputs.FETCHED_FILE).read_text())
    try:
        return AutoTokenizer.from_pretrained(fetched["model"]["path"])
    except (OSError, ValueError):
        return None  # a model without tokenizer files: token ids as labels


def prune_prompt(graph: Graph, tokenizer, params, profile: str, prompt: str, folder: Path) -> dict:
    pruning = params.pruning
    pruned = prune_graph(
        graph,
        pruning.node_threshold,
        pruning.edge_threshold,
        slug=f"{profile}-{prompt}",
        tokenizer=tokenizer,
    )
    write_json(folder / outputs.PRUNED_FILE, pruned.document, indent=None)
    scores = prompt_report(graph, pruned, pruning.sweep)
    if scores["curve"]:
        plot_curve(scores["curve"], folder / outputs.CURVE_PLOT, f"{profile} / {prompt}")
    write_json(folder / outputs.SCORES_FILE, scores)
    return scores


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
        tokenizer = load_tokenizer(name)
        for spec in params.prompts:
            graph = Graph.load(outputs.graph_path(ROOT, name, spec.id))
            (folder / spec.id).mkdir()
            results[spec.id] = prune_prompt(
                graph, tokenizer, params, name, spec.id, folder / spec.id
            )
            print(f"{name}/{spec.id}: {results[spec.id]['pruned_nodes']} nodes kept")

    write_folder(outputs.profile_dir(ROOT, name), fill)
    summary = {prompt: {k: r[k] for k in SUMMARY_KEYS} for prompt, r in results.items()}
    write_json(METRICS / f"{name}.json", summary)
    curve = [dict(point, prompt=prompt) for prompt, r in results.items() for point in r["curve"]]
    write_json(PLOTS / f"{name}.json", curve)


if __name__ == "__main__":
    main(sys.argv[1])
