"""Intervention benchmark: time per single-feature intervention against a plain forward pass.

Fixture: the one of benchmarks/attribution.py (random Llama-architecture model, 6 layers, d_model
256, per-layer JumpReLU set of 4,096 features per layer calibrated sparse, 48-token prompt). 100
random active features (not at the start token) are each set to 0, one change set per sequence,
batched (`run_with_changes(..., with_activations=False)`). Two floors, measured in this process on
an untouched copy of the model: one plain forward at batch 1, and one plain forward at the same
batch divided by the batch (the fairer per-sequence floor). Target: per intervention <= 1.3 x the
batch-1 forward in "full" mode, batched. When over target, the overhead is split into its parts:
the freezing wrappers (in "off" mode), the NNSight trace, and the per-layer edits of the MLP writes.

    .venv/bin/python benchmarks/interventions.py [--n 100 --batch-sizes 25,50 --repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from fixture import add_fixture_arguments, build_fixture

from tracer.interventions.intervene import MODES, FeatureChange, run_with_changes
from tracer.model.replacement import PromptState, ReplacementModel

TARGET = 1.3


def best_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Smallest wall time of each run over `repeats` rounds, the runs interleaved within a round
    (so that load from other processes drifts over all of them alike); one warm-up round."""
    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def random_active_features(state: PromptState, n: int, seed: int = 0) -> list[FeatureChange]:
    """`n` ablations of distinct active features, none at the start token (position 0)."""
    active = torch.cat(
        [
            torch.cat([torch.full((len(pos), 1), layer), pos[:, None], feat[:, None]], dim=1)
            for layer, acts in enumerate(state.activations)
            for pos, feat in [acts[1:].nonzero(as_tuple=True)]
        ]
    )
    active[:, 1] += 1
    if active.shape[0] < n:
        raise ValueError(f"only {active.shape[0]} active features, asked for {n}")
    chosen = torch.randperm(active.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return [FeatureChange(lay, pos, feat, value=0.0) for lay, pos, feat in active[chosen].tolist()]


def run_all(
    rm: ReplacementModel, state: PromptState, changes: list[FeatureChange], batch: int, mode: str
) -> None:
    """Every change once, `batch` change sets per forward."""
    for start in range(0, len(changes), batch):
        sets = [[c] for c in changes[start : start + batch]]
        ids = state.input_ids[None].expand(len(sets), -1)
        run_with_changes(rm, state, ids, sets, mode, with_activations=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_arguments(parser)
    parser.add_argument("--n", type=int, default=100, help="number of interventions")
    parser.add_argument("--batch-sizes", default="25,50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="split the time even on target")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    rm, plain, prompt = build_fixture(args)
    ids = rm.tokenize(prompt)
    state = rm.run_prompt(ids, zero_bos=False)
    changes = random_active_features(state, args.n)
    n_active = sum(int((a != 0).sum()) for a in state.activations)

    def forward(model, batch: int) -> Callable[[], object]:
        return torch.no_grad()(lambda: model(ids[None].expand(batch, -1)))

    main_batch = batches[-1]
    runs = {"plain 1": forward(plain, 1)}
    for batch in batches:
        runs[f"plain {batch}"] = forward(plain, batch)
        runs[f"full {batch}"] = lambda b=batch: run_all(rm, state, changes, b, "full")
    for mode in MODES[1:]:
        runs[f"{mode} {main_batch}"] = lambda m=mode: run_all(rm, state, changes, main_batch, m)
    best = best_times(runs, args.repeats)

    one = best["plain 1"]
    print(f"fixture: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer,")
    print(f"         {ids.shape[0]} tokens, {n_active} active features, {args.n} interventions,")
    print(f"         torch threads {torch.get_num_threads()}, best of {args.repeats} rounds")
    print(f"plain forward, batch 1:        {one * 1e3:8.2f} ms")
    for batch in batches:
        floor = best[f"plain {batch}"] / batch
        per = best[f"full {batch}"] / len(changes)
        print(f"plain forward, batch {batch} / {batch}: {floor * 1e3:8.2f} ms per sequence")
        print(
            f"  full mode, batch {batch}:       {per * 1e3:8.2f} ms per intervention = "
            f"{per / one:5.2f} x batch-1 forward (target <= {TARGET}), "
            f"{per / floor:5.2f} x batched forward per sequence"
        )
    print(f"per mode (batch {main_batch}):")
    floor = best[f"plain {main_batch}"] / main_batch
    for mode in MODES:
        per = best[f"{mode} {main_batch}"] / len(changes)
        print(
            f"  {mode:<17} {per * 1e3:8.2f} ms per intervention = {per / one:5.2f} x batch-1, "
            f"{per / floor:5.2f} x batched per sequence"
        )

    per = best[f"full {main_batch}"] / len(changes)
    if per / one > TARGET or args.breakdown:
        print(f"where the time goes (batch {main_batch}; full mode {per / one:.2f} x batch-1):")
        breakdown(rm, plain, state, ids, main_batch, args.repeats)


def breakdown(
    rm: ReplacementModel,
    plain: torch.nn.Module,
    state: PromptState,
    ids: torch.Tensor,
    batch: int,
    repeats: int,
) -> None:
    """Per-sequence time of each layer of the intervention stack, at one batch size."""
    batch_ids = ids[None].expand(batch, -1)

    @torch.no_grad()
    def traced() -> None:
        with rm.traced_pass():  # every trace takes the model's turn, as the library's do
            with rm.envoy.trace(batch_ids):
                final = rm.envoy.output[0].save()
        rm.logits_from_hidden(final)

    no_change = [[]] * batch
    ablations = random_active_features(state, batch)
    steps = {
        "plain model": torch.no_grad()(lambda: plain(batch_ids)),
        "+ freezing wrappers (off)": torch.no_grad()(lambda: rm.model(batch_ids)),
        "+ NNSight trace": traced,
        "+ MLP write edits (no change)": lambda: run_with_changes(
            rm, state, batch_ids, no_change, "full", with_activations=False
        ),
        "+ one ablation per row": lambda: run_all(rm, state, ablations, batch, "full"),
    }
    best = best_times(steps, repeats)
    previous = None
    for name, seconds in best.items():
        seconds /= batch
        extra = "" if previous is None else f"  ({(seconds - previous) * 1e3:+6.2f} ms)"
        print(f"  {name:<32} {seconds * 1e3:8.2f} ms per sequence{extra}")
        previous = seconds


if __name__ == "__main__":
    main()
