"""Per-feature statistics kept while activations stream past, on tensors, in bounded memory.

Everything here sees one layer's activations of one batch at a time, `acts` (n_seq, n_pos, d) with
a `valid` mask (n_seq, n_pos) (padding and start tokens are not data), and keeps per feature only
fixed-size state: counts, the maximum, a histogram, and two running top-k tables of contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic): a keyed hash of
# (token, feature) that does not depend on how the data was batched.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def token_hash(token_ids: torch.Tensor, feature_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random non-negative int64 per (global token index, feature), seeded."""
    offset = (seed * _GOLDEN) % (1 << 64)
    offset -= (1 << 64) if offset >= 1 << 63 else 0  # as a signed int64
    z = token_ids * 1_000_003 + feature_ids + offset
    z = z * _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return z & ((1 << 62) - 1)


@dataclass
class ContextTable:
    """Up to `k` contexts per feature with the largest keys, in no particular slot order
    (`ranked()` sorts them).

    keys (d, k) float64 (-inf where empty); values (d, k) the activation at the context's token;
    example (d, k) global example index (-1 where empty); position (d, k) token index in it;
    tokens (d, k, n_ctx) the example's token ids (-1 past its end); acts (d, k, n_ctx) the feature's
    activation at every token of the example.
    """

    keys: torch.Tensor
    values: torch.Tensor
    example: torch.Tensor
    position: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor

    @classmethod
    def empty(cls, d: int, k: int, n_ctx: int, device: torch.device | str = "cpu") -> ContextTable:
        return cls(
            keys=torch.full((d, k), -torch.inf, dtype=torch.float64, device=device),
            values=torch.zeros(d, k, device=device),
            example=torch.full((d, k), -1, dtype=torch.long, device=device),
            position=torch.zeros(d, k, dtype=torch.long, device=device),
            tokens=torch.full((d, k, n_ctx), -1, dtype=torch.long, device=device),
            acts=torch.zeros(d, k, n_ctx, device=device),
        )

    @property
    def k(self) -> int:
        return self.keys.shape[1]

    def update(
        self,
        feature: torch.Tensor,
        token: torch.Tensor,
        key: torch.Tensor,
        acts: torch.Tensor,
        token_ids: torch.Tensor,
        example_ids: torch.Tensor,
    ) -> None:
        """Merge one batch's candidates: feature (m,), flat token index `seq * n_pos + pos` (m,)
        and key (m,) float64 of each; acts (n_seq, n_pos, d); token_ids (n_seq, n_pos) (-1 for
        padding); example_ids (n_seq,) global example indices.

        Candidates at or below their feature's smallest kept key are dropped first; only the
        slots of evicted (or empty) entries are written.
        """
        n_seq, n_pos, d = acts.shape
        beats = key > self.keys.amin(dim=1)[feature]
        feature, token, key = feature[beats], token[beats], key[beats]
        if feature.numel() == 0:
            return
        # each feature's best k candidates, as a small (r, k) matrix: rows = features touched
        order = key.argsort(descending=True, stable=True)
        order = order[feature[order].argsort(stable=True)]  # by feature, best key first
        feature, token, key = feature[order], token[order], key[order]
        rows, counts = torch.unique_consecutive(feature, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        row = torch.repeat_interleave(torch.arange(len(rows), device=key.device), counts)
        rank = torch.arange(len(feature), device=key.device) - starts[row]
        best = rank < self.k
        batch_keys = torch.full(
            (len(rows), self.k), -torch.inf, dtype=torch.float64, device=key.device
        )
        batch_tokens = torch.zeros((len(rows), self.k), dtype=torch.long, device=key.device)
        batch_keys[row[best], rank[best]] = key[best]
        batch_tokens[row[best], rank[best]] = token[best]
        merged = torch.cat([self.keys[rows], batch_keys], dim=1)  # (r, 2k)
        survivors = torch.zeros_like(merged, dtype=torch.bool)
        survivors.scatter_(1, merged.topk(self.k, dim=1).indices, True)
        survivors &= torch.isfinite(merged)
        # each surviving candidate takes a free slot of its row (an evicted or an empty one):
        # row by row, the i-th candidate gets the i-th free slot
        new = survivors[:, self.k :]
        free = ~survivors[:, : self.k]
        free &= free.long().cumsum(1) <= new.sum(1, keepdim=True)
        r, column = new.nonzero(as_tuple=True)
        slot = free.nonzero(as_tuple=True)[1]
        where = batch_tokens[r, column]
        seq, pos, feature = where // n_pos, where % n_pos, rows[r]
        width = min(n_pos, self.tokens.shape[2])
        self.keys[feature, slot] = batch_keys[r, column]
        self.values[feature, slot] = acts[seq, pos, feature].to(self.values.dtype)
        self.example[feature, slot] = example_ids[seq]
        self.position[feature, slot] = pos
        self.tokens[feature, slot] = -1
        self.tokens[feature, slot, :width] = token_ids[seq, :width]
        self.acts[feature, slot] = 0
        self.acts[feature, slot, :width] = acts[seq, :width, feature].to(self.acts.dtype)

    def ranked(self) -> ContextTable:
        """The same entries, largest key first in every row (empty slots last)."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        n_ctx = self.tokens.shape[2]
        order3 = order[..., None].expand(-1, -1, n_ctx)
        return ContextTable(
            keys=self.keys.gather(1, order),
            values=self.values.gather(1, order),
            example=self.example.gather(1, order),
            position=self.position.gather(1, order),
            tokens=self.tokens.gather(1, order3),
            acts=self.acts.gather(1, order3),
        )


class Histogram:
    """Per-feature histogram of positive activations over [0, 2**e) in `n_bins` equal bins.

    The top 2**e is the smallest power of two above the feature's maximum so far; when a larger
    activation arrives, pairs of bins merge (bins at 2**(e+1) are unions of bins at 2**e), so the
    counts equal binning every activation at once with the final edges.
    """

    def __init__(self, d: int, n_bins: int, device: torch.device | str = "cpu") -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.counts = torch.zeros(d, n_bins, dtype=torch.long, device=device)
        self.exponent = torch.full((d,), -126, dtype=torch.long, device=device)

    @property
    def top(self) -> torch.Tensor:
        """(d,) upper edge of each feature's histogram."""
        return torch.ldexp(torch.ones_like(self.exponent, dtype=torch.float64), self.exponent)

    def update(self, values: torch.Tensor, features: torch.Tensor, peak: torch.Tensor) -> None:
        """Count positive activations `values` (n,) of features `features` (n,); peak (d,) is
        each feature's largest value among them (0 for none)."""
        if values.numel() == 0:
            return
        peak = peak.double()
        _, needed = torch.frexp(peak)  # peak < 2**needed
        grow = (needed.long() - self.exponent).clamp(min=0) * (peak > 0)
        # after log2(n_bins) merges every count is in bin 0, and stays there
        steps = grow.clamp(max=self.n_bins.bit_length() - 1)
        for step in range(int(steps.max())):
            rows = steps > step
            pairs = self.counts[rows].view(-1, self.n_bins // 2, 2).sum(-1)
            self.counts[rows] = torch.cat([pairs, torch.zeros_like(pairs)], dim=1)
        self.exponent += grow
        top = self.top.to(values.device)[features]
        bins = (values.double() / top * self.n_bins).floor().long().clamp(0, self.n_bins - 1)
        flat = self.counts.view(-1)
        flat.index_add_(0, features * self.n_bins + bins, torch.ones_like(bins))
