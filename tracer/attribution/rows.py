"""Adjacency rows by back-propagation: the sources a row is contracted with, and the computer.

One linear forward of the prompt (`ReplacementModel.linear_forward`) is kept and back-propagated
once per batch of targets: each target's read vector is injected as the gradient at its read
point, and the gradient reaching every write point is contracted with the vectors the sources
write there (features: activation-scaled decoder rows; errors; token embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.model.replacement import LinearPass, PromptState, ReplacementModel

ELEMENT_BUDGET = 1 << 22  # elements per temporary (batch, chunk, d_model) gather in contractions


@dataclass
class Sources:
    """Every source of the full (unpruned) graph; feature order is (layer, pos, feature)."""

    features: torch.Tensor  # (n_active, 3) long: layer, pos, feature
    activations: torch.Tensor  # (n_active,)
    errors: torch.Tensor  # (n_layers, n_pos, d_model)
    tokens: torch.Tensor  # (n_pos, d_model): token embeddings, added where layer 0's input forms
    encoders: torch.Tensor  # (n_active, d_model): each feature's encoder row (its read vector)
    # per write layer: (indices into features, positions, activation-scaled decoder rows (n, d_model))
    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def n_active(self) -> int:
        return self.features.shape[0]

    @property
    def n_columns(self) -> int:
        return self.n_active + self.errors.shape[0] * self.errors.shape[1] + self.tokens.shape[0]


@dataclass
class Target:
    """Where a row's gradient is injected: `layer` None means the final hidden state (a logit)."""

    layer: int | None
    pos: int
    vector: torch.Tensor  # (d_model,)


class RowComputer:
    """Adjacency rows by back-propagation through one retained linear forward."""

    def __init__(self, model: ReplacementModel, state: PromptState, sources: Sources, batch: int):
        self.model, self.sources, self.batch = model, sources, batch
        self.n_pos = state.n_pos
        # only the graph of the pass is kept, not its values: what stays is the batch's gradients
        self.linear: LinearPass = model.linear_forward(state, batch, keep_values=False)
        self.n_backward = 0

    def rows(self, targets: list[Target], out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (len(targets), n_columns) for at most `batch` targets, added into `out`.

        One backward pass. Each target's read vector is injected as the gradient at its read
        point when the backward reaches it, and each write point's gradient is contracted with
        its sources as soon as it is computed, so at any time only the batch's in-flight
        gradient buffers exist (never one per layer).
        """
        assert 0 < len(targets) <= self.batch
        lp, n = self.linear, len(targets)
        if out is None:
            out = torch.zeros(n, self.sources.n_columns, dtype=self.sources.tokens.dtype)
        by_point: dict[int | None, list[tuple[int, Target]]] = {}
        for b, target in enumerate(targets):
            by_point.setdefault(target.layer, []).append((b, target))
        roots = [lp.final_hidden if layer is None else lp.reads[layer] for layer in by_point]
        hooks = [
            root.register_hook(self._injection(entries))
            for root, entries in zip(roots, by_point.values(), strict=True)
        ]
        hooks.append(lp.embed.register_hook(lambda grad: self._contract_tokens(grad, out)))
        for layer, write in enumerate(lp.writes):
            hooks.append(write.register_hook(self._write_contraction(layer, out)))
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

    def _injection(self, entries: list[tuple[int, Target]]):
        def inject(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()  # never in place: autograd may hand the same buffer elsewhere
            for b, target in entries:
                grad[b, target.pos] += target.vector.to(grad.dtype)
            return grad

        return inject

    def _contract_tokens(self, grad: torch.Tensor, out: torch.Tensor) -> None:
        n, tokens = out.shape[0], self.sources.tokens
        token_cols = out[:, self.sources.n_columns - self.n_pos :]
        token_cols += torch.einsum("bpd,pd->bp", grad[:n].to(out.dtype), tokens)

    def _write_contraction(self, layer: int, out: torch.Tensor):
        def contract(grad: torch.Tensor) -> None:
            src, n = self.sources, out.shape[0]
            grad = grad[:n].to(out.dtype)  # (n, n_pos, d_model)
            errors = out[:, src.n_active + layer * self.n_pos :][:, : self.n_pos]
            errors += torch.einsum("bpd,pd->bp", grad, src.errors[layer])
            index, pos, vectors = src.writes[layer]
            chunk = max(1, ELEMENT_BUDGET // max(1, n * grad.shape[-1]))
            for start in range(0, index.shape[0], chunk):
                sl = slice(start, start + chunk)
                gathered = grad[:, pos[sl]]  # (n, chunk, d_model)
                out[:, index[sl]] += torch.einsum("bkd,kd->bk", gathered, vectors[sl])

        return contract
