"""How a graph file stores its (N, N) adjacency: dense, or as a bitmap plus the non-zero values.

Format `tracer.graph/2` records the choice in the header's `"adjacency"` entry:
`{"encoding", "n_nodes", "dtype", "nonzero"}`.

- `"dense"`: the tensor `adjacency_matrix` (N, N), as in `tracer.graph/1`.
- `"bitmap-zlib"`: `adjacency_values` (nonzero,) of the matrix's dtype, the non-zero entries in
  row-major order; and `adjacency_bitmap` (n_bytes,) uint8, a zlib stream of the row-major
  N * N bitmap of those entries (`numpy.packbits`: first entry in the high bit, the last byte
  padded with zero bits).

"Non-zero" means a non-zero bit pattern, so -0.0, NaN payloads and infinities round-trip bit-exact.
A file is written sparse when that is smaller even with an incompressible bitmap
(nonzero * itemsize + N * N / 8 < N * N * itemsize): below about 97% density in float32.

Both directions walk the flattened matrix in blocks of `BLOCK_BYTES * 8` entries, so the memory
beyond the matrix itself is the non-zero values, the compressed bitmap and one block.
`tracer.graph/1` files (dense, no `"adjacency"` entry) still load.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

FORMAT = "tracer.graph/2"
LEGACY_FORMAT = "tracer.graph/1"  # always dense, no "adjacency" header entry
READABLE_FORMATS = (LEGACY_FORMAT, FORMAT)

DENSE, BITMAP = "dense", "bitmap-zlib"
TENSOR_NAMES = {DENSE: ("adjacency_matrix",), BITMAP: ("adjacency_values", "adjacency_bitmap")}

BLOCK_BYTES = 1 << 19  # bitmap bytes per block: 4M entries, a 4 MB mask
_INPUT_PIECE = 1 << 16  # compressed bytes fed to zlib at a time (bounds its unconsumed tail)
_COMPRESSION_LEVEL = 1  # level 6 saves under 1% of a file (values dominate), at ~4x the time

# The integer type of each float type's width: entries are compared and moved as bit patterns.
_BIT_TYPES = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _BIT_TYPES}
_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


@dataclass(frozen=True)
class AdjacencyStorage:
    """The header's `"adjacency"` entry: how the matrix is stored and what it holds."""

    encoding: str
    n_nodes: int
    dtype: str
    nonzero: int | None  # None only for tracer.graph/1 files, whose header does not count

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def dense_bytes(self) -> int:
        return self.n_nodes**2 * self.torch_dtype.itemsize

    @classmethod
    def from_header(cls, entry: object) -> AdjacencyStorage:
        if not isinstance(entry, dict):
            raise ValueError(f"the adjacency entry must be a JSON object, got {entry!r}")
        missing = [k for k in ("encoding", "n_nodes", "dtype", "nonzero") if k not in entry]
        if missing:
            raise ValueError(f"the adjacency entry lacks {missing}")
        encoding, n_nodes, dtype, nonzero = (
            entry["encoding"],
            entry["n_nodes"],
            entry["dtype"],
            entry["nonzero"],
        )
        if encoding not in TENSOR_NAMES:
            raise ValueError(
                f"unknown adjacency encoding {encoding!r}, not one of {list(TENSOR_NAMES)}"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"unknown adjacency dtype {dtype!r}, not one of {list(_DTYPES)}")
        if not _is_count(n_nodes) or not _is_count(nonzero) or nonzero > n_nodes**2:
            raise ValueError(
                f"the adjacency entry needs counts with 0 <= nonzero <= n_nodes ** 2, "
                f"got n_nodes={n_nodes!r}, nonzero={nonzero!r}"
            )
        return cls(encoding, n_nodes, dtype, nonzero)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_dtype(adjacency: torch.Tensor) -> None:
    if adjacency.dtype not in _BIT_TYPES:
        raise ValueError(f"adjacency dtype must be one of {list(_DTYPES)}, got {adjacency.dtype}")


def _blocks(n_entries: int) -> Iterator[slice]:
    step = BLOCK_BYTES * 8  # whole bitmap bytes per block, so blocks' packed bits concatenate
    for start in range(0, n_entries, step):
        yield slice(start, min(start + step, n_entries))


def _bit_patterns(adjacency: torch.Tensor) -> torch.Tensor:
    """(N * N,) the entries as integers of their width (a view, no copy)."""
    return adjacency.view(_BIT_TYPES[adjacency.dtype]).view(-1)


