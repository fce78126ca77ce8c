"""Transcoder weight files: their headers, where each layer's tensors are stored, and reading them.

safetensors files are read lazily through their headers; GemmaScope's `params.npz` through the zip
members' npy headers, with `allow_pickle=False`. Pickle-based formats are refused by name.
Layouts (which file holds which layer) are `tracer.transcoders.files`'s business.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from tracer.transcoders.sets import LayerWeights

WEIGHT_SUFFIXES = (".safetensors", ".npz")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PLT_THRESHOLD_KEYS = ("activation_function.threshold", "threshold")

Header = dict[str, tuple[int, ...]]  # tensor name -> shape


class TranscoderFileError(ValueError):
    """A weight file or config.yaml that does not match the expected layout."""


# ---- reading tensor files --------------------------------------------------------------------
def is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def check_weight_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise TranscoderFileError(
            f"{path}: {suffix} files are pickles, which this project never loads; convert the "
            f"weights to one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if suffix not in WEIGHT_SUFFIXES:
        raise TranscoderFileError(
            f"{path}: unknown weight file type {suffix!r}; valid: {', '.join(WEIGHT_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"transcoder weight file {path} does not exist")


def read_header(path: Path) -> Header:
    """Tensor names and shapes of a safetensors or npz file, without reading the tensors."""
    check_weight_file(path)
    if is_npz(path):
        return _npz_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise TranscoderFileError(f"{path} is not a valid safetensors file: {e}") from e


def _npz_header(path: Path) -> Header:
    arrays = {}  # name -> (shape, fortran_order, dtype), from each .npy member's header
    try:
        with zipfile.ZipFile(path) as zf:
            for name in (n for n in zf.namelist() if n.endswith(".npy")):
                with zf.open(name) as fp:
                    if np.lib.format.read_magic(fp) == (1, 0):
                        arrays[name[:-4]] = np.lib.format.read_array_header_1_0(fp)
                    else:
                        arrays[name[:-4]] = np.lib.format.read_array_header_2_0(fp)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # ValueError: bad .npy header
        raise TranscoderFileError(f"{path} is not a valid npz file: {e}") from e
    for key, (_, _, dtype) in arrays.items():
        if dtype.hasobject:
            raise TranscoderFileError(
                f"{path}: array {key!r} holds Python objects, which need pickle; refusing to load it"
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
    """One LayerWeights field on disk: file, tensor name, stored transposed or not."""

    path: Path
    key: str
    transposed: bool = False


Recipe = dict[str, _Stored]  # LayerWeights field -> where it is stored


def _require(path: Path, header: Header, key: str) -> str:
    if key not in header:
        raise TranscoderFileError(
            f"{path}: missing tensor {key!r}; tensors present: {sorted(header) or 'none'}"
        )
    return key


def plt_recipe(path: Path, header: Header) -> Recipe:
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
            raise TranscoderFileError(f"{where.path}: {where.key!r} must be 1-D, got {shape}")
    (d_model,), (d_transcoder,) = sizes
    n_layers = len(recipes)
    for i, recipe in enumerate(recipes):
        if set(recipe) != set(first):
            odd = sorted(set(recipe) ^ set(first))
            raise TranscoderFileError(
                f"layer {i} ({recipe['W_enc'].path}) and layer 0 ({first['W_enc'].path}) differ "
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
            if got == want or (field == "threshold" and got == (1, d_transcoder)):
                continue
            hint = ""
            if field == "W_enc" and got == want[::-1] and stored.transposed:
                hint = "; GemmaScope npz stores W_enc as (d_model, d_transcoder), this one is not"
            elif field == "W_enc" and got == want[::-1]:
                hint = "; it looks transposed (GemmaScope orientation?)"
            raise TranscoderFileError(
                f"{stored.path}: tensor {stored.key!r} has shape {got}, expected {want} "
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
                tensors[f] = t.T.contiguous() if recipe[f].transposed else t
        if "threshold" in tensors:
            tensors["threshold"] = tensors["threshold"].reshape(-1)
        return LayerWeights(**tensors)

    return load
