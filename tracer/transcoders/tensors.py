"""Transcoder weight files: their headers, where each layer's tensors are stored, and reading them.

safetensors files are read lazily through their headers; GemmaScope's `params.npz` through the zip
members' npy headers, with `allow_pickle=False`. Pickle-based formats are refused by name. A file
still on the hub has its header read with HTTP range requests (no weights downloaded).
Layouts (which file holds which layer) are `tracer.transcoders.files`'s business.

Tensor names per file kind (all mapped to `LayerWeights`, in its orientation):
- ours / circuit-tracer safetensors: `W_enc` (d_transcoder, d_model), `W_dec`, `b_enc`, `b_dec`,
  `activation_function.threshold` or `threshold`, `W_skip`; CLT files `W_enc_{i}` ... `W_dec_{i}`;
- GemmaScope `params.npz`: the same names, `W_enc` stored (d_model, d_transcoder);
- GemmaScope-2 safetensors (lower-case names): `w_enc` (d_model, d_transcoder), `w_dec`, `b_enc`,
  `b_dec`, `threshold`, optional `affine_skip_connection` (d_model_in, d_model_out, used as
  x @ A). Its cross-layer files, one per source layer, hold `w_dec` (d_transcoder, n_layers,
  d_model) for every target layer; source layer i uses targets i.. only.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import SafetensorsParsingError
from safetensors import SafetensorError, safe_open

from tracer.hub import HUB_ERRORS, HfRef, HubError, error_reason, open_remote
from tracer.transcoders.sets import LayerWeights

WEIGHT_SUFFIXES = (".safetensors", ".npz")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PLT_THRESHOLD_KEYS = ("activation_function.threshold", "threshold")

Header = dict[str, tuple[int, ...]]  # tensor name -> shape
Location = Path | HfRef  # a weight file on disk, or on the hub at a revision


class TranscoderFileError(ValueError):
    """A weight file or config.yaml that does not match the expected layout."""


# ---- reading tensor files --------------------------------------------------------------------
def _name(location: Location) -> str:
    return location.uri if isinstance(location, HfRef) else str(location)


def _suffix(location: Location) -> str:
    path = location.path_in_repo if isinstance(location, HfRef) else location
    return PurePosixPath(path).suffix.lower()


def is_npz(location: Location) -> bool:
    return _suffix(location) == ".npz"


def check_weight_name(location: Location) -> None:
    """Refuse pickles and unknown file types by name, before anything is downloaded or read."""
    suffix = _suffix(location)
    if suffix in PICKLE_SUFFIXES:
        raise TranscoderFileError(
            f"{_name(location)}: {suffix} files are pickles, which this project never loads; "
            f"convert the weights to one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if suffix not in WEIGHT_SUFFIXES:
        raise TranscoderFileError(
            f"{_name(location)}: unknown weight file type {suffix!r}; valid: "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )


def check_weight_file(path: Path) -> None:
    check_weight_name(path)
    if not path.is_file():
        raise FileNotFoundError(f"transcoder weight file {path} does not exist")


def read_header(location: Location) -> Header:
    """Tensor names and shapes of a safetensors or npz file, without reading the tensors.

    A hub location is read remotely: the safetensors header or the npz's zip directory and npy
    headers, through range requests."""
    if isinstance(location, HfRef):
        return _remote_header(location)
    check_weight_file(location)
    if is_npz(location):
        return _npz_header(location, str(location))
    try:
        with safe_open(location, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise TranscoderFileError(f"{location} is not a valid safetensors file: {e}") from e


def _remote_header(ref: HfRef) -> Header:
    check_weight_name(ref)
    if is_npz(ref):
        with open_remote(ref) as remote:
            return _npz_header(remote, ref.uri)
    try:
        found = HfApi().parse_safetensors_file_metadata(
            ref.repo_id, ref.path_in_repo, revision=ref.revision
        )
    except SafetensorsParsingError as e:
        raise TranscoderFileError(f"{ref.uri} is not a valid safetensors file: {e}") from e
    except HUB_ERRORS as e:
        raise HubError(ref, error_reason(e)) from e
    return {name: tuple(info.shape) for name, info in found.tensors.items()}


def _npz_header(file: Path | BinaryIO, where: str) -> Header:
    arrays = {}  # name -> (shape, fortran_order, dtype), from each .npy member's header
    try:
        with zipfile.ZipFile(file) as zf:
            for name in (n for n in zf.namelist() if n.endswith(".npy")):
                with zf.open(name) as fp:
                    if np.lib.format.read_magic(fp) == (1, 0):
                        arrays[name[:-4]] = np.lib.format.read_array_header_1_0(fp)
                    else:
                        arrays[name[:-4]] = np.lib.format.read_array_header_2_0(fp)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # ValueError: bad .npy header
        raise TranscoderFileError(f"{where} is not a valid npz file: {e}") from e
    for key, (_, _, dtype) in arrays.items():
        if dtype.hasobject:
            raise TranscoderFileError(
                f"{where}: array {key!r} holds Python objects, which need pickle; refusing to load "
                "it"
            )
    return {key: tuple(shape) for key, (shape, _, _) in arrays.items()}


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    check_weight_file(path)
    if is_npz(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in keys}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise TranscoderFileError(f"{path} is not a valid npz file: {e}") from e
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except SafetensorError as e:
        raise TranscoderFileError(f"{path} is not a valid safetensors file: {e}") from e


# ---- where each layer's tensors live -----------------------------------------------------------
@dataclass(frozen=True)
class _Stored:
    """One LayerWeights field on disk: file, tensor name, stored transposed or not.

    `all_targets`: a cross-layer decoder stored for every target layer (GemmaScope-2), of which
    source layer i keeps targets i.. ."""

    path: Location
    key: str
    transposed: bool = False
    all_targets: bool = False


Recipe = dict[str, _Stored]  # LayerWeights field -> where it is stored


def _require(path: Location, header: Header, key: str) -> str:
    if key not in header:
        raise TranscoderFileError(
            f"{_name(path)}: missing tensor {key!r}; tensors present: {sorted(header) or 'none'}"
        )
    return key


# GemmaScope-2: LayerWeights field -> (tensor name, stored transposed relative to ours); a PLT's
# W_skip is used as x @ W_skip.T, so the skip (used as x @ A) is stored transposed; a CLT's as is.
_GEMMASCOPE2_PLT = {
    "W_enc": ("w_enc", True),
    "W_dec": ("w_dec", False),
    "b_enc": ("b_enc", False),
    "b_dec": ("b_dec", False),
    "threshold": ("threshold", False),
    "W_skip": ("affine_skip_connection", True),
}
_GEMMASCOPE2_CLT = {**_GEMMASCOPE2_PLT, "W_skip": ("affine_skip_connection", False)}
_OPTIONAL = ("threshold", "W_skip")


def is_gemmascope2(header: Header) -> bool:
    return "w_enc" in header


def _gemmascope2_recipe(path: Location, header: Header, cross_layer: bool) -> Recipe:
    names = _GEMMASCOPE2_CLT if cross_layer else _GEMMASCOPE2_PLT
    recipe = {}
    for field, (key, transposed) in names.items():
        if field in _OPTIONAL and key not in header:
            continue
        _require(path, header, key)
        recipe[field] = _Stored(path, key, transposed, cross_layer and field == "W_dec")
    return recipe


def plt_recipe(path: Location, header: Header) -> Recipe:
    if is_gemmascope2(header):
        return _gemmascope2_recipe(path, header, cross_layer=False)
    recipe = {f: _Stored(path, _require(path, header, f)) for f in ("W_dec", "b_enc", "b_dec")}
    # GemmaScope's npz stores the encoder as (d_model, d_transcoder).
    recipe["W_enc"] = _Stored(path, _require(path, header, "W_enc"), is_npz(path))
    thresholds = [k for k in PLT_THRESHOLD_KEYS if k in header]
    if len(thresholds) > 1:
        raise TranscoderFileError(f"{path}: two thresholds {thresholds}; keep one")
    if thresholds:
        recipe["threshold"] = _Stored(path, thresholds[0])
    if "W_skip" in header:
        recipe["W_skip"] = _Stored(path, "W_skip")
    return recipe


def clt_layer_recipe(path: Location, header: Header) -> Recipe:
    """A cross-layer source layer stored in one file (GemmaScope-2's per-layer CLT files)."""
    if not is_gemmascope2(header):
        raise TranscoderFileError(
            f"{_name(path)}: a cross-layer transcoder listed file by file needs GemmaScope-2 "
            f"tensors (w_enc, w_dec, b_enc, b_dec, threshold); tensors present: {sorted(header)}"
        )
    return _gemmascope2_recipe(path, header, cross_layer=True)


def clt_recipe(i: int, enc: Path, enc_header: Header, dec: Path, dec_header: Header) -> Recipe:
    recipe = {
        f: _Stored(enc, _require(enc, enc_header, f"{f}_{i}")) for f in ("W_enc", "b_enc", "b_dec")
    }
    recipe["W_dec"] = _Stored(dec, _require(dec, dec_header, f"W_dec_{i}"))
    for field, key in (("threshold", f"threshold_{i}"), ("W_skip", f"W_skip_{i}")):
        if key in enc_header:
            recipe[field] = _Stored(enc, key)
    return recipe


def check_shapes(
    recipes: list[Recipe], headers: dict[Path, Header], cross_layer: bool
) -> tuple[int, int]:
    """Check every layer against the sizes of layer 0; return (d_model, d_transcoder)."""
    first = recipes[0]
    sizes = [headers[first[f].path][first[f].key] for f in ("b_dec", "b_enc")]
    for field, shape in zip(("b_dec", "b_enc"), sizes, strict=True):
        if len(shape) != 1:
            where = first[field]
            raise TranscoderFileError(
                f"{_name(where.path)}: {where.key!r} must be 1-D, got {shape}"
            )
    (d_model,), (d_transcoder,) = sizes
    n_layers = len(recipes)
    for i, recipe in enumerate(recipes):
        if set(recipe) != set(first):
            odd = sorted(set(recipe) ^ set(first))
            raise TranscoderFileError(
                f"layer {i} ({_name(recipe['W_enc'].path)}) and layer 0 "
                f"({_name(first['W_enc'].path)}) differ "
                f"in which optional tensors they have: {odd}"
            )
        dec = (d_transcoder, n_layers - i, d_model) if cross_layer else (d_transcoder, d_model)
        expected = {
            "W_enc": (d_transcoder, d_model),
            "b_enc": (d_transcoder,),
            "b_dec": (d_model,),
            "W_dec": dec,
            "threshold": (d_transcoder,),
            "W_skip": (d_model, d_model),
        }
        for field, stored in recipe.items():
            got = headers[stored.path][stored.key]
            want = expected[field][::-1] if stored.transposed else expected[field]
            if stored.all_targets:
                want = (d_transcoder, n_layers, d_model)
            if got == want or (field == "threshold" and got == (1, d_transcoder)):
                continue
            hint = ""
            if field == "W_enc" and got == want[::-1] and stored.transposed:
                hint = "; GemmaScope npz stores W_enc as (d_model, d_transcoder), this one is not"
            elif field == "W_enc" and got == want[::-1]:
                hint = "; it looks transposed (GemmaScope orientation?)"
            raise TranscoderFileError(
                f"{_name(stored.path)}: tensor {stored.key!r} has shape {got}, expected {want} "
                f"(d_model={d_model}, d_transcoder={d_transcoder} from layer 0, "
                f"n_layers={n_layers}){hint}"
            )
    return d_model, d_transcoder


def layer_loader(recipes: list[Recipe]) -> Callable[[int], LayerWeights]:
    """A loader that reads layer i's tensors from disk when called."""

    def load(i: int) -> LayerWeights:
        recipe = recipes[i]
        tensors: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(s.path for s in recipe.values()):
            fields = [f for f, s in recipe.items() if s.path == path]
            read = _read_tensors(path, [recipe[f].key for f in fields])
            for f in fields:
                t = read[recipe[f].key]
                if recipe[f].all_targets:
                    t = t[:, i:].contiguous()
                tensors[f] = t.T.contiguous() if recipe[f].transposed else t
        if "threshold" in tensors:
            tensors["threshold"] = tensors["threshold"].reshape(-1)
        return LayerWeights(**tensors)

    return load
