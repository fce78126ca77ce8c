"""Adjacency rows by back-propagation: the sources a row is contracted with, and the computer.

Linear forwards of the prompt (`ReplacementModel.linear_forward`) are kept and back-propagated
once per batch of targets: each target's read vector is injected as the gradient at its read
point, and the gradient reaching every write point is contracted with the vectors the sources
write there (features: activation-scaled decoder rows; errors; token embeddings).

Two facts of the frozen model keep the backward passes small. A target at layer t reaches no
write point above t, so the backward of a batch stops at its deepest target's layer. And with
attention frozen, a target at position p depends only on positions <= p: a batch needs the
backward only over the prefix up to its last target's position, so the computer keeps linear
passes of a few prefix lengths (`plan_prefix_lengths`) and runs each batch through the shortest
that holds it. The contraction at a write point is one matrix product per position, over the
positions the pass holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.model.replacement import LinearPass, PromptState, ReplacementModel

ELEMENT_BUDGET = 1 << 22  # elements per temporary block of rows (tracer/attribution/attribute.py)
# A linear forward of `length` positions costs about as much as backward passes through
# FORWARD_COST * n_layers * (length + FORWARD_OVERHEAD) (layer, position) steps at the same batch
# (measured on the benchmark fixture: the forward also runs the family's query and key
# projections, and a trace has a fixed cost)
FORWARD_COST = 1.75
FORWARD_OVERHEAD = 8
RUN_SLOTS = 1 << 14  # padded (position, source) slots per run: its product is (slots, batch)
RUN_PADDING = 1.25  # at most this many slots per source in a run (beyond one per position)


@dataclass
class SourceRun:
    """Sources at consecutive positions, zero-padded to the same number per position, so that
    their contraction with a gradient is one batched matrix product."""

    start: int  # first position
    vectors: torch.Tensor  # (n_positions, slots, d_model): what each source writes, zero-padded
    flat: torch.Tensor  # (n,) long: each source's (position from `start`, slot) as one index
    columns: torch.Tensor  # (n,) long: each source's adjacency column
    offsets: list[int]  # n_positions + 1: the sources before each position (they are sorted)


@dataclass
class WriteSources:
    """The sources writing at one point (a layer's MLP write, or the token embedding), in runs
    of consecutive positions."""

    runs: list[SourceRun]

    @classmethod
    def by_position(
        cls, columns: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, n_pos: int
    ) -> WriteSources:
        """Sources given in any order: columns and positions (n,), vectors (n, d_model)."""
        order = positions.argsort(stable=True)
        columns, positions = columns[order], positions[order]
        counts = torch.bincount(positions, minlength=n_pos).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        slots = torch.arange(positions.shape[0]) - torch.tensor(offsets[:-1])[positions]
        runs, start = [], 0
        while start < n_pos:
            stop, width = start + 1, max(1, counts[start])
            while stop < n_pos:
                wider = max(width, counts[stop])
                n = offsets[stop + 1] - offsets[start]
                padded = (stop + 1 - start) * wider
                if padded > RUN_SLOTS or padded > RUN_PADDING * n + (stop + 1 - start):
                    break
                stop, width = stop + 1, wider
            first, last = offsets[start], offsets[stop]
            rows = positions[first:last] - start
            block = torch.zeros(stop - start, width, vectors.shape[1], dtype=vectors.dtype)
            block[rows, slots[first:last]] = vectors[order[first:last]]
            runs.append(
                SourceRun(
                    start=start,
                    vectors=block,
                    flat=rows * width + slots[first:last],
                    columns=columns[first:last],
                    offsets=[o - first for o in offsets[start : stop + 1]],
                )
            )
            start = stop
        return cls(runs=runs)


@dataclass
class Sources:
    """Every source of the full (unpruned) graph; feature order is (layer, pos, feature).

    Columns: `[features | errors (layer-major, then position) | tokens]`.
    """

    features: torch.Tensor  # (n_active, 3) long: layer, pos, feature
    activations: torch.Tensor  # (n_active,)
    encoders: torch.Tensor  # (n_active, d_model): each feature's encoder row (its read vector)
    writes: list[WriteSources]  # per layer: features writing there, and the layer's errors
    embed: WriteSources  # token embeddings, added where layer 0's input forms
    n_pos: int

    @property
    def n_active(self) -> int:
        return self.features.shape[0]

    @property
    def n_columns(self) -> int:
        return self.n_active + (len(self.writes) + 1) * self.n_pos

    @property
    def dtype(self) -> torch.dtype:
        return self.activations.dtype


@dataclass
class Target:
    """Where a row's gradient is injected: `layer` None means the final hidden state (a logit)."""

    layer: int | None
    pos: int
    vector: torch.Tensor  # (d_model,)


def plan_prefix_lengths(
    needs: list[tuple[int, int]], n_pos: int, n_layers: int, forward_cost: float = FORWARD_COST
) -> list[int]:
    """Prefix lengths to build linear passes for, given each batch's (length, depth) need.

    A batch of `length` (its last target's position + 1) and `depth` (layers its backward
    crosses) runs through the shortest pass at least `length` long. The lengths minimise the
    modelled time: a pass costs `forward_cost * n_layers * (length + FORWARD_OVERHEAD)`, a
    batch `depth * length` (the attention's part quadratic in the length is small at the prompt
    sizes attribution meets). The full length is always among them (logit rows read the last
    position).
    """
    weight = [0.0] * (n_pos + 1)  # summed depth of the batches needing exactly each length
    for length, depth in needs:
        weight[length] += depth
    candidates = sorted({length for length, _ in needs} | {n_pos})
    build = forward_cost * n_layers
    # best[j]: least cost of covering every need <= candidates[j], the longest pass being
    # candidates[j]; it serves the needs in (candidates[i - 1], candidates[j]] for the best i
    best, choice = [], []
    for j, length in enumerate(candidates):
        covered = 0.0  # depth of the needs in (candidates[i], candidates[j]]
        top, top_i = float("inf"), -1
        for i in range(j, -1, -1):
            covered += weight[candidates[i]]
            cost = (best[i - 1] if i > 0 else 0.0) + (build + covered) * length
            cost += build * FORWARD_OVERHEAD
            if cost < top:
                top, top_i = cost, i
        best.append(top)
        choice.append(top_i)
    lengths, j = [], len(candidates) - 1
    while j >= 0:
        lengths.append(candidates[j])
        j = choice[j] - 1
    return sorted(lengths)


class RowComputer:
    """Adjacency rows by back-propagation through retained linear forwards of prompt prefixes."""

    def __init__(
        self,
        model: ReplacementModel,
        state: PromptState,
        sources: Sources,
        batch: int,
        lengths: list[int] | None = None,
    ):
        """Builds linear passes of `batch` copies of each prefix in `lengths` (and the prompt)."""
        self.model, self.sources, self.batch = model, sources, batch
        self.n_pos = state.n_pos
        lengths = sorted(set(lengths or ()) | {state.n_pos})
        if not 1 <= lengths[0]:
            raise ValueError(f"prefix lengths must be in [1, {state.n_pos}], got {lengths}")
        # only the graph of each pass is kept, not its values: what stays is the batch's gradients
        self.passes: dict[int, LinearPass] = {
            n: model.linear_forward(state if n == state.n_pos else state.prefix(n), batch, False)
            for n in lengths
        }
        self.n_backward = 0

    @property
    def linear(self) -> LinearPass:
        """The pass over the whole prompt."""
        return self.passes[self.n_pos]

    def rows(self, targets: list[Target], out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (len(targets), n_columns) for at most `batch` targets, added into `out`.

        One backward pass, through the shortest retained pass that holds every target. Each
        target's read vector is injected as the gradient at its read point when the backward
        reaches it, and each write point's gradient is contracted with its sources as soon as it
        is computed, so at any time only the batch's in-flight gradient buffers exist.
        """
        assert 0 < len(targets) <= self.batch
        n, src = len(targets), self.sources
        need = max(target.pos for target in targets) + 1
        length = min(length for length in self.passes if length >= need)
        lp = self.passes[length]
        if out is None:
            out = torch.zeros(n, src.n_columns, dtype=src.dtype)
        by_point: dict[int | None, list[tuple[int, Target]]] = {}
        for b, target in enumerate(targets):
            by_point.setdefault(target.layer, []).append((b, target))
        roots = [lp.final_hidden if layer is None else lp.reads[layer] for layer in by_point]
        hooks = [
            root.register_hook(_injection(entries))
            for root, entries in zip(roots, by_point.values(), strict=True)
        ]
        points = [(lp.embed, src.embed), *zip(lp.writes, src.writes, strict=True)]
        for tensor, table in points:
            hooks.append(tensor.register_hook(_contraction(table, need, out)))
        nothing = torch.zeros((), dtype=lp.embed.dtype).expand(lp.embed.shape)
        try:  # the leaves' own gradients (summed over the batch) are not needed
            torch.autograd.grad(
                roots, lp.leaves, [nothing] * len(roots), retain_graph=True, allow_unused=True
            )
        finally:
            for hook in hooks:
                hook.remove()
        self.n_backward += 1
        return out


def _injection(entries: list[tuple[int, Target]]):
    rows = torch.tensor([b for b, _ in entries])
    positions = torch.tensor([target.pos for _, target in entries])
    vectors = torch.stack([target.vector for _, target in entries])

    def inject(grad: torch.Tensor) -> torch.Tensor:
        # never in place: autograd may hand the same buffer elsewhere
        return grad.index_put((rows, positions), vectors.to(grad.dtype), accumulate=True)

    return inject


def _contraction(table: WriteSources, n_pos: int, out: torch.Tensor):
    """The hook contracting a write point's gradient (batch, positions, d_model) with its sources
    at the first `n_pos` positions (the rest get none of the rows' gradient), added into `out`."""

    def contract(grad: torch.Tensor) -> torch.Tensor:
        n = out.shape[0]
        for run in table.runs:
            if run.start >= n_pos:
                break
            length = min(run.vectors.shape[0], n_pos - run.start)
            m = run.offsets[length]
            if m == 0:
                continue
            at = grad[:n, run.start : run.start + length].to(out.dtype).permute(1, 2, 0)
            products = torch.bmm(run.vectors[:length], at)  # (length, slots, n)
            values = products.view(-1, n).index_select(0, run.flat[:m])  # (m, n)
            out.index_add_(1, run.columns[:m], values.T)
        # what flows on is summed into the write point's leaf, which nobody reads: zeros of no
        # memory let the gradient's buffer go now, and make that sum read nothing
        return torch.zeros((), dtype=grad.dtype).expand(grad.shape)

    return contract
