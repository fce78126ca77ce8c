"""Transcoder sets on disk, in the upstream layouts (circuit-tracer, GemmaScope): load and save.

A set is a folder (local, or `hf://org/repo[/sub][@rev]`) holding `config.yaml` and weight files.
- `model_kind: transcoder_set` (per-layer): one file per layer, listed under `transcoders:` (paths
  relative to the folder, absolute local paths, or hf:// URIs into any repo) or, without that key,
  the folder's `layer_{i}.safetensors`. A safetensors file holds `W_enc` (d_transcoder, d_model),
  `W_dec` (d_transcoder, d_model), `b_enc`, `b_dec`, optional `activation_function.threshold` (or
  `threshold`) and `W_skip` (d_model, d_model; used as x @ W_skip.T). GemmaScope's `params.npz`
  uses the same names but stores `W_enc` as (d_model, d_transcoder); GemmaScope-2 files use
  lower-case names (see `tracer.transcoders.tensors`).
- `model_kind: cross_layer_transcoder`: `W_enc_{i}.safetensors` (`W_enc_{i}`, `b_enc_{i}`,
  `b_dec_{i}`, optional `threshold_{i}`, and ours: `W_skip_{i}` (d_model, d_model; used as
  x @ W_skip)) and `W_dec_{i}.safetensors` (`W_dec_{i}` (d_transcoder, n_layers - i, d_model)), in
  the config's folder or in the one folder/URI that `transcoders:` names; or GemmaScope-2's one
  file per source layer, listed under `transcoders:`.
- Instead of listing files, a config may name where they are: `repo_id` (a hub model repo),
  `subfolder` and `revision` (circuit-tracer's keys); the `layer_{i}` or `W_enc_{i}`/`W_dec_{i}`
  files are then read from that folder.

config.yaml keys: upstream `model_name`, `model_kind`, `feature_input_hook` and
`feature_output_hook` (both required), `scan` (kept verbatim), `transcoders`, `repo_id`,
`subfolder`, `revision`; ours, optional: `activation` (relu | jumprelu | topk; default jumprelu
when the files carry a threshold, else relu) and `top_k` (circuit-tracer spells it `k`; both are
read). Other keys are ignored.

Loading goes in two steps: `read_layout` reads the config and works out which file holds each
layer (hub folders are listed, nothing is downloaded but config.yaml), refusing bad entries and
pickles; then the files are downloaded (hub) and their headers read, so a bad set fails at load;
a layer's weights are read only on first use. Nothing is ever unpickled: `.pt`/`.bin`/pickle files
are refused and npz files are read with allow_pickle=False.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch
import yaml
from safetensors.torch import save_file

from tracer.hub import (
    HfRef,
    cached_commit,
    is_hf_uri,
    list_folder,
    parse_hf_uri,
    pin,
    resolve_repo_path,
)
from tracer.model.families import check_hook
from tracer.transcoders.sets import ACTIVATIONS, TranscoderSet
from tracer.transcoders.tensors import (
    PLT_THRESHOLD_KEYS,
    Header,
    Location,
    Recipe,
    TranscoderFileError,
    check_shapes,
    check_weight_name,
    clt_layer_recipe,
    clt_recipe,
    layer_loader,
    plt_recipe,
    read_header,
)

CONFIG_FILE = "config.yaml"
MODEL_KINDS = {"transcoder_set": False, "cross_layer_transcoder": True}  # kind -> cross_layer
LOCATION_KEYS = ("repo_id", "subfolder", "revision")  # a config naming where its files are
_ACTIVATION_ALIASES = {"jump_relu": "jumprelu"}  # circuit-tracer's spelling


# ---- layouts: which file holds each layer ------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A set's config and, per layer, the files holding its weights: `(file,)` for a per-layer
    set or a GemmaScope-2 cross-layer file, `(W_enc file, W_dec file)` for a CLT.

    `folder` is the config's folder: a local path, or a hub folder pinned to the config's commit.
    Hub files are `HfRef`s until `download` turns them into local paths."""

    source: str
    folder: Path | HfRef
    config: dict
    cross_layer: bool
    layers: tuple[tuple[Location, ...], ...]

    @property
    def files(self) -> list[Location]:
        return list(dict.fromkeys(f for layer in self.layers for f in layer))

    @property
    def commit(self) -> str | None:
        return self.folder.revision if isinstance(self.folder, HfRef) else None


