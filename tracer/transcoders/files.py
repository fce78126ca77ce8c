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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from tracer.hub import HfRef, cached_commit, is_hf_uri, parse_hf_uri, resolve_repo_path
from tracer.model.families import check_hook
from tracer.transcoders.sets import ACTIVATIONS, TranscoderSet
from tracer.transcoders.tensors import (
    PLT_THRESHOLD_KEYS,
    Header,
    Recipe,
    TranscoderFileError,
    check_shapes,
    clt_recipe,
    layer_loader,
    plt_recipe,
    read_header,
)

CONFIG_FILE = "config.yaml"
MODEL_KINDS = {"transcoder_set": False, "cross_layer_transcoder": True}  # kind -> cross_layer
_ACTIVATION_ALIASES = {"jump_relu": "jumprelu"}  # circuit-tracer's spelling


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
            headers[enc], headers[dec] = read_header(enc), read_header(dec)
            recipes.append(clt_recipe(i, enc, headers[enc], dec, headers[dec]))
    else:
        for path in _plt_files(folder, config):
            headers[path] = read_header(path)
            recipes.append(plt_recipe(path, headers[path]))
    d_model, d_transcoder = check_shapes(recipes, headers, cross_layer)
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
        loader=layer_loader(recipes),
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
