"""Transcoder sets on disk, in the upstream layouts (circuit-tracer, GemmaScope): load and save.

A set is a folder (local, or `hf://org/repo[/sub][@rev]`) holding `config.yaml` and weight files.
- `model_kind: transcoder_set` (per-layer): one file per layer, listed under `transcoders:` (paths
  relative to the folder, absolute local paths, or hf:// URIs) or, without that key, the folder's
  `layer_{i}.safetensors`. A safetensors file holds `W_enc` (d_transcoder, d_model), `W_dec`
  (d_transcoder, d_model), `b_enc`, `b_dec`, optional `activation_function.threshold` (or
  `threshold`) and `W_skip` (d_model, d_model; used as x @ W_skip.T). GemmaScope's `params.npz`
  uses the same names but stores `W_enc` as (d_model, d_transcoder).
- `model_kind: cross_layer_transcoder`: `W_enc_{i}.safetensors` (`W_enc_{i}`, `b_enc_{i}`,
  `b_dec_{i}`, optional `threshold_{i}`, and ours: `W_skip_{i}` (d_model, d_model; used as
  x @ W_skip)) and `W_dec_{i}.safetensors` (`W_dec_{i}` (d_transcoder, n_layers - i, d_model)), in
  the config's folder or in the one folder/URI that `transcoders:` names.

config.yaml keys: upstream `model_name`, `model_kind`, `feature_input_hook` and
`feature_output_hook` (both required), `scan` (kept verbatim), `transcoders`; ours, optional:
`activation` (relu | jumprelu | topk; default jumprelu when the files carry a threshold, else relu)
and `top_k` (circuit-tracer spells it `k`; both are read). Other keys are ignored.

Shapes are read from file headers up front, so a bad set fails at load; a layer's weights are
read only on first use. Nothing is ever unpickled: `.pt`/`.bin`/pickle files are refused and npz
files are read with allow_pickle=False.
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tracer.hub import HfRef, cached_commit, is_hf_uri, parse_hf_uri, resolve_repo_path
from tracer.model.families import check_hook
from tracer.transcoders.sets import ACTIVATIONS, LayerWeights, TranscoderSet

CONFIG_FILE = "config.yaml"
MODEL_KINDS = {"transcoder_set": False, "cross_layer_transcoder": True}  # kind -> cross_layer
WEIGHT_SUFFIXES = (".safetensors", ".npz")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PLT_THRESHOLD_KEYS = ("activation_function.threshold", "threshold")
_ACTIVATION_ALIASES = {"jump_relu": "jumprelu"}  # circuit-tracer's spelling

Header = dict[str, tuple[int, ...]]  # tensor name -> shape


class TranscoderFileError(ValueError):
    """A weight file or config.yaml that does not match the expected layout."""


# ---- reading tensor files --------------------------------------------------------------------
def _is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def _check_weight_file(path: Path) -> None:
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


def _read_header(path: Path) -> Header:
    """Tensor names and shapes of a safetensors or npz file, without reading the tensors."""
    _check_weight_file(path)
    if _is_npz(path):
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
    _check_weight_file(path)
    if _is_npz(path):
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


def _plt_recipe(path: Path, header: Header) -> Recipe:
    recipe = {f: _Stored(path, _require(path, header, f)) for f in ("W_dec", "b_enc", "b_dec")}
    # GemmaScope's npz stores the encoder as (d_model, d_transcoder).
    recipe["W_enc"] = _Stored(path, _require(path, header, "W_enc"), _is_npz(path))
    thresholds = [k for k in PLT_THRESHOLD_KEYS if k in header]
    if len(thresholds) > 1:
        raise TranscoderFileError(f"{path}: two thresholds {thresholds}; keep one")
    if thresholds:
        recipe["threshold"] = _Stored(path, thresholds[0])
    if "W_skip" in header:
        recipe["W_skip"] = _Stored(path, "W_skip")
    return recipe


def _clt_recipe(i: int, enc: Path, enc_header: Header, dec: Path, dec_header: Header) -> Recipe:
    recipe = {
        f: _Stored(enc, _require(enc, enc_header, f"{f}_{i}")) for f in ("W_enc", "b_enc", "b_dec")
    }
    recipe["W_dec"] = _Stored(dec, _require(dec, dec_header, f"W_dec_{i}"))
    for field, key in (("threshold", f"threshold_{i}"), ("W_skip", f"W_skip_{i}")):
        if key in enc_header:
            recipe[field] = _Stored(enc, key)
    return recipe


def _check_shapes(
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


def _layer_loader(recipes: list[Recipe]) -> Callable[[int], LayerWeights]:
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


# ---- folders and config.yaml -----------------------------------------------------------------
@dataclass(frozen=True)
class _Folder:
    """A set's local folder; `fetch(patterns)` makes those files present (on the hub: downloads)."""

    path: Path
    fetch: Callable[[list[str]], object]
    on_hub: bool