def _count_stored(bits: torch.Tensor) -> int:
    """Entries with a non-zero bit pattern (so -0.0 counts), block by block."""
    return sum(int(torch.count_nonzero(bits[block])) for block in _blocks(bits.numel()))


# ---- writing -------------------------------------------------------------------------------------
def encode_adjacency(adjacency: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors that store an (N, N) adjacency, and the header entry that describes them."""
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be square (N, N), got {tuple(adjacency.shape)}")
    _check_dtype(adjacency)
    adjacency = adjacency.detach().cpu().contiguous()
    bits = _bit_patterns(adjacency)
    nonzero = _count_stored(bits)
    n_entries, itemsize = bits.numel(), adjacency.dtype.itemsize
    sparse = nonzero * itemsize + math.ceil(n_entries / 8) < n_entries * itemsize
    storage = AdjacencyStorage(
        BITMAP if sparse else DENSE, adjacency.shape[0], _dtype_name(adjacency.dtype), nonzero
    )
    if not sparse:
        return {"adjacency_matrix": adjacency}, asdict(storage)
    values = torch.empty(nonzero, dtype=bits.dtype)
    bitmap = bytearray()
    compressor = zlib.compressobj(_COMPRESSION_LEVEL)
    done = 0
    for block in _blocks(n_entries):
        mask = bits[block] != 0
        count = int(torch.count_nonzero(mask))
        torch.masked_select(bits[block], mask, out=values[done : done + count])
        done += count
        bitmap += compressor.compress(np.packbits(mask.numpy()))
    bitmap += compressor.flush()
    tensors = {
        "adjacency_values": values.view(adjacency.dtype),
        "adjacency_bitmap": torch.frombuffer(bitmap, dtype=torch.uint8),
    }
    return tensors, asdict(storage)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- reading -------------------------------------------------------------------------------------
def read_header(path: str | Path) -> dict:
    """The tracer header of a graph file in a readable format, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("tracer")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"graph file {path} is corrupt or truncated: {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a tracer graph (no header)")
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"graph file {path} has a header that is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(
            f"graph file {path} has a JSON {type(header).__name__} as header, not an object"
        )
    if header.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"graph file {path} has the unsupported format {header.get('format')!r}, "
            f"not one of {READABLE_FORMATS}"
        )
    return header


def _storage_of(header: dict, tensors: dict[str, torch.Tensor]) -> AdjacencyStorage:
    """The adjacency entry of a read header; for a tracer.graph/1 file, taken from its matrix."""
    if header["format"] != LEGACY_FORMAT:
        return AdjacencyStorage.from_header(header.get("adjacency"))
    matrix = tensors.get("adjacency_matrix")
    if matrix is None:
        raise ValueError("it lacks the tensor 'adjacency_matrix'")
    _check_dtype(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"adjacency is {tuple(matrix.shape)}, not (N, N)")
    return AdjacencyStorage(DENSE, matrix.shape[0], _dtype_name(matrix.dtype), None)


def decode_adjacency(header: dict, tensors: dict[str, torch.Tensor], n_nodes: int) -> torch.Tensor:
    """The (n_nodes, n_nodes) adjacency stored in a file's tensors, checked against its header.

    `n_nodes` comes from the rest of the graph; it is checked before anything is allocated."""
    storage = _storage_of(header, tensors)
    if storage.n_nodes != n_nodes:
        raise ValueError(f"adjacency has {storage.n_nodes} nodes, its node counts say {n_nodes}")
    missing = [name for name in TENSOR_NAMES[storage.encoding] if name not in tensors]
    if missing:
        raise ValueError(f"the {storage.encoding} adjacency lacks tensors {missing}")
    if storage.encoding == DENSE:
        return _checked_dense(storage, tensors["adjacency_matrix"])
    return _decode_bitmap(storage, tensors["adjacency_values"], tensors["adjacency_bitmap"])


def _checked_dense(storage: AdjacencyStorage, matrix: torch.Tensor) -> torch.Tensor:
    n = storage.n_nodes
    if tuple(matrix.shape) != (n, n) or matrix.dtype != storage.torch_dtype:
        raise ValueError(
            f"adjacency is {tuple(matrix.shape)} {matrix.dtype}, its header says "
            f"({n}, {n}) {storage.dtype}"
        )
    if storage.nonzero is not None:
        nonzero = _count_stored(_bit_patterns(matrix))
        if nonzero != storage.nonzero:
            raise ValueError(
                f"adjacency has {nonzero} non-zero entries, its header says {storage.nonzero}"
            )
    return matrix


