"""Attribution benchmark: per-phase time, peak memory and the ratio to the backward-pass floor.

Fixture: a random Llama-architecture model (6 layers, d_model 256) with a per-layer JumpReLU
transcoder set of 4,096 features per layer, made sparse with per-feature thresholds at a high
quantile of random-token pre-activations (`--density`; on the benchmark prompt about 0.5% of
features fire per token and layer, ~6,000 active features, the order of the reference tool's
4,270 at 64 tokens), and a 48-token prompt. The floor is
`n_backward x (one forward + backward of the frozen model)` at the same batch size, measured
in this process; targets: ratio <= 1.5, and peak memory (growth over the process before the run)
<= 2 x dense adjacency + model + transcoders.

    .venv/bin/python benchmarks/attribution.py [--layers 6 --d-model 256 --features 4096 --tokens 48]
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil
import torch
from fixture import add_fixture_arguments, build_fixture

from tracer.attribution.attribute import attribute, collect_sources
from tracer.attribution.rows import RowComputer
from tracer.memory import return_freed_memory


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    rm, model, prompt = build_fixture(args)
    ts = rm.transcoders
    weights = nbytes(model.parameters()) + sum(
        nbytes(t for t in vars(ts.layer(i)).values() if t is not None) for i in range(args.layers)
    )

    # the program's choice, as the CLI's: freed temporaries leave the RSS. Made here, where
    # attribute() itself used to make it, so the figures compare with earlier runs
    return_freed_memory()
    rss_before = rss()
    start = time.perf_counter()
    graph = attribute(prompt, rm, batch_size=args.batch_size, progress=False)
    total = time.perf_counter() - start
    peak = peak_rss() - rss_before
    n_backward = graph.metadata["n_backward"]
    adjacency = graph.adjacency_matrix.numel() * graph.adjacency_matrix.element_size()

    # the floor: one forward + one backward of the frozen model at the same batch size
    state = rm.run_prompt(rm.tokenize(prompt))
    sources = collect_sources(rm, state)
    batch = min(args.batch_size, sources.n_active)
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        computer = RowComputer(rm, state, sources, batch)
        lp = computer.linear
        grads = torch.randn_like(lp.final_hidden)
        torch.autograd.grad([lp.final_hidden], [lp.embed, *lp.writes], [grads], allow_unused=True)
        timings.append(time.perf_counter() - t0)
    one_pass = min(timings)
    floor = n_backward * one_pass

    print(f"fixture: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer,")
    print(
        f"         {graph.n_pos} tokens, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"active features: {graph.active_features.shape[0]}, nodes: {graph.layout.n_nodes}")
    for phase, seconds in graph.metadata["timings"].items():
        print(f"  phase {phase:<15} {seconds:8.3f} s")
    print(f"total time:           {total:8.3f} s")
    print(f"backward passes:      {n_backward}")
    print(f"forward+backward:     {one_pass:8.3f} s (one, batch {batch})")
    print(f"ratio total / floor:  {total / floor:8.2f}   (target <= 1.5)")
    budget = 2 * adjacency + weights
    print(f"dense adjacency:      {adjacency / 2**20:8.1f} MiB")
    print(f"model + transcoders:  {weights / 2**20:8.1f} MiB")
    print(f"peak RSS (process):   {peak_rss() / 2**20:8.1f} MiB")
    print(f"peak growth in run:   {peak / 2**20:8.1f} MiB")
    print(f"ratio growth / (2 x adjacency + weights): {peak / budget:6.2f}   (target <= 1.0)")


if __name__ == "__main__":
    main()
