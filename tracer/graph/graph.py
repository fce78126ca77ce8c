"""The attribution graph: tensors + self-describing metadata, saved as safetensors (never pickle).

Node order: `[selected features | errors (layer-major) | tokens | logits]`; `adjacency_matrix[t, s]`
is the direct effect of source s on target t. Field names follow the reference tool's.
The file stores the adjacency dense or sparse, whichever is smaller (tracer/graph/storage.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tracer.atomic import atomic_path
from tracer.graph import pruning
from tracer.graph import storage as graph_storage
from tracer.graph.storage import FORMAT

TENSOR_FIELDS = (
    "adjacency_matrix",
    "active_features",
    "activation_values",
    "selected_features",
    "input_tokens",
)
_OTHER_TENSOR_FIELDS = tuple(n for n in TENSOR_FIELDS if n != "adjacency_matrix")


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tracer")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class LogitTarget:
    """A logit node: a weighted sum of token logits (one token with weight 1 for plain targets)."""

    label: str
    token_ids: tuple[int, ...]
    weights: tuple[float, ...]
    probability: float

    @classmethod
    def token(cls, token_id: int, probability: float, label: str | None = None) -> LogitTarget:
        return cls(label or str(token_id), (token_id,), (1.0,), probability)

    def __post_init__(self) -> None:
        if not self.token_ids or len(self.token_ids) != len(self.weights):
            raise ValueError("a logit target needs as many weights as token ids, at least one")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"logit target probability must be in [0, 1], got {self.probability}")


@dataclass
class Graph:
    adjacency_matrix: torch.Tensor  # (N, N) float32
    active_features: torch.Tensor  # (n_active, 3) long: layer, pos, feature
    activation_values: torch.Tensor  # (n_active,)
    selected_features: torch.Tensor  # (n_selected,) indices into active_features, ascending
    logit_targets: list[LogitTarget]
    input_tokens: torch.Tensor  # (n_pos,)
    input_string: str | None
    n_layers: int
    metadata: dict = field(default_factory=dict)

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return self.input_tokens.shape[0]

    @property
    def layout(self) -> pruning.NodeLayout:
        return pruning.NodeLayout(
            n_features=self.selected_features.shape[0],
            n_errors=self.n_layers * self.n_pos,
            n_tokens=self.n_pos,
            n_logits=len(self.logit_targets),
        )

    @property
    def logit_tokens(self) -> torch.Tensor:
        return torch.tensor([t.token_ids[0] for t in self.logit_targets], dtype=torch.long)

    @property
    def logit_probabilities(self) -> torch.Tensor:
        return torch.tensor([t.probability for t in self.logit_targets], dtype=torch.float32)

    def logit_weights(self) -> torch.Tensor:
        """(N,) logit probabilities on the logit nodes, zero elsewhere."""
        weights = torch.zeros(self.layout.n_nodes)
        weights[self.layout.logit_slice] = self.logit_probabilities
        return weights

    # ---- analysis --------------------------------------------------------------------------------
    def n_edges(self) -> int:
        """Non-zero entries of the adjacency, counted a block of rows at a time."""
        step = max(1, (1 << 22) // max(1, self.adjacency_matrix.shape[1]))
        return sum(int(torch.count_nonzero(rows)) for rows in self.adjacency_matrix.split(step))

    def node_influence(self) -> torch.Tensor:
        return pruning.node_influence(self.adjacency_matrix, self.logit_weights())

    def prune(
        self, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> pruning.PruneResult:
        return pruning.prune(
            self.adjacency_matrix, self.layout, self.logit_weights(), node_threshold, edge_threshold
        )

    def scores(self, result: pruning.PruneResult | None = None) -> pruning.GraphScores:
        """Replacement and completeness scores, of the full graph or of a pruned subgraph."""
        masks = (
            {} if result is None else {"node_mask": result.node_mask, "edge_mask": result.edge_mask}
        )
        return pruning.graph_scores(
            self.adjacency_matrix, self.layout, self.logit_weights(), **masks
        )

    def subgraph_scores(self, pinned: torch.Tensor | list[int]) -> pruning.GraphScores:
        """Scores of the subgraph of `pinned` node indices (tokens and logits always kept), every
        edge between kept nodes kept, and everything else merged into error."""
        layout = self.layout
        node_mask = torch.zeros(layout.n_nodes, dtype=torch.bool)
        pinned = torch.as_tensor(pinned, dtype=torch.long)
        if pinned.numel() and not (0 <= int(pinned.min()) and int(pinned.max()) < layout.n_nodes):
            raise ValueError(f"pinned node indices must be in [0, {layout.n_nodes})")
        node_mask[pinned] = True
        node_mask[layout.token_slice] = True
        node_mask[layout.logit_slice] = True
        # every edge between kept nodes stays: the node mask alone says so, with no (N, N) mask
        return pruning.graph_scores(
            self.adjacency_matrix, layout, self.logit_weights(), node_mask=node_mask
        )

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a .safetensors file atomically (temporary name, then rename) and return its path.

        The adjacency goes in dense or as a bitmap plus non-zero values, whichever is smaller;
        `graph_storage.describe(path)` reports which, and the sizes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        adjacency_tensors, storage = graph_storage.encode_adjacency(self.adjacency_matrix)
        header = {
            "format": FORMAT,
            "library_version": library_version(),
            "n_layers": self.n_layers,
            "input_string": self.input_string,
            "logit_targets": [t.__dict__ for t in self.logit_targets],
            "metadata": self.metadata,
            "adjacency": storage,
        }
        tensors = {name: getattr(self, name).contiguous() for name in _OTHER_TENSOR_FIELDS}
        with atomic_path(path) as tmp:
            save_file(
                tensors | adjacency_tensors, str(tmp), metadata={"tracer": json.dumps(header)}
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"graph file {path} does not exist")
        header = graph_storage.read_header(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"graph file {path} is corrupt or truncated: {err}") from err
        try:
            graph = cls._from_file_parts(header, tensors)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            reason = f"missing {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"graph file {path} is not a valid tracer graph: {reason}") from err
        return graph

    @classmethod
    def _from_file_parts(cls, header: dict, tensors: dict[str, torch.Tensor]) -> Graph:
        """Build a graph from a read header and the file's tensors, checking their shapes."""
        missing = [n for n in _OTHER_TENSOR_FIELDS if n not in tensors]
        if missing:
            raise ValueError(f"it lacks tensors {missing}")
        n_layers, metadata = header["n_layers"], header["metadata"]
        if not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers must be a non-negative int, got {n_layers!r}")
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}")
        graph = cls(
            adjacency_matrix=torch.empty(0, 0),  # decoded below, once the node count is known
            **{n: tensors[n] for n in _OTHER_TENSOR_FIELDS},
            logit_targets=[
                LogitTarget(
                    label=t["label"],
                    token_ids=tuple(t["token_ids"]),
                    weights=tuple(t["weights"]),
                    probability=t["probability"],
                )
                for t in header["logit_targets"]
            ],
            input_string=header["input_string"],
            n_layers=n_layers,
            metadata=metadata,
        )
        # The other parts fix N, so a bad header cannot make the decoder allocate a huge matrix.
        graph.adjacency_matrix = graph_storage.decode_adjacency(
            header, tensors, graph.layout.n_nodes
        )
        graph._check_shapes()
        return graph

    def _check_shapes(self) -> None:
        n_active = self.active_features.shape[0]
        if self.active_features.shape != (n_active, 3):
            raise ValueError(f"active_features is {tuple(self.active_features.shape)}, not (n, 3)")
        if self.activation_values.shape != (n_active,):
            raise ValueError(
                f"activation_values is {tuple(self.activation_values.shape)}, not ({n_active},)"
            )
        selected = self.selected_features
        if selected.ndim != 1 or bool(((selected < 0) | (selected >= n_active)).any()):
            raise ValueError(f"selected_features must index the {n_active} active features")
        if self.input_tokens.ndim != 1:
            raise ValueError(f"input_tokens is {tuple(self.input_tokens.shape)}, not (n_pos,)")
        n = self.layout.n_nodes
        if tuple(self.adjacency_matrix.shape) != (n, n):
            raise ValueError(
                f"adjacency is {tuple(self.adjacency_matrix.shape)}, its node counts say ({n}, {n})"
            )
