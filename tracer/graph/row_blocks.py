"""Row blocks of |A| restricted to kept nodes and edges, read without copying the adjacency.

The (N, N) adjacency is the largest object in memory (1.6 GB in float32 at N = 20,000), so the
normalised graph built from it is never stored: its row sums and vector-matrix products are
evaluated here one block of rows at a time, in a (rows, N) buffer of about `BLOCK_ELEMENTS`
elements (4 MB in float32; 64 MB on an accelerator) that every block reuses. The adjacency
itself is only read.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per row block: on the CPU small enough to stay in cache; on an accelerator, where
# every block costs kernel launches and a few synchronisations, large enough to keep it busy.
BLOCK_ELEMENTS = 1 << 20
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24


class RowBlocks:
    """|A| with the rows and columns of dropped nodes and the dropped edges zeroed, by row block.

    `adjacency` (N, N), `node_mask` (N,) bool, `edge_mask` (N, N) bool [target, source]; a
    missing mask keeps everything. Blocks returned by `read` share one buffer: each is valid
    until the next call.
    """

    def __init__(
        self, adjacency: Tensor, node_mask: Tensor | None = None, edge_mask: Tensor | None = None
    ) -> None:
        self.adjacency = adjacency
        n = adjacency.shape[0]
        elements = BLOCK_ELEMENTS if adjacency.device.type == "cpu" else ACCELERATOR_BLOCK_ELEMENTS
        rows = max(1, min(n, elements // max(n, 1)))
        self.parts = [slice(start, min(start + rows, n)) for start in range(0, n, rows)]
        # at least float32: an adjacency stored in float16/bfloat16 is summed in float32
        self.dtype = torch.promote_types(adjacency.dtype, torch.float32)
        self._buffer = torch.empty((rows, n), dtype=self.dtype, device=adjacency.device)
        # Masks are applied as 0/1 factors in the blocks' dtype: a float product with a bool or
        # uint8 operand casts element by element, twice as slow as a copy then the product.
        self._nodes = None if node_mask is None else node_mask.to(self.dtype)
        self._edges = edge_mask
        self._edge_factors = None if edge_mask is None else torch.empty_like(self._buffer)

    def read_unmasked(self, part: slice) -> Tensor:
        """|A[part]|, (rows, N), in the shared buffer."""
        block = self._buffer[: part.stop - part.start]
        if self.adjacency.dtype != self.dtype:
            return block.copy_(self.adjacency[part]).abs_()
        return torch.abs(self.adjacency[part], out=block)

    def mask_(self, part: slice, block: Tensor) -> Tensor:
        """Zero the dropped edges and nodes of the rows `part` of an (rows, N) block, in place."""
        self._mask_edges_(part, block)
        if self._nodes is not None:
            block.mul_(self._nodes[part, None]).mul_(self._nodes[None, :])
        return block

    def read(self, part: slice) -> Tensor:
        """|A[part]| restricted to the kept nodes and edges, (rows, N), in the shared buffer."""
        return self.mask_(part, self.read_unmasked(part))

    def divisors(self) -> Tensor:
        """(N,) row sums, with 1 for all-zero rows: dividing by them normalises the rows."""
        sums = torch.cat([self.read(part).sum(dim=1) for part in self.parts])
        return sums.masked_fill_(sums == 0, 1)

    def vecmat(self, vector: Tensor) -> Tensor:
        """`vector @ blocks`: (N,) -> (N,). Reads only the blocks where the vector is non-zero."""
        if self._nodes is not None:  # dropped rows: zero weight; dropped columns: zero output
            vector = vector * self._nodes
        out = torch.zeros_like(vector)
        rows = self.parts[0].stop if self.parts else 1
        for index in torch.unique(vector.nonzero().flatten() // rows).tolist():
            part = self.parts[index]
            block = self._mask_edges_(part, self.read_unmasked(part))
            out.addmv_(block.T, vector[part])
        return out if self._nodes is None else out.mul_(self._nodes)

    def _mask_edges_(self, part: slice, block: Tensor) -> Tensor:
        if self._edges is not None:
            block.mul_(self._edge_factors[: len(block)].copy_(self._edges[part]))
        return block
