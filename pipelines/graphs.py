"""DVC stage graphs@PROFILE: attribute every prompt with one profile, prune, score, plot.

Writes `outputs/profiles/PROFILE/`: `profile.json`, and per prompt `PROMPT/graph.safetensors`
(full graph), `pruned.json` (viewer document of the pruned graph), `scores.json` (scores, sizes,
timings, peak memory, pruning curve over `pruning.sweep`) and `pruning_curve.png`.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from tracer.attribute import attribute
from tracer.params import Params, load_params
from tracer.replacement import ReplacementModel
from tracer.report import prompt_report
from tracer.viewer import to_viewer_json, write_json
from tracer.zoo.layout import write_folder

OUT = Path("outputs/profiles")
METRICS = Path("outputs/metrics")  # one small file per profile for `dvc metrics show`
PLOTS = Path("outputs/plots")  # pruning curves for `dvc plots show`
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


def run_prompt(model: ReplacementModel, params: Params, profile: str, spec, folder: Path) -> dict:
    settings = params.attribution
    start = time.perf_counter()
    graph = attribute(
        spec.text,
        model,
        max_n_logits=settings.max_n_logits,
        desired_logit_prob=settings.desired_logit_prob,
        targets=spec.targets,
        batch_size=settings.batch_size,
        max_feature_nodes=settings.max_feature_nodes,
        progress=False,
    )
    seconds = dict(graph.metadata["timings"], total=time.perf_counter() - start)
    graph.save(folder / "graph.safetensors")
    pruning = params.pruning
    result = graph.prune(pruning.node_threshold, pruning.edge_threshold)
    document = to_viewer_json(
        graph,
        result,
        slug=f"{profile}-{spec.id}",
        tokenizer=model.tokenizer,
        node_threshold=pruning.node_threshold,
        edge_threshold=pruning.edge_threshold,
    )
    write_json(document, folder / "pruned.json")
    scores = prompt_report(
        graph, pruning.node_threshold, pruning.edge_threshold, pruning.sweep, result=result
    )
    scores["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    scores["seconds"] = seconds
    if scores["curve"]:
        plot_curve(scores["curve"], folder / "pruning_curve.png", f"{profile} / {spec.id}")
    write_json(scores, folder / "scores.json")
    return scores


def main(name: str) -> None:
    params = load_params()
    if name not in params.profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    profile = params.profiles[name]

    results: dict[str, dict] = {}

    def fill(folder: Path) -> None:
        write_json({"name": name, **profile.model_dump()}, folder / "profile.json")
        if not profile.enabled:
            return
        model = ReplacementModel.from_pretrained(
            profile.model,
            profile.transcoders,
            dtype=profile.dtype,
            revision=profile.revision,
            transcoder_revision=profile.transcoder_revision,
        )
        for spec in params.prompts:
            (folder / spec.id).mkdir()
            results[spec.id] = run_prompt(model, params, name, spec, folder / spec.id)
            print(f"{name}/{spec.id}: done")

    write_folder(OUT / name, fill)
    summary = {prompt: {k: r[k] for k in SUMMARY_KEYS} for prompt, r in results.items()}
    write_json(summary, METRICS / f"{name}.json")
    curve = [dict(point, prompt=prompt) for prompt, r in results.items() for point in r["curve"]]
    write_json(curve, PLOTS / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1])
