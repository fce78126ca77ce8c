"""Attribution benchmark: this tree against an earlier commit, per phase, in one run.

Fixture: a random Llama-architecture model (6 layers, d_model 256) with a per-layer JumpReLU
transcoder set of 4,096 features per layer, made sparse with per-feature thresholds at a high
quantile of random-token pre-activations (`--density`), and a 48-token prompt. Each variant runs
in its own process on the same fixture: the current tree, and the tree of `--baseline` (default:
the last commit before prefix passes and per-position contractions) exported with `git archive`.
Printed per variant (best of `--repeats`): seconds per phase, process CPU time (user and
system), backward passes, the ratio to the floor `n_backward x (one forward + backward of the
frozen model at the same batch)` measured in that process, peak memory growth during the run;
then the ratios current / previous, and how far the two graphs differ (same features selected,
largest adjacency difference relative to the largest entry).

    .venv/bin/python benchmarks/attribution.py [--tokens 48] [--batch-size 256] [--repeats 2]
        [--max-feature-nodes N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from fixture import add_fixture_arguments, build_fixture
from safetensors.torch import load_file, save_file

REPOSITORY = Path(__file__).resolve().parents[1]
BASELINE = "9c99083"  # gather-based contractions, every batch through the whole prompt


def measure(args: argparse.Namespace) -> None:
    """Child process: attribute on the fixture with whatever `tracer` is importable; JSON out."""
    from tracer.attribution.attribute import attribute, collect_sources
    from tracer.attribution.rows import RowComputer
    from tracer.memory import peak_growth, return_freed_memory

    rm, _, prompt = build_fixture(args)
    return_freed_memory()  # the program's choice, as the CLI's
    result = {}

    def run():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result["graph"] = attribute(
            prompt,
            rm,
            batch_size=args.batch_size,
            max_feature_nodes=args.max_feature_nodes,
            progress=False,
        )
        result["total"] = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["user"] = after.ru_utime - usage.ru_utime
        result["system"] = after.ru_stime - usage.ru_stime

    peak = peak_growth(run)
    graph = result.pop("graph")
    # the floor: one forward + one backward of the frozen model at the same batch size
    state = rm.run_prompt(rm.tokenize(prompt))
    sources = collect_sources(rm, state)
    batch = min(args.batch_size, sources.n_active)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        lp = RowComputer(rm, state, sources, batch).linear
        grads = torch.randn_like(lp.final_hidden)
        torch.autograd.grad([lp.final_hidden], [lp.embed, *lp.writes], [grads], allow_unused=True)
        timings.append(time.perf_counter() - start)
    adjacency = graph.adjacency_matrix
    save_file(
        {"adjacency": adjacency.contiguous(), "selected": graph.selected_features.contiguous()},
        args.child + ".safetensors",
    )
    report = {
        **result,
        "phases": graph.metadata["timings"],
        "n_backward": graph.metadata["n_backward"],
        "one_pass": min(timings),
        "peak_growth": peak,
        "n_active": graph.active_features.shape[0],
        "n_pos": graph.n_pos,
        "adjacency_bytes": adjacency.numel() * adjacency.element_size(),
        "threads": torch.get_num_threads(),
    }
    Path(args.child).write_text(json.dumps(report))


def export_tree(revision: str, into: Path) -> Path:
    """The `tracer` package of `revision`, extracted under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", revision, "tracer"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_variant(root: Path, argv: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, __file__, *argv, "--child", str(out)]
    subprocess.run(command, env=env, check=True)
    report = json.loads(out.read_text())
    report["tensors"] = load_file(str(out) + ".safetensors")
    return report


def best(reports: list[dict]) -> dict:
    return min(reports, key=lambda report: report["total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args)
        return
    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        previous_root = export_tree(args.baseline, Path(tmp) / "previous")
        runs: dict[str, list[dict]] = {"previous": [], "current": []}
        for repeat in range(args.repeats):
            for name, root in (("previous", previous_root), ("current", REPOSITORY)):
                out = Path(tmp) / f"{name}-{repeat}.json"
                runs[name].append(run_variant(root, argv, out))
    previous, current = best(runs["previous"]), best(runs["current"])

    print(f"fixture: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer,")
    print(
        f"         {current['n_pos']} tokens, batch {args.batch_size}, "
        f"torch threads {current['threads']}, best of {args.repeats}"
    )
    print(f"active features: {current['n_active']}, baseline: {args.baseline}")
    print(f"{'':24}{'previous':>10}{'current':>10}{'ratio':>8}")

    def row(label: str, old: float, new: float, unit: str = "s") -> None:
        print(f"  {label:<22}{old:>9.3f}{unit}{new:>9.3f}{unit}{new / old:>8.2f}")

    for phase in previous["phases"]:
        row(f"phase {phase}", previous["phases"][phase], current["phases"][phase])
    row("total", previous["total"], current["total"])
    row("CPU user", previous["user"], current["user"])
    row("CPU system", previous["system"], current["system"])
    floors = [r["n_backward"] * r["one_pass"] for r in (previous, current)]
    row("floor", *floors)
    print(
        f"  {'total / floor':<22}{previous['total'] / floors[0]:>10.2f}"
        f"{current['total'] / floors[1]:>10.2f}"
    )
    print(f"  {'backward passes':<22}{previous['n_backward']:>10d}{current['n_backward']:>10d}")
    growth = [r["peak_growth"] / 2**20 for r in (previous, current)]
    row("peak growth", *growth, unit="M")
    print(f"  dense adjacency {current['adjacency_bytes'] / 2**20:.1f} MiB")
    old, new = previous["tensors"], current["tensors"]
    same = torch.equal(old["selected"], new["selected"])
    print(f"same selected features: {same}")
    if same and old["adjacency"].shape == new["adjacency"].shape:
        scale = old["adjacency"].abs().max().item()
        difference = (new["adjacency"] - old["adjacency"]).abs().max().item()
        print(f"largest adjacency difference / largest entry: {difference / scale:.2e}")


if __name__ == "__main__":
    main()
