"""Fetching a profile's model and transcoder set: pinned to a commit, checksummed, recorded.

A local folder is recorded as it is, with a content hash. A hub model id (`org/name`) or an
`hf://org/repo[/sub][@rev]` transcoder set is downloaded into the huggingface_hub cache at the
requested revision, the revision is resolved to the commit actually served, and every downloaded
file is checked against the checksums the hub lists for that commit (huggingface_hub itself only
checks sizes): LFS files by their sha256, small files by their git blob sha1. A file that does not
match is deleted from the cache before the error is raised, so a retry downloads it again.

The hub's listing is kept next to the cached repo (`checksums/<sha>.json`; a commit never changes),
so fetching again at a pinned commit makes no request at all and still re-checks the local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi, RepoFile, snapshot_download

from tracer.atomic import write_json
from tracer.hub import HUB_ERRORS, HfRef, cached_commit, is_hf_uri, parse_hf_uri, resolve_model
from tracer.hub import error_reason as hub_error_reason

# What a model needs to load with transformers: config, weights and tokenizer files, nothing else.
MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
]
TRANSCODER_CONFIG = "config.yaml"
_CHUNK = 1 << 20


class FetchError(ValueError):
    """A model or transcoder set that could not be fetched or failed its checksum."""


def fetch_profile(
    model: str,
    transcoders: str,
    *,
    revision: str | None = None,
    transcoder_revision: str | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Fetch both parts of a profile; returns {"model": record, "transcoders": record}.

    A record is {"source", "revision" (commit sha, None for a local folder), "path" (local
    folder), "sha256" (content hash of that folder, see `folder_sha256`)}.
    """
    return {
        "model": fetch_model(model, revision=revision, cache_dir=cache_dir),
        "transcoders": fetch_transcoders(
            transcoders, revision=transcoder_revision, cache_dir=cache_dir
        ),
    }


def fetch_model(model: str, *, revision: str | None, cache_dir: Path | None) -> dict:
    """A local model folder, or a hub model repo downloaded at `revision` and verified."""
    resolved = resolve_model(model, revision=revision)
    if isinstance(resolved, Path):
        return _record(model, None, resolved)
    ref = HfRef(resolved, "", revision)
    root = _download(ref, MODEL_PATTERNS, cache_dir)
    for required in ("config.json", "*.safetensors"):
        if not any(root.glob(required)):
            raise _error(ref, f"no {required} in the repo; a model needs config and weights")
    return _verified_record(model, ref, root, root)


def fetch_transcoders(transcoders: str, *, revision: str | None, cache_dir: Path | None) -> dict:
    """A local transcoder folder, or an `hf://` transcoder set downloaded and verified."""
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
        return _record(transcoders, None, folder)
    ref = parse_hf_uri(transcoders)
    if revision is not None and ref.revision not in (None, revision):
        raise FetchError(
            f"{transcoders} pins revision {ref.revision!r} but revision={revision!r} was given"
        )
    ref = HfRef(ref.repo_id, ref.path_in_repo, ref.revision or revision)
    sub = ref.path_in_repo
    root = _download(ref, [f"{sub}/*"] if sub else None, cache_dir)
    folder = root / sub if sub else root
    if not (folder / TRANSCODER_CONFIG).is_file():
        where = f"{sub}/{TRANSCODER_CONFIG}" if sub else TRANSCODER_CONFIG
        raise _error(ref, f"file {where!r} not found in the repo at commit {root.name}")
    return _verified_record(transcoders, ref, root, folder)


def folder_sha256(folder: Path) -> str:
    """sha256 over the folder's sorted relative paths, each followed by its file's sha256."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode() + b"\n")
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


# ---- hub -----------------------------------------------------------------------------------------
def materialize(record: dict, dest: Path) -> dict:
    """Copy a fetched hub folder out of the huggingface_hub cache into `dest`; the new record.

    Hard links where the filesystem allows (no second copy of the weights on disk), else copies.
    The folder then belongs to the caller, e.g. as a DVC-cached output that `dvc push` / `dvc
    pull` move to machines without hub access; its content hash is the record's.
    """
    source, dest = Path(record["path"]), Path(dest)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copyfile(path, target)
    return {**record, "path": str(dest)}


def _error(ref: HfRef, reason: str) -> FetchError:
    return FetchError(
        f"cannot fetch repo {ref.repo_id!r} at revision {ref.revision or 'main'!r}: {reason}"
    )


def _download(ref: HfRef, patterns: list[str] | None, cache_dir: Path | None) -> Path:
    """Download the matching files into the cache; returns the snapshot folder (named by sha)."""
    try:
        root = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=patterns, cache_dir=cache_dir
        )
    # A persistently truncated download ends in a bare transport error after retries.
    except (*HUB_ERRORS, OSError) as e:
        raise _error(ref, hub_error_reason(e)) from e
    root = Path(root)
    if cached_commit(root) is None:
        raise _error(ref, f"the download {root} is not a snapshot named by its commit sha")
    return root


def _verified_record(source: str, ref: HfRef, root: Path, folder: Path) -> dict:
    _verify(ref, root)
    return _record(source, root.name, folder)


def _record(source: str, revision: str | None, folder: Path) -> dict:
    return {
        "source": source,
        "revision": revision,
        "path": str(folder),
        "sha256": folder_sha256(folder),
    }


def _verify(ref: HfRef, root: Path) -> None:
    """Check every file of the snapshot `root` against the hub's checksums at its commit."""
    sha = root.name
    expected = _expected_checksums(ref, root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
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


def _expected_checksums(ref: HfRef, root: Path) -> dict[str, tuple[str, str]]:
    """{path: (algorithm, hex digest)} listed by the hub at the snapshot's commit, kept on disk."""
    sha = root.name
    # snapshots/<sha> -> the repo's cache folder; huggingface_hub's cache scan ignores other folders.
    record = root.parent.parent / "checksums" / f"{sha}.json"
    if record.is_file():
        return {path: tuple(entry) for path, entry in json.loads(record.read_text()).items()}
    pinned = HfRef(ref.repo_id, ref.path_in_repo, sha)
    try:
        tree = HfApi().list_repo_tree(ref.repo_id, revision=sha, recursive=True)
        expected = {
            entry.path: ("sha256", entry.lfs.sha256) if entry.lfs else ("git-sha1", entry.blob_id)
            for entry in tree
            if isinstance(entry, RepoFile)
        }
    except (*HUB_ERRORS, OSError) as e:
        raise _error(pinned, f"cannot list checksums: {hub_error_reason(e)}") from e
    write_json(record, expected)
    return expected


def _evict(path: Path) -> None:
    """Delete a cached file: the snapshot link and the blob it points to (or the plain file)."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink()
    if blob is not None:
        blob.unlink(missing_ok=True)
