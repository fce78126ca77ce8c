"""Pruning benchmark: peak memory and time of prune + scores, blockwise against the dense reference.

Graph: a random attribution-like DAG in float32, `layered_graph` of tests/test_pruning.py: 16
layers x 32 positions of error nodes, 32 tokens, 10 logits and the remaining `--nodes` features
in layer/position order, each reading 85% of the nodes of earlier layers at its own or earlier
positions (about 20% of the adjacency non-zero; paths of up to 17 edges). The work measured:
prune at (0.8, 0.98), then the full-graph and the pruned-graph scores, once with the
straightforward dense computation of the tests (whole normalised matrices, a full sort of the
edge scores) and once with `tracer.graph.pruning`. Each runs in a fresh process, so peaks do not mix;
its peak is the growth of that process's peak RSS over its RSS with the adjacency built.
Target: growth <= 1x adjacency, i.e. whole-process peak <= 2x the adjacency.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pruning.py [--nodes 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# The graph generator, dense reference and peak measurement are the tests', so the benchmark
# times exactly the computation that the tests compare tracer.graph.pruning against.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_pruning import (  # noqa: E402
    dense_prune,
    dense_scores,
    layered_graph,
)

from tracer.graph.pruning import graph_scores, prune  # noqa: E402
from tracer.memory import peak_growth, return_freed_memory  # noqa: E402

LAYERS, POSITIONS, LOGITS = 16, 32, 10
THRESHOLDS = (0.8, 0.98)


def run_dense(adjacency, layout, weights) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    result = dense_prune(adjacency, layout, weights, *THRESHOLDS)
    nodes, edges = result.final_nodes, result.final_edges
    del result
    everything = (torch.ones_like(nodes), torch.ones_like(edges))
    full = dense_scores(adjacency, layout, weights, *everything)
    del everything
    pruned = dense_scores(adjacency, layout, weights, nodes, edges)
    return nodes, edges, [*full, *pruned]


def run_tracer(adjacency, layout, weights) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    result = prune(adjacency, layout, weights, *THRESHOLDS)
    full = graph_scores(adjacency, layout, weights)
    pruned = graph_scores(adjacency, layout, weights, result.node_mask, result.edge_mask)
    scores = [full.replacement, full.completeness, pruned.replacement, pruned.completeness]
    return result.node_mask, result.edge_mask, scores


def measure(method: str, n_nodes: int, folder: Path) -> None:
    """In this (fresh) process: build the graph, run one method, save its masks, print JSON."""
    return_freed_memory()
    n_features = n_nodes - LAYERS * POSITIONS - POSITIONS - LOGITS
    adjacency, layout, weights = layered_graph(0, n_features, LAYERS, POSITIONS, LOGITS, 0.85)
    run = {"dense": run_dense, "tracer": run_tracer}[method]
    out = {}

    def timed() -> None:
        start = time.perf_counter()
        out["masks_scores"] = run(adjacency, layout, weights)
        out["seconds"] = time.perf_counter() - start

    growth = peak_growth(timed)
    nodes, edges, scores = out["masks_scores"]
    np.save(folder / f"{method}_nodes.npy", nodes.numpy())
    np.save(folder / f"{method}_edges.npy", np.packbits(edges.numpy()))
    adjacency_bytes = adjacency.numel() * adjacency.element_size()
    report = {
        "seconds": out["seconds"],
        "growth": growth / adjacency_bytes,
        "adjacency_mib": adjacency_bytes / 2**20,
        "nonzero": float((adjacency != 0).sum()) / adjacency.numel(),  # after the peak is taken
        "scores": scores,
        "nodes": int(nodes.sum()),
        "edges": int(edges.sum()),
    }
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20_000)
    parser.add_argument("--measure", choices=["dense", "tracer"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.nodes, args.folder)
        return

    with tempfile.TemporaryDirectory() as folder:
        reports = {}
        for method in ("dense", "tracer"):
            command = [sys.executable, __file__, "--nodes", str(args.nodes)]
            command += ["--measure", method, "--folder", folder]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            reports[method] = json.loads(output.strip().splitlines()[-1])
        loaded = {
            name: np.load(Path(folder) / f"{name}.npy")
            for name in ("dense_nodes", "tracer_nodes", "dense_edges", "tracer_edges")
        }
    node_diff = int((loaded["dense_nodes"] != loaded["tracer_nodes"]).sum())
    edge_diff = int(np.bitwise_count(loaded["dense_edges"] ^ loaded["tracer_edges"]).sum())

    dense, ours = reports["dense"], reports["tracer"]
    print(f"graph: {args.nodes} nodes ({LAYERS} layers x {POSITIONS} positions, {LOGITS} logits),")
    print(
        f"       float32 adjacency {ours['adjacency_mib']:.0f} MiB, {ours['nonzero']:.1%} non-zero"
    )
    print(f"torch threads: {torch.get_num_threads()}; prune at {THRESHOLDS}, full + pruned scores")
    print(f"{'':8} {'seconds':>8} {'growth / A':>11} {'peak / A':>9} {'nodes':>7} {'edges':>10}")
    for name, report in reports.items():
        print(
            f"{name:8} {report['seconds']:8.2f} {report['growth']:11.2f} {1 + report['growth']:9.2f}"
            f" {report['nodes']:7d} {report['edges']:10d}"
        )
    print(f"time tracer / dense:  {ours['seconds'] / dense['seconds']:.2f}")
    print(f"peak tracer / A:      {1 + ours['growth']:.2f}   (target <= 2)")
    print(f"masks differ in:      {node_diff} nodes, {edge_diff} edges (float-rounding ties)")
    worst = max(abs(a - b) for a, b in zip(dense["scores"], ours["scores"], strict=True))
    print(f"scores differ by:     {worst:.1e} at most (full and pruned replacement, completeness)")


if __name__ == "__main__":
    main()