def read_layout(path_or_uri: str | Path, *, revision: str | None = None) -> Layout:
    """Read a set's config (downloading only config.yaml) and locate every layer's files.

    Bad entries, pickles and missing layer files fail here, before any weights are fetched."""
    source = str(path_or_uri)
    if is_hf_uri(source):
        ref = parse_hf_uri(source)
        if revision is not None and ref.revision not in (None, revision):
            raise ValueError(
                f"{source} pins revision {ref.revision!r} but revision={revision!r} was given"
            )
        ref = HfRef(ref.repo_id, ref.path_in_repo, ref.revision or revision)
        config_file = resolve_repo_path(ref.child(CONFIG_FILE))
        # Pin the commit the config came from, so later files cannot come from a moved branch.
        folder: Path | HfRef = replace(ref, revision=cached_commit(config_file) or ref.revision)
    else:
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies only to hf:// URIs, not {source!r}")
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"transcoder set {folder} is not a folder; expected a folder with {CONFIG_FILE} "
                "or an hf://org/repo[/sub][@revision] URI"
            )
        config_file = folder / CONFIG_FILE
    config = _read_config(config_file)
    cross_layer = MODEL_KINDS[config["model_kind"]]
    where = _files_folder(config, folder, config_file)
    find = _clt_layers if cross_layer else _plt_layers
    layers = find(config, where, config_file)
    return Layout(source, folder, config, cross_layer, tuple(layers))


def download(layout: Layout) -> dict[Location, Path]:
    """Local paths of the layout's files: hub files downloaded into huggingface_hub's cache, each
    repo's branch or tag resolved to one commit first (so all files of a repo come from it)."""
    pins: dict = {}
    return {f: resolve_repo_path(pin(f, pins)) if isinstance(f, HfRef) else f for f in layout.files}


def pinned(layout: Layout) -> Layout:
    """The layout with every hub file at a commit sha (one lookup per repo and branch)."""
    pins: dict = {}
    layers = tuple(
        tuple(pin(f, pins) if isinstance(f, HfRef) else f for f in layer) for layer in layout.layers
    )
    return replace(layout, layers=layers)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*"))[:8]
        raise FileNotFoundError(
            f"{path.parent} has no {CONFIG_FILE} (found: {found}); a transcoder set folder needs "
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


def _files_folder(config: dict, folder: Path | HfRef, config_file: Path) -> Path | HfRef:
    """Where unlisted files are: the config's folder, or the hub folder its location keys name."""
    named = {k: config[k] for k in LOCATION_KEYS if config.get(k) is not None}
    if not named:
        return folder
    if "repo_id" not in named:
        raise TranscoderFileError(
            f"{config_file}: {sorted(named)} given without repo_id; name the hub repo the files "
            "are in, or drop these keys"
        )
    if config.get("transcoders") is not None:
        raise TranscoderFileError(
            f"{config_file}: give either transcoders: (the files) or repo_id/subfolder/revision "
            "(where the files are), not both"
        )
    for key, value in named.items():
        if not isinstance(value, str) or not value:
            raise TranscoderFileError(f"{config_file}: {key} must be a string, got {value!r}")
    try:
        repo = parse_hf_uri(f"hf://{named['repo_id']}")
        if repo.path_in_repo or repo.revision:
            raise ValueError(f"repo_id {named['repo_id']!r} must be 'org/name' only")
        folder = repo.child(named.get("subfolder", "")).path_in_repo
    except ValueError as e:
        raise TranscoderFileError(f"{config_file}: repo_id/subfolder: {e}") from None
    # One commit for the listing and every file in it.
    return pin(HfRef(repo.repo_id, folder, named.get("revision")), {})


def _entry(where: Path | HfRef, entry: object, what: str, config_file: Path) -> Location:
    """One `transcoders:` entry: a path relative to the config's folder, an absolute local path
    (local configs only) or an hf:// URI."""
    if not isinstance(entry, str) or not entry.strip():
        raise TranscoderFileError(
            f"{config_file}: {what} must be a path or an hf://org/repo/path[@revision] URI, got "
            f"{entry!r}"
        )
    try:
        if is_hf_uri(entry):
            return parse_hf_uri(entry)
        if "://" in entry:
            raise ValueError("only hf:// URIs name files elsewhere")
        if Path(entry).is_absolute():
            if isinstance(where, HfRef):
                raise ValueError("a config on the hub cannot name a local path")
            return Path(entry)
        return _child(where, entry)
    except ValueError as e:
        raise TranscoderFileError(
            f"{config_file}: {what} {entry!r} is neither a path inside the set nor an "
            f"hf://org/repo/path[@revision] URI: {e}"
        ) from None


def _child(where: Path | HfRef, name: str) -> Location:
    return where.child(name) if isinstance(where, HfRef) else where / name


def _names(where: Path | HfRef) -> list[str]:
    if isinstance(where, HfRef):
        return list_folder(where)
    if not where.is_dir():
        raise FileNotFoundError(f"transcoder folder {where} does not exist")
    return sorted(p.name for p in where.iterdir() if p.is_file())


def _indexed(where: Path | HfRef, names: list[str], pattern: str, describe: str) -> list[str]:
    """Names `pattern` (with one `{i}`) for i = 0..n-1, requiring no gaps."""
    regex = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)"))
    found = {}
    for name in fnmatch.filter(names, pattern.replace("{i}", "*")):
        m = regex.fullmatch(name)
        if m:
            found[int(m.group(1))] = name
    shown = where.uri if isinstance(where, HfRef) else where
    if not found:
        raise FileNotFoundError(f"{shown}: no {pattern} files ({describe})")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(f"{shown}: {pattern.format(i=missing[0])} is missing ({describe})")
    return [found[i] for i in range(len(found))]