def _local_folder(path: Path) -> _Folder:
    if not path.is_dir():
        raise FileNotFoundError(
            f"transcoder set {path} is not a folder; expected a folder with {CONFIG_FILE} "
            "or an hf://org/repo[/sub][@revision] URI"
        )
    return _Folder(path, lambda patterns: None, on_hub=False)


def _hub_folder(uri: str, revision: str | None) -> tuple[_Folder, str | None]:
    ref = parse_hf_uri(uri)
    if revision is not None and ref.revision not in (None, revision):
        raise ValueError(
            f"{uri} pins revision {ref.revision!r} but revision={revision!r} was given"
        )
    ref = HfRef(ref.repo_id, ref.path_in_repo, ref.revision or revision)
    config = resolve_repo_path(ref.child(CONFIG_FILE))
    # Pin the commit the config came from, so later files cannot come from a moved branch.
    commit = cached_commit(config) or ref.revision
    pinned = HfRef(ref.repo_id, ref.path_in_repo, commit)
    return _Folder(
        config.parent, lambda p: resolve_repo_path(pinned, allow_patterns=p), True
    ), commit


def _read_config(folder: _Folder) -> dict:
    path = folder.path / CONFIG_FILE
    if not path.is_file():
        found = sorted(p.name for p in folder.path.glob("*"))[:8]
        raise FileNotFoundError(
            f"{folder.path} has no {CONFIG_FILE} (found: {found}); a transcoder set folder needs "
            f"one with model_kind ({' | '.join(MODEL_KINDS)}), feature_input_hook, "
            "feature_output_hook"
        )
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise TranscoderFileError(
            f"{path}: expected a mapping of keys, got {type(config).__name__}"
        )
    if config.get("model_kind") not in MODEL_KINDS:
        raise TranscoderFileError(
            f"{path}: model_kind {config.get('model_kind')!r} is not valid; valid: "
            f"{', '.join(MODEL_KINDS)}"
        )
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str):
            raise TranscoderFileError(f"{path}: {key} must be a hook name, got {config.get(key)!r}")
        try:  # early, before any weights are fetched
            check_hook(config[key], write=key == "feature_output_hook")
        except ValueError as error:
            raise TranscoderFileError(f"{path}: {error}") from None
    return config


def _entry_path(folder: _Folder, entry: object, what: str) -> Path:
    """Local path of one `transcoders:` entry (relative path, absolute path or hf:// URI)."""
    if not isinstance(entry, str) or not entry:
        raise TranscoderFileError(f"{folder.path / CONFIG_FILE}: {what} must be a path or URI")
    if is_hf_uri(entry):
        return resolve_repo_path(parse_hf_uri(entry))
    if Path(entry).is_absolute():
        if folder.on_hub:
            raise TranscoderFileError(f"{what} {entry!r}: a hub config cannot name a local path")
        return Path(entry)
    folder.fetch([glob.escape(entry)])
    return folder.path / entry


def _indexed_files(folder: Path, pattern: str, describe: str) -> list[Path]:
    """Files `pattern` (with one `{i}`) for i = 0..n-1, requiring no gaps."""
    regex = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)"))
    found = {}
    for p in folder.glob(pattern.replace("{i}", "*")):
        m = regex.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"{folder}: no {pattern} files ({describe})")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(f"{folder}: {pattern.format(i=missing[0])} is missing ({describe})")
    return [found[i] for i in range(len(found))]


