"""Tests for tracer/graph/storage.py: how a graph file stores its adjacency (dense, or a zlib'd
bitmap plus the non-zero values), read back bit-exact, with bad files refused by name.

Expectations are computed outside the code under test: bit patterns are compared as integers,
non-zero counts come from `(a != 0)` plus the -0.0 entries, sizes from `os.path.getsize` and the
byte counts of what must be stored, and the old format is written here by hand.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_graph import node_positions_and_layers, saved_header, write_with_header

from tracer.graph import storage as graph_storage
from tracer.graph.graph import TENSOR_FIELDS, Graph, LogitTarget
from tracer.graph.storage import BITMAP, DENSE, TENSOR_NAMES, describe

INT_VIEWS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
# A quiet NaN with a payload bit, per type.
NAN_WITH_PAYLOAD = {
    torch.float16: 0x7E01,
    torch.bfloat16: 0x7FC1,
    torch.float32: 0x7FC00001,
    torch.float64: 0x7FF8000000000001,
}


def bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEWS[tensor.dtype])


def assert_bit_exact(copy: torch.Tensor, original: torch.Tensor) -> None:
    assert copy.dtype == original.dtype
    assert copy.shape == original.shape
    assert torch.equal(bit_patterns(copy), bit_patterns(original))


def stored_entries(adjacency: torch.Tensor) -> int:
    """Entries a file must keep: the non-zero ones and the -0.0 ones (0 == -0.0, bits differ)."""
    negative_zero = (adjacency == 0) & torch.signbit(adjacency)
    return int((adjacency != 0).sum() + negative_zero.sum())


def graph_of(
    adjacency: torch.Tensor, n_layers: int = 2, n_pos: int = 5, n_logits: int = 3
) -> Graph:
    """A graph around `adjacency`, with as many features as its size leaves room for."""
    n_features = adjacency.shape[0] - n_layers * n_pos - n_pos - n_logits
    index = torch.arange(n_features)
    # Spread over (layer, pos >= 1) in ascending order, as attribution orders its features.
    slot = index * (n_layers * (n_pos - 1)) // max(n_features, 1)
    return Graph(
        adjacency_matrix=adjacency,
        active_features=torch.stack([slot // (n_pos - 1), 1 + slot % (n_pos - 1), index], dim=1),
        activation_values=torch.ones(n_features),
        selected_features=index,
        logit_targets=[LogitTarget.token(t, 1 / n_logits) for t in range(n_logits)],
        input_tokens=torch.arange(n_pos),
        input_string=None,
        n_layers=n_layers,
    )


def random_sparse(
    n: int, n_stored: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """(n, n) with exactly `n_stored` non-zero entries at random places."""
    generator = torch.Generator().manual_seed(seed)
    adjacency = torch.zeros(n * n, dtype=dtype)
    where = torch.randperm(n * n, generator=generator)[:n_stored]
    values = torch.randn(n_stored, generator=generator, dtype=dtype)
    adjacency[where] = torch.where(values == 0, 1.0, values)
    return adjacency.view(n, n)


def with_special_values(adjacency: torch.Tensor) -> torch.Tensor:
    """A copy holding -0.0, a NaN with a payload, +-inf and the smallest subnormal."""
    finfo = torch.finfo(adjacency.dtype)
    nan_bits = NAN_WITH_PAYLOAD[adjacency.dtype]
    payload_nan = torch.tensor(nan_bits, dtype=INT_VIEWS[adjacency.dtype]).view(adjacency.dtype)
    specials = torch.stack(
        [
            torch.tensor(-0.0, dtype=adjacency.dtype),
            payload_nan,
            torch.tensor(math.inf, dtype=adjacency.dtype),
            torch.tensor(-math.inf, dtype=adjacency.dtype),
            torch.tensor(finfo.smallest_normal * finfo.eps, dtype=adjacency.dtype),
        ]
    )
    copy = adjacency.clone()
    copy.view(-1)[-len(specials) :] = specials  # the last entries, so the last block has them
    return copy


def round_trip(graph: Graph, path: Path) -> Graph:
    """Save and load; the adjacency (maybe with NaNs) is left to the caller to compare."""
    loaded = Graph.load(graph.save(path))
    for name in TENSOR_FIELDS:
        if name != "adjacency_matrix":
            assert torch.equal(getattr(loaded, name), getattr(graph, name)), name
    return loaded


def encoding_of(path: Path) -> str:
    return saved_header(path)["adjacency"]["encoding"]


# ---------------------------------------------------------------------------- round trip

N = 45  # 45 * 45 entries: the last bitmap byte has 7 bits of padding
BITMAP_BYTES = math.ceil(N * N / 8)
MATRICES: dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    "random 20%": lambda dtype: random_sparse(N, N * N // 5, dtype),
    "all zero": lambda dtype: torch.zeros(N, N, dtype=dtype),
    "fully dense": lambda dtype: random_sparse(N, N * N, dtype),
    "special values in a sparse matrix": lambda dtype: with_special_values(
        random_sparse(N, N * N // 5, dtype)
    ),
    "special values in a dense matrix": lambda dtype: with_special_values(
        random_sparse(N, N * N, dtype)
    ),
}
EXPECTED_ENCODING = {
    "random 20%": BITMAP,
    "all zero": BITMAP,
    "fully dense": DENSE,
    "special values in a sparse matrix": BITMAP,
    "special values in a dense matrix": DENSE,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(MATRICES))
def test_round_trip_is_bit_exact(kind: str, dtype: torch.dtype, tmp_path: Path) -> None:
    adjacency = MATRICES[kind](dtype)
    path = tmp_path / "g.safetensors"
    loaded = round_trip(graph_of(adjacency), path)
    assert_bit_exact(loaded.adjacency_matrix, adjacency)
    header = saved_header(path)["adjacency"]
    assert header["encoding"] == EXPECTED_ENCODING[kind]
    assert header["nonzero"] == stored_entries(adjacency)
    assert header["dtype"] == str(dtype).removeprefix("torch.")
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
    assert names == set(TENSOR_FIELDS) - {"adjacency_matrix"} | set(
        TENSOR_NAMES[header["encoding"]]
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_matrices_round_trip(dtype: torch.dtype, tmp_path: Path) -> None:
    adjacency = with_special_values(random_sparse(N, N * N // 5, dtype))
    path = tmp_path / "g.safetensors"
    loaded = round_trip(graph_of(adjacency), path)
    assert_bit_exact(loaded.adjacency_matrix, adjacency)
    assert encoding_of(path) == BITMAP


def test_graph_without_features_round_trips(tmp_path: Path) -> None:
    n = 2 * 3 + 3 + 1  # errors, tokens, one logit
    adjacency = random_sparse(n, n * n // 5)
    graph = graph_of(adjacency, n_layers=2, n_pos=3, n_logits=1)
    assert graph.layout.n_features == 0
    loaded = round_trip(graph, tmp_path / "g.safetensors")
    assert_bit_exact(loaded.adjacency_matrix, adjacency)


@pytest.mark.parametrize("small_on", ["save", "load", "both"])
def test_blocks_and_pieces_of_any_size_round_trip(
    small_on: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file does not depend on the block size: tiny blocks (3 bitmap bytes, 24 entries) and
    tiny zlib input pieces, on either side, read back the same matrix."""
    adjacency = with_special_values(random_sparse(N, N * N // 3))
    graph = graph_of(adjacency)
    with monkeypatch.context() as patch:
        if small_on in ("save", "both"):
            patch.setattr(graph_storage, "BLOCK_BYTES", 3)
        graph.save(tmp_path / "g.safetensors")
    assert BITMAP_BYTES > 10 * 3  # many blocks
    if small_on in ("load", "both"):
        monkeypatch.setattr(graph_storage, "BLOCK_BYTES", 3)
        monkeypatch.setattr(graph_storage, "_INPUT_PIECE", 5)
    loaded = Graph.load(tmp_path / "g.safetensors")
    assert_bit_exact(loaded.adjacency_matrix, adjacency)
    assert encoding_of(tmp_path / "g.safetensors") == BITMAP


def test_encoding_is_sparse_exactly_while_it_is_smaller_with_a_raw_bitmap(tmp_path: Path) -> None:
    """Sparse while values plus an uncompressed bitmap take fewer bytes than the dense matrix."""
    itemsize = 4
    # The most values for which nonzero * itemsize + BITMAP_BYTES < N * N * itemsize.
    most = (N * N * itemsize - BITMAP_BYTES - 1) // itemsize
    for n_stored, expected in [(most, BITMAP), (most + 1, DENSE)]:
        adjacency = random_sparse(N, n_stored)
        path = tmp_path / f"{n_stored}.safetensors"
        assert_bit_exact(round_trip(graph_of(adjacency), path).adjacency_matrix, adjacency)
        assert encoding_of(path) == expected


# ---------------------------------------------------------------------------- sizes


def file_overhead(graph: Graph, tmp_path: Path) -> int:
    """Bytes of a file besides its adjacency: the same graph with an all-zero matrix, less its
    (tiny) compressed bitmap."""
    empty = graph_of(torch.zeros_like(graph.adjacency_matrix), graph.n_layers, graph.n_pos)
    path = empty.save(tmp_path / "empty.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        bitmap = handle.get_tensor("adjacency_bitmap").numel()
    return os.path.getsize(path) - bitmap


def test_a_20_percent_dense_file_is_at_most_a_quarter_of_dense(tmp_path: Path) -> None:
    """Random places are the worst case for the bitmap; with N ~ 3000 the file is at most the
    values plus one bit per entry: 0.2 + 1/32 of the dense float32 matrix."""
    n = 3000
    adjacency = random_sparse(n, n * n // 5)
    graph = graph_of(adjacency, n_layers=4, n_pos=32)
    path = graph.save(tmp_path / "g.safetensors")
    dense_bytes = n * n * 4
    bound = file_overhead(graph, tmp_path) + stored_entries(adjacency) * 4 + math.ceil(n * n / 8)
    assert os.path.getsize(path) <= bound
    assert os.path.getsize(path) <= dense_bytes / 4
    assert describe(path)["ratio"] == os.path.getsize(path) / dense_bytes


def structured_adjacency(graph: Graph, seed: int = 0) -> torch.Tensor:
    """(N, N) non-zero exactly where an edge can exist: feature and logit targets, from sources
    at earlier layers and no later positions (tokens count as layer -1, logits as n_layers)."""
    pos, layer = node_positions_and_layers(graph)
    layout = graph.layout
    target = torch.zeros(layout.n_nodes, dtype=torch.bool)
    target[layout.feature_slice] = True
    target[layout.logit_slice] = True
    source = torch.ones(layout.n_nodes, dtype=torch.bool)
    source[layout.logit_slice] = False
    reach = (
        target[:, None]
        & source[None, :]
        & (pos[None, :] <= pos[:, None])
        & (layer[None, :] < layer[:, None])
    )
    values = torch.randn(reach.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(reach & (values != 0), values, 0.0)


def test_a_structured_file_is_smaller_than_its_dense_encoding(tmp_path: Path) -> None:
    n_layers, n_pos, n_logits = 4, 32, 5
    skeleton = graph_of(torch.zeros(3000, 3000), n_layers, n_pos, n_logits)
    adjacency = structured_adjacency(skeleton)
    n = adjacency.shape[0]
    assert 0.15 < stored_entries(adjacency) / n**2 < 0.25  # a realistic density
    graph = graph_of(adjacency, n_layers, n_pos, n_logits)
    path = graph.save(tmp_path / "g.safetensors")
    old = write_old_format(graph, tmp_path / "dense.safetensors")  # the dense layout of format 1
    assert os.path.getsize(path) < os.path.getsize(old)
    with safe_open(str(path), framework="pt") as handle:
        bitmap = handle.get_tensor("adjacency_bitmap").numel()
    assert bitmap < math.ceil(n * n / 8) / 10  # the structure compresses
    assert_bit_exact(Graph.load(path).adjacency_matrix, adjacency)


# ---------------------------------------------------------------------------- describe


@pytest.mark.parametrize("kind", ["random 20%", "fully dense", "special values in a sparse matrix"])
def test_describe_reports_the_file(kind: str, tmp_path: Path) -> None:
    adjacency = MATRICES[kind](torch.float64)
    path = graph_of(adjacency).save(tmp_path / "g.safetensors")
    dense_bytes = N * N * 8
    assert describe(path) == {
        "format": "tracer.graph/2",
        "encoding": EXPECTED_ENCODING[kind],
        "n_nodes": N,
        "dtype": "float64",
        "nonzero": stored_entries(adjacency),
        "file_bytes": os.path.getsize(path),
        "dense_bytes": dense_bytes,
        "ratio": os.path.getsize(path) / dense_bytes,
    }


def test_describe_reads_only_the_header(tmp_path: Path) -> None:
    """A file whose bitmap does not decode is still described; loading it fails."""
    saved = graph_of(random_sparse(N, N * N // 5)).save(tmp_path / "g.safetensors")
    broken = write_with_header(
        saved,
        tmp_path / "broken.safetensors",
        json.dumps(saved_header(saved)),
        adjacency_bitmap=torch.frombuffer(bytearray(b"not a zlib stream"), dtype=torch.uint8),
    )
    assert describe(broken)["nonzero"] == describe(saved)["nonzero"]
    with pytest.raises(ValueError, match="zlib"):
        Graph.load(broken)


def test_describe_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match=str(path)):
        describe(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        describe(tmp_path / "absent")


# ---------------------------------------------------------------------------- format 1


def write_old_format(graph: Graph, path: Path) -> Path:
    """A graph file as `tracer.graph/1` wrote it: the dense matrix, no adjacency entry."""
    header = {
        "format": "tracer.graph/1",
        "library_version": "0.1.0",
        "n_layers": graph.n_layers,
        "input_string": graph.input_string,
        "logit_targets": [t.__dict__ for t in graph.logit_targets],
        "metadata": graph.metadata,
    }
    tensors = {name: getattr(graph, name).contiguous() for name in TENSOR_FIELDS}
    save_file(tensors, str(path), metadata={"tracer": json.dumps(header)})
    return path


def test_old_format_files_load(plt_graph: Graph, tmp_path: Path) -> None:
    path = write_old_format(plt_graph, tmp_path / "old.safetensors")
    loaded = Graph.load(path)
    assert_bit_exact(loaded.adjacency_matrix, plt_graph.adjacency_matrix)
    for name in TENSOR_FIELDS:
        assert getattr(loaded, name).dtype == getattr(plt_graph, name).dtype, name
        assert torch.equal(getattr(loaded, name), getattr(plt_graph, name)), name
    assert loaded.logit_targets == plt_graph.logit_targets
    assert loaded.metadata == plt_graph.metadata
    n = plt_graph.layout.n_nodes
    assert describe(path) == {
        "format": "tracer.graph/1",
        "encoding": DENSE,
        "n_nodes": n,
        "dtype": "float32",
        "nonzero": None,  # format 1 headers do not count
        "file_bytes": os.path.getsize(path),
        "dense_bytes": n * n * 4,
        "ratio": os.path.getsize(path) / (n * n * 4),
    }


# ---------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def sparse_saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sparse") / "g.safetensors"
    graph_of(random_sparse(N, N * N // 5)).save(path)
    assert encoding_of(path) == BITMAP
    return path


@pytest.fixture(scope="module")
def dense_saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "g.safetensors"
    graph_of(random_sparse(N, N * N)).save(path)
    assert encoding_of(path) == DENSE
    return path


def tensor_of(saved: Path, name: str) -> torch.Tensor:
    with safe_open(str(saved), framework="pt") as handle:
        return handle.get_tensor(name)


def raw_bitmap(saved: Path) -> np.ndarray:
    """The decompressed bitmap of a sparse file, (BITMAP_BYTES,) uint8, writable."""
    stream = tensor_of(saved, "adjacency_bitmap").numpy().tobytes()
    return np.frombuffer(zlib.decompress(stream), dtype=np.uint8).copy()


def with_stream(saved: Path, path: Path, stream: bytes) -> Path:
    """A copy of `saved` whose bitmap tensor holds `stream`."""
    bitmap = torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else None
    return write_with_header(
        saved,
        path,
        json.dumps(saved_header(saved)),
        adjacency_bitmap=torch.zeros(0, dtype=torch.uint8) if bitmap is None else bitmap,
    )


def with_bitmap(saved: Path, path: Path, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    """A copy of `saved` whose raw bitmap is changed and then compressed again."""
    return with_stream(saved, path, zlib.compress(change(raw_bitmap(saved)).tobytes()))


def flip_first(bit: int) -> Callable[[np.ndarray], np.ndarray]:
    """Flip the first entry whose bit is `bit` (0: an unstored entry becomes marked)."""

    def change(raw: np.ndarray) -> np.ndarray:
        entries = np.unpackbits(raw, count=N * N)
        entries[np.flatnonzero(entries == bit)[0]] ^= 1
        return np.packbits(entries)

    return change


def with_entry(saved: Path, path: Path, **changes) -> Path:
    header = saved_header(saved)
    return write_with_header(
        saved, path, json.dumps(header | {"adjacency": header["adjacency"] | changes})
    )


def with_tensors(saved: Path, path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    return write_with_header(saved, path, json.dumps(saved_header(saved)), drop, **changes)


def compressed_bitmap(saved: Path) -> bytes:
    return tensor_of(saved, "adjacency_bitmap").numpy().tobytes()


# name: (which saved file, how to spoil it, words the error must hold)
BAD_FILES: dict[str, tuple[str, Callable[[Path, Path], Path], str]] = {
    "bitmap a byte short": (
        "sparse",
        lambda s, p: with_bitmap(s, p, lambda raw: raw[:-1]),
        f"holds {BITMAP_BYTES - 1} bytes, {BITMAP_BYTES} expected",
    ),
    "bitmap a byte long": (
        "sparse",
        lambda s, p: with_bitmap(s, p, lambda raw: np.append(raw, np.uint8(0))),
        f"more than the {BITMAP_BYTES} bytes",
    ),
    "bitmap marks an entry without a value": (
        "sparse",
        lambda s, p: with_bitmap(s, p, flip_first(0)),
        "marks more than the",
    ),
    "bitmap misses an entry that has a value": (
        "sparse",
        lambda s, p: with_bitmap(s, p, flip_first(1)),
        "values are stored",
    ),
    "bitmap sets a padding bit": (
        "sparse",
        lambda s, p: with_bitmap(s, p, lambda raw: np.append(raw[:-1], raw[-1] | 1)),
        "padding",
    ),
    "bitmap not a zlib stream": (
        "sparse",
        lambda s, p: with_stream(s, p, b"not a zlib stream"),
        "not a valid zlib stream",
    ),
    "bitmap stream cut short": (
        "sparse",
        lambda s, p: with_stream(s, p, compressed_bitmap(s)[:-4]),
        "truncated",
    ),
    "bitmap stream cut in half": (
        "sparse",
        lambda s, p: with_stream(s, p, compressed_bitmap(s)[: len(compressed_bitmap(s)) // 2]),
        "bitmap",
    ),
    "bytes after the bitmap stream": (
        "sparse",
        lambda s, p: with_stream(s, p, compressed_bitmap(s) + b"junk"),
        "after the end",
    ),
    "empty bitmap": ("sparse", lambda s, p: with_stream(s, p, b""), "truncated"),
    "bitmap not bytes": (
        "sparse",
        lambda s, p: with_tensors(s, p, adjacency_bitmap=tensor_of(s, "adjacency_bitmap").int()),
        "not (n,) uint8",
    ),
    "a value missing": (
        "sparse",
        lambda s, p: with_tensors(s, p, adjacency_values=tensor_of(s, "adjacency_values")[:-1]),
        "adjacency_values is",
    ),
    "values of another dtype": (
        "sparse",
        lambda s, p: with_tensors(s, p, adjacency_values=tensor_of(s, "adjacency_values").double()),
        "float64",
    ),
    "no values": (
        "sparse",
        lambda s, p: with_tensors(s, p, drop=("adjacency_values",)),
        "lacks tensors ['adjacency_values']",
    ),
    "no bitmap": (
        "sparse",
        lambda s, p: with_tensors(s, p, drop=("adjacency_bitmap",)),
        "lacks tensors ['adjacency_bitmap']",
    ),
    "unknown encoding": ("sparse", lambda s, p: with_entry(s, p, encoding="rle"), "'rle'"),
    "unknown dtype": ("sparse", lambda s, p: with_entry(s, p, dtype="int8"), "'int8'"),
    "count not a number": ("sparse", lambda s, p: with_entry(s, p, nonzero="many"), "'many'"),
    "count negative": ("sparse", lambda s, p: with_entry(s, p, nonzero=-1), "nonzero=-1"),
    "count above N * N": (
        "sparse",
        lambda s, p: with_entry(s, p, nonzero=N * N + 1),
        f"nonzero={N * N + 1}",
    ),
    "node count not the graph's": (
        "sparse",
        lambda s, p: with_entry(s, p, n_nodes=N + 1),
        f"{N + 1} nodes, its node counts say {N}",
    ),
    "no adjacency entry": (
        "sparse",
        lambda s, p: write_with_header(
            s, p, json.dumps({k: v for k, v in saved_header(s).items() if k != "adjacency"})
        ),
        "adjacency entry must be a JSON object",
    ),
    "entry lacking the count": (
        "sparse",
        lambda s, p: write_with_header(
            s,
            p,
            json.dumps(
                saved_header(s)
                | {"adjacency": {"encoding": BITMAP, "n_nodes": N, "dtype": "float32"}}
            ),
        ),
        "lacks ['nonzero']",
    ),
    "dense count off by one": (
        "dense",
        lambda s, p: with_entry(s, p, nonzero=N * N - 1),
        f"its header says {N * N - 1}",
    ),
    "dense matrix of another dtype": (
        "dense",
        lambda s, p: with_tensors(s, p, adjacency_matrix=tensor_of(s, "adjacency_matrix").double()),
        "torch.float64, its header says",
    ),
    "dense without its matrix": (
        "dense",
        lambda s, p: with_tensors(s, p, drop=("adjacency_matrix",)),
        "lacks tensors ['adjacency_matrix']",
    ),
    "old format without its matrix": (
        "dense",
        lambda s, p: write_with_header(
            s,
            p,
            json.dumps(saved_header(s) | {"format": "tracer.graph/1"}),
            drop=("adjacency_matrix",),
        ),
        "lacks the tensor 'adjacency_matrix'",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_adjacency_raises_a_clear_error(
    kind: str, sparse_saved: Path, dense_saved: Path, tmp_path: Path
) -> None:
    which, spoil, words = BAD_FILES[kind]
    path = spoil(sparse_saved if which == "sparse" else dense_saved, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as caught:
        Graph.load(path)
    assert str(path) in str(caught.value)
    assert words in str(caught.value)