def _plt_layers(config: dict, where: Path | HfRef, config_file: Path) -> list[tuple[Location]]:
    entries = config.get("transcoders")
    if entries is None:
        names = _indexed(
            where, _names(where), "layer_{i}.safetensors", "config lists no transcoders"
        )
        return [(_child(where, n),) for n in names]
    if not isinstance(entries, list) or not entries:
        raise TranscoderFileError(f"{config_file}: transcoders must be a list of files")
    files = [_entry(where, e, f"transcoders[{i}]", config_file) for i, e in enumerate(entries)]
    for f in files:
        check_weight_name(f)
    return [(f,) for f in files]


def _clt_layers(config: dict, where: Path | HfRef, config_file: Path) -> list[tuple[Location, ...]]:
    entries = config.get("transcoders")
    if isinstance(entries, list) and len(entries) > 1:  # GemmaScope-2: one file per source layer
        return _plt_layers(config, where, config_file)
    if isinstance(entries, list):
        entries = entries[0] if entries else None
    if entries is not None:
        where = _entry(where, entries, "transcoders", config_file)
        name = where.path_in_repo if isinstance(where, HfRef) else where.name
        if PurePosixPath(name).suffix:  # one file: a GemmaScope-2 CLT of a single layer
            check_weight_name(where)
            return [(where,)]
    names = _names(where)
    encoders = _indexed(where, names, "W_enc_{i}.safetensors", "cross-layer encoders")
    for i in range(len(encoders)):
        if f"W_dec_{i}.safetensors" not in names:
            shown = where.uri if isinstance(where, HfRef) else where
            raise FileNotFoundError(
                f"{shown}: W_dec_{i}.safetensors is missing (the decoder of layer {i}, next to "
                f"W_enc_{i}.safetensors)"
            )
    return [
        (_child(where, e), _child(where, f"W_dec_{i}.safetensors")) for i, e in enumerate(encoders)
    ]


# ---- loading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetShape:
    """What a set's config and file headers say, without its weights."""

    n_layers: int
    d_model: int
    d_transcoder: int
    cross_layer: bool
    activation: str
    top_k: int | None
    feature_input_hook: str
    recipes: list[Recipe]


def describe(layout: Layout, headers: dict[Location, Header]) -> SetShape:
    """Shapes, activation and per-layer tensor recipes from the files' headers (checked)."""
    recipes = []
    for i, files in enumerate(layout.layers):
        if not layout.cross_layer:
            recipes.append(plt_recipe(files[0], headers[files[0]]))
        elif len(files) == 1:
            recipes.append(clt_layer_recipe(files[0], headers[files[0]]))
        else:
            enc, dec = files
            recipes.append(clt_recipe(i, enc, headers[enc], dec, headers[dec]))
    d_model, d_transcoder = check_shapes(recipes, headers, layout.cross_layer)
    activation, top_k = _activation(layout.config, recipes, layout.source)
    return SetShape(
        len(recipes),
        d_model,
        d_transcoder,
        layout.cross_layer,
        activation,
        top_k,
        layout.config["feature_input_hook"],
        recipes,
    )


def _activation(config: dict, recipes: list[Recipe], where: str) -> tuple[str, int | None]:
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
    `revision` is the resolved commit of its config.
    """
    layout = read_layout(path_or_uri, revision=revision)
    local = download(layout)
    layout = replace(layout, layers=tuple(tuple(local[f] for f in la) for la in layout.layers))
    shape = describe(layout, {path: read_header(path) for path in layout.files})
    ts = TranscoderSet(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        d_transcoder=shape.d_transcoder,
        activation=shape.activation,
        cross_layer=shape.cross_layer,
        feature_input_hook=layout.config["feature_input_hook"],
        feature_output_hook=layout.config["feature_output_hook"],
        top_k=shape.top_k,
        model_name=layout.config.get("model_name"),
        source=layout.source,
        revision=layout.commit,
        dtype=dtype,
        loader=layer_loader(shape.recipes),
    )
    ts.scan = layout.config.get("scan")
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