def _decode_bitmap(
    storage: AdjacencyStorage, values: torch.Tensor, bitmap: torch.Tensor
) -> torch.Tensor:
    if values.shape != (storage.nonzero,) or values.dtype != storage.torch_dtype:
        raise ValueError(
            f"adjacency_values is {tuple(values.shape)} {values.dtype}, the header says "
            f"({storage.nonzero},) {storage.dtype}"
        )
    if bitmap.ndim != 1 or bitmap.dtype != torch.uint8:
        raise ValueError(
            f"adjacency_bitmap is {tuple(bitmap.shape)} {bitmap.dtype}, not (n,) uint8"
        )
    n_entries = storage.n_nodes**2
    adjacency = torch.zeros(storage.n_nodes, storage.n_nodes, dtype=storage.torch_dtype)
    bits = _bit_patterns(adjacency)  # written in place
    value_bits = values.view(bits.dtype)
    filled = used = 0
    for piece in _inflate(memoryview(bitmap.numpy()), math.ceil(n_entries / 8)):
        entries = np.unpackbits(np.frombuffer(piece, dtype=np.uint8))
        count = min(entries.size, n_entries - filled)
        if entries[count:].any():
            raise ValueError("the adjacency bitmap sets padding bits beyond the last entry")
        mask = torch.from_numpy(entries[:count]).view(torch.bool)
        marked = int(torch.count_nonzero(mask))
        if used + marked > storage.nonzero:
            raise ValueError(
                f"the adjacency bitmap marks more than the {storage.nonzero} stored values"
            )
        bits[filled : filled + count].masked_scatter_(mask, value_bits[used : used + marked])
        filled, used = filled + count, used + marked
    if used != storage.nonzero:
        raise ValueError(
            f"the adjacency bitmap marks {used} entries, but {storage.nonzero} values are stored"
        )
    return adjacency


def _inflate(stream: memoryview, n_bytes: int) -> Iterator[bytes]:
    """The zlib `stream` decompressed in pieces of at most BLOCK_BYTES; it must hold `n_bytes`."""
    inflater = zlib.decompressobj()
    produced = fed = 0
    try:
        while not inflater.eof:
            pending = inflater.unconsumed_tail
            if not pending and fed < len(stream):
                pending = stream[fed : fed + _INPUT_PIECE]
                fed += len(pending)
            piece = inflater.decompress(pending, BLOCK_BYTES)
            if not piece and not inflater.eof and fed == len(stream):
                break  # input used up, no output left: the stream is cut short
            produced += len(piece)
            if produced > n_bytes:
                raise ValueError(
                    f"the adjacency bitmap holds more than the {n_bytes} bytes expected"
                )
            if piece:
                yield piece
    except zlib.error as err:
        raise ValueError(f"the adjacency bitmap is not a valid zlib stream: {err}") from err
    if not inflater.eof:
        raise ValueError("the adjacency bitmap's zlib stream is truncated")
    if inflater.unused_data or fed < len(stream):
        raise ValueError("the adjacency bitmap has bytes after the end of its zlib stream")
    if produced != n_bytes:
        raise ValueError(f"the adjacency bitmap holds {produced} bytes, {n_bytes} expected")


# ---- reporting -----------------------------------------------------------------------------------
def describe(path: str | Path) -> dict:
    """How a graph file stores its adjacency, from the header (the matrix is not decoded).

    Keys: format, encoding, dtype, n_nodes, nonzero (None for tracer.graph/1 files), file_bytes,
    dense_bytes (N * N * itemsize), ratio (file_bytes / dense_bytes; None when N is 0)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {path} does not exist")
    header = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            matrix = {}
            if header["format"] == LEGACY_FORMAT and "adjacency_matrix" in handle.keys():
                # Shape and dtype from the safetensors header, on a stand-in that holds no data.
                info = handle.get_slice("adjacency_matrix")
                dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise ValueError(f"adjacency dtype {info.get_dtype()} is not a float type")
                stand_in = torch.empty(info.get_shape(), dtype=dtype, device="meta")
                matrix = {"adjacency_matrix": stand_in}
        storage = _storage_of(header, matrix)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"graph file {path} is not a valid tracer graph: {err}") from err
    file_bytes = os.path.getsize(path)
    dense_bytes = storage.dense_bytes
    return {
        "format": header["format"],
        **asdict(storage),
        "file_bytes": file_bytes,
        "dense_bytes": dense_bytes,
        "ratio": file_bytes / dense_bytes if dense_bytes else None,
    }
