"""Run by tests/test_estimate.py in a fresh process: the estimate for one configuration, then the
measured peak of attribution (model loaded) or of pruning (graph file loaded). Prints JSON.

    python tests/estimate_probe.py KIND N_POS FEATURES NODES|all BATCH attribute|prune GRAPH
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tracer.attribution.attribute import attribute
from tracer.attribution.estimate import active_per_cell, estimate, shapes_of_model
from tracer.graph.graph import Graph
from tracer.memory import peak_growth, return_freed_memory
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders

N_LOGITS = 10


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def main(kind: str, n_pos: str, features: str, nodes: str, batch: str, phase: str, path: str):
    torch.set_num_threads(1)
    return_freed_memory()
    max_nodes, batch_size = None if nodes == "all" else int(nodes), int(batch)
    model = build_model("llama", n_layers=4, d_model=128, n_heads=4, vocab=512, context=512)
    ts = build_transcoders(kind, n_layers=4, d_model=128, d_transcoder=int(features), top_k=16)
    rm = ReplacementModel(model, ts)
    gen = torch.Generator().manual_seed(0)
    ids = rm.tokenize(torch.randint(4, 512, (int(n_pos),), generator=gen))
    cells, found = active_per_cell(rm, ids, None)
    predicted = estimate(
        shapes_of_model(rm),
        ids.shape[0],
        active=cells,
        active_from=found,
        max_feature_nodes=max_nodes,
        batch_size=batch_size,
        n_logits=N_LOGITS,
    )
    out: dict = {"estimate": predicted.to_dict()}
    if phase == "attribute":
        graphs: list[Graph] = []

        def run() -> None:
            graphs.append(
                attribute(
                    ids,
                    rm,
                    batch_size=batch_size,
                    max_feature_nodes=max_nodes,
                    max_n_logits=N_LOGITS,
                    desired_logit_prob=1.0,
                    progress=False,
                )
            )

        out["measured"] = peak_growth(run)
        graph = graphs[0]
        graph.save(path)
        out["file_bytes"] = Path(path).stat().st_size
        out["nodes"] = graph.layout.n_nodes
        out["active"] = int(graph.active_features.shape[0])
        out["nonzero"] = graph.n_edges()
    else:
        del rm, model, ts
        # what the forward above freed goes back to the OS first: pruning reusing those heap
        # pages would grow the RSS less, by however much happened to be left free
        trim_heap()

        def run() -> None:
            graph = Graph.load(path)
            result = graph.prune()
            graph.scores(), graph.scores(result)

        out["measured"] = peak_growth(run)
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
