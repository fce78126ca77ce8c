"""Fetching a profile's model and transcoder set: pinned to commits, checksummed, recorded.

A local folder is recorded as it is, with a content hash. A hub model id (`org/name`) is downloaded
into the huggingface_hub cache at the requested revision. An `hf://org/repo[/sub][@rev]`
transcoder set is fetched with its whole closure: the config's own files, `hf://` URIs into other
repos and the folder its `repo_id`/`subfolder`/`revision` keys name (`tracer.transcoders.files`
works out which files those are), each repo's branch resolved to a commit once. Every downloaded
file is checked against the checksum the hub lists for its commit (huggingface_hub itself only
checks sizes): LFS files by their sha256, small files by their git blob sha1. A file that does not
match is deleted from the cache before the error, which names it, is raised, so a retry downloads
it again.

Before any weights are downloaded, the set's config is read, its entries checked (paths, hf://
URIs, no pickles) and its layer count compared with the model's config: bad input fails with
nothing fetched.

A hub transcoder set is laid out in a folder of its own (kept beside its cached repo): its files
plus a rewritten config.yaml whose `transcoders:` entries are paths inside that folder, so loading
it needs no hub. `materialize` copies a fetched folder (that one, or a model's snapshot) into a
DVC-cached stage output.

The hub's listing is kept next to the cached repo (`checksums/<sha>.json`; a commit never changes),
so fetching again at a pinned commit makes no request at all and still re-checks the local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml
from huggingface_hub import snapshot_download

from tracer.atomic import write_folder, write_json
from tracer.hub import (
    HUB_ERRORS,
    MODEL_PATTERNS,
    HfRef,
    HubError,
    cached_commit,
    is_commit,
    is_hf_uri,
    repo_cache,
    repo_files,
    resolve_model,
    resolve_repo_path,
)
from tracer.hub import error_reason as hub_error_reason
from tracer.transcoders.files import (
    CONFIG_FILE,
    LOCATION_KEYS,
    Layout,
    download,
    pinned,
    read_layout,
)
from tracer.transcoders.tensors import TranscoderFileError

_CHUNK = 1 << 20
HUB_FOLDER = "hub"  # files from other repos go to hub/<org>/<repo>/<path> in a fetched set


class FetchError(ValueError):
    """A model or transcoder set that could not be fetched or failed its checksum."""


def fetch_profile(
    model: str,
    transcoders: str,
    *,
    revision: str | None = None,
    transcoder_revision: str | None = None,
) -> dict:
    """Fetch both parts of a profile; returns {"model": record, "transcoders": record}.

    A record is {"source", "revision" (commit sha, None for a local folder), "path" (local
    folder), "sha256" (content hash of that folder, see `folder_sha256`)}; a hub transcoder set's
    record also lists its "files" (name in the folder, pinned hf:// URI, checksum), and its folder
    is the set laid out with its rewritten config.yaml.
    """
    layout = _transcoder_layout(transcoders, transcoder_revision)
    if layout is not None:
        _check_layer_count(model, revision, layout)
    return {
        "model": fetch_model(model, revision=revision),
        "transcoders": fetch_transcoders(transcoders, revision=transcoder_revision, layout=layout),
    }


def fetch_model(model: str, *, revision: str | None) -> dict:
    """A local model folder, or a hub model repo downloaded at `revision` and verified."""
    resolved = resolve_model(model, revision=revision)
    if isinstance(resolved, Path):
        return _record(model, None, resolved)
    ref = HfRef(resolved, "", revision)
    try:
        root = Path(
            snapshot_download(ref.repo_id, revision=revision, allow_patterns=MODEL_PATTERNS)
        )
    # A persistently truncated download ends in a bare transport error after retries.
    except (*HUB_ERRORS, OSError) as e:
        raise _error(ref, hub_error_reason(e)) from e
    if cached_commit(root) is None:
        raise _error(ref, f"the download {root} is not a snapshot named by its commit sha")
    for required in ("config.json", "*.safetensors"):
        if not any(root.glob(required)):
            raise _error(ref, f"no {required} in the repo; a model needs config and weights")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        _verify(HfRef(ref.repo_id, path.relative_to(root).as_posix(), root.name), path)
    return _record(model, root.name, root)


def fetch_transcoders(
    transcoders: str, *, revision: str | None, layout: Layout | None = None
) -> dict:
    """A local transcoder folder, or an `hf://` set's closure downloaded and verified.

    `layout` is the set's already read layout (`fetch_profile` reads it before the model)."""
    if not is_hf_uri(transcoders):
        folder = Path(transcoders).expanduser()
        if not folder.is_dir():
            raise FetchError(
                f"transcoders {transcoders!r} is neither an existing local folder nor an "
                "hf://org/repo[/sub][@revision] URI"
            )
        if revision is not None:
            raise FetchError(
                f"transcoders {transcoders!r} is a local folder; a revision ({revision!r}) only "
                "applies to hf:// URIs"
            )
        try:
            local_layout = read_layout(folder)
        except (TranscoderFileError, FileNotFoundError, ValueError) as e:
            raise FetchError(f"cannot fetch transcoders {transcoders}: {e}") from e
        if not any(isinstance(f, HfRef) for f in local_layout.files):
            return _record(transcoders, None, folder)
        # a local config naming hub files: its closure is fetched and laid out like a hub set's
        try:
            layout = pinned(local_layout)
        except HubError as e:
            raise FetchError(f"cannot fetch transcoders {transcoders}: {e}") from e
    layout = layout or _transcoder_layout(transcoders, revision)
    for ref in layout.files:  # every file listed at its commit, before anything is downloaded
        if (
            isinstance(ref, HfRef)
            and is_commit(ref.revision)
            and ref.path_in_repo not in _expected_checksums(ref)
        ):
            raise _error(
                ref, f"file {ref.path_in_repo!r} (named by the set's config) is not in the repo"
            )
    try:
        local = download(layout)
    except (HubError, OSError) as e:
        raise FetchError(f"cannot fetch transcoders {transcoders}: {e}") from e
    files, sources = [], {}
    for ref in layout.files:
        path, name = local[ref], _name_in_folder(layout, ref)
        if isinstance(ref, Path):  # a file beside a local config
            files.append({"name": name, "path": str(ref), "sha256": file_sha256(ref)})
        else:
            pinned_ref = HfRef(ref.repo_id, ref.path_in_repo, cached_commit(path) or ref.revision)
            algorithm, checksum = _verify(pinned_ref, path)
            files.append({"name": name, "uri": pinned_ref.uri, algorithm: checksum})
        sources[name] = path
    config = yaml.safe_dump(_rewritten_config(layout, files), sort_keys=False).encode()
    sha256 = _entries_sha256(sources | {CONFIG_FILE: config})
    # The laid out set is kept beside the cached config repo, named by its content, so a second
    # fetch of the same closure reuses it; `materialize` copies it into a stage output.
    first_repo = next(f.repo_id for f in layout.files if isinstance(f, HfRef))
    folder = repo_cache(first_repo) / "sets" / sha256[:32]
    if not folder.is_dir() or folder_sha256(folder) != sha256:
        write_folder(folder, lambda tmp: _place(sources | {CONFIG_FILE: config}, tmp))
    return {
        "source": transcoders,
        "revision": layout.commit,
        "path": str(folder),
        "sha256": sha256,
        "files": files,
    }


def _transcoder_layout(transcoders: str, revision: str | None) -> Layout | None:
    """The hub set's layout with every file pinned (config only downloaded); None if local."""
    if not is_hf_uri(transcoders):
        return None
    try:
        layout = pinned(read_layout(transcoders, revision=revision))
    except (HubError, TranscoderFileError, FileNotFoundError, ValueError) as e:
        raise FetchError(f"cannot fetch transcoders {transcoders}: {e}") from e
    if any(not isinstance(f, HfRef) for f in layout.files):
        raise FetchError(f"transcoders {transcoders}: a hub set cannot name local files")
    return layout


def _check_layer_count(model: str, revision: str | None, layout: Layout) -> None:
    """The set must have one transcoder per model layer; read from config.json only."""
    from transformers import AutoConfig

    resolved = resolve_model(model, revision=revision)
    if isinstance(resolved, Path):
        folder = resolved
    else:
        ref = HfRef(resolved, "config.json", revision)
        try:
            folder = resolve_repo_path(ref).parent
        except HubError as e:
            raise _error(ref, str(e)) from e
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FetchError(f"cannot read the config of model {model!r}: {e}") from e
    n_layers = config.get_text_config().num_hidden_layers
    if len(layout.layers) != n_layers:
        raise FetchError(
            f"transcoders {layout.source} have {len(layout.layers)} layers but model {model!r} "
            f"has {n_layers}; the config must give one transcoder per layer (nothing was fetched)"
        )


def _name_in_folder(layout: Layout, ref: HfRef | Path) -> str:
    """Where a file goes in the fetched folder: its path below the config's folder, else
    hub/<repo>/<path>; a CLT's W_enc_{i}/W_dec_{i} pairs at the top, as upstream reads them."""
    if isinstance(ref, Path):  # beside a local config
        if layout.cross_layer and len(layout.layers[0]) == 2:
            return ref.name
        return ref.relative_to(layout.folder).as_posix()
    if layout.cross_layer and len(layout.layers[0]) == 2:
        return ref.path_in_repo.rpartition("/")[2]
    folder = layout.folder
    if isinstance(folder, HfRef):
        prefix = f"{folder.path_in_repo}/" if folder.path_in_repo else ""
        if ref.repo_id == folder.repo_id and ref.path_in_repo.startswith(prefix):
            return ref.path_in_repo[len(prefix) :]
    return f"{HUB_FOLDER}/{ref.repo_id}/{ref.path_in_repo}"


def _rewritten_config(layout: Layout, files: list[dict]) -> dict:
    """The set's config with its files named inside the fetched folder, and nothing else."""
    config = {k: v for k, v in layout.config.items() if k not in (*LOCATION_KEYS, "transcoders")}
    by_ref = dict(zip(layout.files, (f["name"] for f in files), strict=True))
    if not (layout.cross_layer and len(layout.layers[0]) == 2):
        config["transcoders"] = [by_ref[layer[0]] for layer in layout.layers]
    return config


def folder_sha256(folder: Path) -> str:
    """sha256 over the folder's sorted relative paths, each followed by its file's sha256."""
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return _entries_sha256(files)


def _entries_sha256(entries: dict[str, Path | bytes]) -> str:
    """`folder_sha256` of the folder that would hold `entries` (name -> file or contents)."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        content = entries[name]
        data_hash = (
            hashlib.sha256(content).hexdigest()
            if isinstance(content, bytes)
            else file_sha256(content)
        )
        digest.update(name.encode() + b"\0")
        digest.update(data_hash.encode() + b"\n")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's contents: sha1 of `blob {size}\\0` + contents."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- laying a fetch out in a folder ----------------------------------------------------------
def materialize(record: dict, dest: Path) -> dict:
    """Copy a fetched hub folder (a model snapshot, a laid out transcoder set) out of the
    huggingface_hub cache into `dest`; the new record.

    Hard links where the filesystem allows (no second copy of the weights on disk), else copies.
    The folder then belongs to the caller, e.g. as a DVC-cached output that `dvc push` / `dvc
    pull` move to machines without hub access; its content hash is the record's.
    """
    source, dest = Path(record["path"]), Path(dest)
    _place({p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}, dest)
    if folder_sha256(dest) != record["sha256"]:
        raise FetchError(f"{dest}: the laid out files differ from the verified download {source}")
    return {**record, "path": str(dest)}


def _place(entries: dict[str, Path | bytes], dest: Path) -> None:
    """Files under `dest` by name: hard links to the given files where possible, else copies;
    bytes are written as they are."""
    for name, content in sorted(entries.items()):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
            continue
        try:
            os.link(content.resolve(), target)
        except OSError:
            shutil.copyfile(content, target)


# ---- checksums --------------------------------------------------------------------------------
def _error(ref: HfRef, reason: str) -> FetchError:
    return FetchError(
        f"cannot fetch repo {ref.repo_id!r} at revision {ref.revision or 'main'!r}: {reason}"
    )


def _verify(ref: HfRef, path: Path) -> tuple[str, str]:
    """Check the downloaded `path` of `ref` (at a commit) against the hub's checksum; returns
    (algorithm, digest). A mismatch evicts the file from the cache and names it."""
    sha = ref.revision
    expected = _expected_checksums(ref)
    name = ref.path_in_repo
    if name not in expected:
        raise _error(ref, f"file {name!r} is in the cache but not listed at commit {sha}")
    algorithm, want = expected[name]
    got = file_sha256(path) if algorithm == "sha256" else git_blob_sha1(path)
    if got != want:
        _evict(path)
        raise _error(
            ref,
            f"file {name!r} at commit {sha} failed its checksum ({algorithm} {got}, hub lists "
            f"{want}); the corrupt download was removed from the cache, fetch again",
        )
    return algorithm, want


def _expected_checksums(ref: HfRef) -> dict[str, tuple[str, str]]:
    """{path: (algorithm, hex digest)} listed by the hub for `ref`'s repo at its commit, kept on
    disk next to the cached repo."""
    repo_id, sha = ref.repo_id, ref.revision
    # huggingface_hub's cache scan ignores folders other than blobs/refs/snapshots.
    record = repo_cache(repo_id) / "checksums" / f"{sha}.json"
    if record.is_file():
        return {path: tuple(entry) for path, entry in json.loads(record.read_text()).items()}
    try:
        listed = repo_files(repo_id, sha)
    except HubError as e:
        raise _error(HfRef(repo_id, "", sha), f"cannot list checksums: {e}") from e
    expected = {
        path: ("sha256", entry.lfs.sha256) if entry.lfs else ("git-sha1", entry.blob_id)
        for path, entry in listed.items()
    }
    write_json(record, expected)
    return expected


def _evict(path: Path) -> None:
    """Delete a cached file: the snapshot link and the blob it points to (or the plain file)."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink()
    if blob is not None:
        blob.unlink(missing_ok=True)


def _record(source: str, revision: str | None, folder: Path) -> dict:
    return {
        "source": source,
        "revision": revision,
        "path": str(folder),
        "sha256": folder_sha256(folder),
    }