def _plt_files(folder: _Folder, config: dict) -> list[Path]:
    entries = config.get("transcoders")
    if entries is None:
        folder.fetch(["layer_*.safetensors"])
        return _indexed_files(folder.path, "layer_{i}.safetensors", "config lists no transcoders")
    if not isinstance(entries, list) or not entries:
        raise TranscoderFileError(f"{folder.path / CONFIG_FILE}: transcoders must be a list")
    return [_entry_path(folder, e, f"transcoders[{i}]") for i, e in enumerate(entries)]


def _clt_files(folder: _Folder, config: dict) -> list[tuple[Path, Path]]:
    entries = config.get("transcoders")
    if isinstance(entries, list) and len(entries) == 1:
        entries = entries[0]
    patterns = ["W_enc_*.safetensors", "W_dec_*.safetensors"]
    if entries is None:
        folder.fetch(patterns)
        clt = folder.path
    elif isinstance(entries, str) and is_hf_uri(entries):
        clt = resolve_repo_path(parse_hf_uri(entries), allow_patterns=patterns)
    elif isinstance(entries, str) and not (folder.on_hub and Path(entries).is_absolute()):
        folder.fetch([f"{glob.escape(entries)}/{p}" for p in patterns])
        clt = folder.path / entries
    else:
        raise TranscoderFileError(
            f"{folder.path / CONFIG_FILE}: a cross_layer_transcoder's transcoders must be one "
            f"folder (path or hf:// URI), got {entries!r}"
        )
    encoders = _indexed_files(clt, "W_enc_{i}.safetensors", "cross-layer encoders")
    decoders = [clt / f"W_dec_{i}.safetensors" for i in range(len(encoders))]
    for i, d in enumerate(decoders):
        if not d.is_file():
            raise FileNotFoundError(
                f"{d} is missing (the decoder of layer {i}, next to {encoders[i].name})"
            )
    return list(zip(encoders, decoders, strict=True))


def _activation(config: dict, recipes: list[Recipe], where: Path) -> tuple[str, int | None]:
    name = config.get("activation")
    name = _ACTIVATION_ALIASES.get(name, name)
    if name is None:
        name = "jumprelu" if "threshold" in recipes[0] else "relu"
    if name not in ACTIVATIONS:
        raise TranscoderFileError(
            f"{where}: activation {name!r} is not valid; valid: {', '.join(ACTIVATIONS)}"
        )
    if name == "jumprelu" and "threshold" not in recipes[0]:
        raise TranscoderFileError(
            f"{recipes[0]['W_enc'].path}: activation jumprelu needs a threshold tensor "
            f"({' or '.join(PLT_THRESHOLD_KEYS)}, or threshold_{{i}} for a CLT); none found"
        )
    given = {k: config[k] for k in ("top_k", "k") if config.get(k) is not None}
    if len(set(given.values())) > 1:
        raise TranscoderFileError(f"{where}: top_k and k disagree: {given}")
    top_k = next(iter(given.values()), None)
    if name == "topk" and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise TranscoderFileError(f"{where}: activation topk needs top_k >= 1, got {top_k!r}")
    if name != "topk" and top_k is not None:
        raise TranscoderFileError(f"{where}: top_k={top_k} given for activation {name!r}")
    return name, top_k


def load_transcoders(
    path_or_uri: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    lazy: bool = True,
    revision: str | None = None,
) -> TranscoderSet:
    """Load a transcoder set from a folder or `hf://org/repo[/sub][@rev]`.

    Shapes are checked up front from file headers; with `lazy` a layer's weights are read on first
    use (hub files are downloaded up front either way). `revision` applies to hub URIs; the set's
    `revision` is the resolved commit.
    """
    source = str(path_or_uri)
    if is_hf_uri(source):
        folder, commit = _hub_folder(source, revision)
    else:
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies only to hf:// URIs, not {source!r}")
        folder, commit = _local_folder(Path(source).expanduser()), None
    config = _read_config(folder)
    cross_layer = MODEL_KINDS[config["model_kind"]]
    headers: dict[Path, Header] = {}
    recipes: list[Recipe] = []
    if cross_layer:
        for i, (enc, dec) in enumerate(_clt_files(folder, config)):
            headers[enc], headers[dec] = _read_header(enc), _read_header(dec)
            recipes.append(_clt_recipe(i, enc, headers[enc], dec, headers[dec]))
    else:
        for path in _plt_files(folder, config):
            headers[path] = _read_header(path)
            recipes.append(_plt_recipe(path, headers[path]))
    d_model, d_transcoder = _check_shapes(recipes, headers, cross_layer)
    activation, top_k = _activation(config, recipes, folder.path / CONFIG_FILE)
    ts = TranscoderSet(
        n_layers=len(recipes),
        d_model=d_model,
        d_transcoder=d_transcoder,
        activation=activation,
        cross_layer=cross_layer,
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        top_k=top_k,
        model_name=config.get("model_name"),
        source=source,
        revision=commit,
        dtype=dtype,
        loader=_layer_loader(recipes),
    )
    ts.scan = config.get("scan")
    if not lazy:
        for i in range(ts.n_layers):
            ts.layer(i)
    return ts


# ---- saving -----------------------------------------------------------------------------------
def _layer_files(ts: TranscoderSet, i: int, dtype: torch.dtype | None) -> dict[str, dict]:
    """File name -> tensors for layer i, in the layout of `ts.cross_layer`."""
    w = ts.layer(i)

    def prep(t: torch.Tensor) -> torch.Tensor:
        # A fresh contiguous copy: save_file rejects views that share memory.
        return t.detach().to("cpu", dtype or t.dtype).clone(memory_format=torch.contiguous_format)

    if ts.cross_layer:
        enc = {f"W_enc_{i}": w.W_enc, f"b_enc_{i}": w.b_enc, f"b_dec_{i}": w.b_dec}
        if w.threshold is not None:
            enc[f"threshold_{i}"] = w.threshold
        if w.W_skip is not None:
            enc[f"W_skip_{i}"] = w.W_skip
        files = {f"W_enc_{i}.safetensors": enc, f"W_dec_{i}.safetensors": {f"W_dec_{i}": w.W_dec}}
    else:
        layer = {"W_enc": w.W_enc, "W_dec": w.W_dec, "b_enc": w.b_enc, "b_dec": w.b_dec}
        if w.threshold is not None:
            layer["activation_function.threshold"] = w.threshold
        if w.W_skip is not None:
            layer["W_skip"] = w.W_skip
        files = {f"layer_{i}.safetensors": layer}
    return {name: {k: prep(t) for k, t in tensors.items()} for name, tensors in files.items()}


def _config(ts: TranscoderSet) -> dict:
    config = {
        "model_name": ts.model_name,
        "model_kind": "cross_layer_transcoder" if ts.cross_layer else "transcoder_set",
        "feature_input_hook": ts.feature_input_hook,
        "feature_output_hook": ts.feature_output_hook,
        "scan": ts.scan,
        "activation": ts.activation,
        "top_k": ts.top_k if ts.activation == "topk" else None,
    }
    # No `transcoders:` list: upstream then reads layer_{i} / W_enc_{i} files from the folder.
    return {k: v for k, v in config.items() if v is not None}


def save_transcoders(
    ts: TranscoderSet,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `ts` as config.yaml + safetensors files in the upstream layout; return the folder.

    Files go to a temporary folder next to `folder`, renamed into place at the end, so a failure
    leaves no half-written set. `dtype` (e.g. torch.bfloat16) sets the stored precision.
    """
    folder = Path(folder)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for i in range(ts.n_layers):
            for name, tensors in _layer_files(ts, i, dtype).items():
                save_file(tensors, tmp / name, metadata={"format": "pt"})
        config = yaml.safe_dump(_config(ts), sort_keys=False)
        (tmp / CONFIG_FILE).write_text(config)
        if folder.exists():
            old = folder.rename(tmp.with_suffix(".old"))
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
