"""The feature pages' dataset: fetched into a DVC output, then read text by text.

`features.dataset` is a local `.txt` (one text per line) or `.jsonl` file (a `text_field` per
record) inside `zoo/corpus/` or `datasets/` (folders the dataset stage depends on, so DVC sees a
change of content), or a file of a hub dataset repo, `hf://datasets/ORG/NAME/PATH`, at
`features.dataset_revision` (a branch is resolved to its commit once, when the params change; pin a
commit). `fetch_dataset` copies or downloads it into the stage's folder, checked against the hub's
checksum, and records source, commit and sha256 in `dataset.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tracer.atomic import write_json
from tracer.experiments.params import SUFFIXES, check_dataset_spec, parse_dataset_uri

RECORD_FILE = "dataset.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_dataset(spec: str, revision: str | None, folder: Path) -> dict:
    """Copy or download the dataset into `folder` (an empty folder: the caller swaps it in);
    returns the record written to `folder/dataset.json`."""
    check_dataset_spec(spec)
    name = "texts" + PurePosixPath(spec).suffix
    if spec.startswith("hf://"):
        record = _download(spec, revision, folder / name)
    else:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"dataset {spec} does not exist")
        shutil.copyfile(spec, folder / name)
        record = {"source": spec, "revision": None}
    record |= {"file": name, "sha256": file_sha256(folder / name)}
    write_json(folder / RECORD_FILE, record)
    return record


def _download(uri: str, revision: str | None, dest: Path) -> dict:
    from huggingface_hub import HfApi, hf_hub_download

    from tracer.hub import HUB_ERRORS, error_reason, repo_files

    repo_id, path = parse_dataset_uri(uri)
    where = f"{uri} at revision {revision or 'main'!r}"
    try:
        commit = HfApi().dataset_info(repo_id, revision=revision).sha
        local = Path(hf_hub_download(repo_id, path, repo_type="dataset", revision=commit))
    except HUB_ERRORS as error:
        raise ValueError(f"cannot fetch the dataset {where}: {error_reason(error)}") from None
    listed = repo_files(repo_id, commit, repo_type="dataset").get(path)
    if listed is None:
        raise ValueError(f"cannot fetch the dataset {where}: the repo does not list {path!r}")
    expected = listed.lfs.sha256 if listed.lfs is not None else listed.blob_id
    actual = file_sha256(local) if listed.lfs is not None else _git_blob_sha1(local)
    if actual != expected:
        local.unlink(missing_ok=True)  # a bad download must not stay in the cache
        raise ValueError(
            f"dataset file {path!r} of {repo_id} at {commit}: checksum {actual} does not "
            f"match the hub's {expected}; nothing was written"
        )
    shutil.copyfile(local, dest)
    return {"source": uri, "revision": commit}


def dataset_record(folder: Path) -> dict:
    """What the dataset stage fetched into `folder`: source, revision, file, sha256."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the dataset stage (`dvc repro`)")
    return json.loads(path.read_text())


def fetched_texts(folder: Path, text_field: str = "text") -> Iterator[str]:
    """The texts of the dataset the dataset stage fetched into `folder`."""
    return read_texts(Path(folder) / dataset_record(folder)["file"], text_field)


def read_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The non-blank texts of a dataset file, in order; clear errors for what cannot be read."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"dataset {path} must be a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (give a .txt or .jsonl file)")
    found = False
    with open(path, encoding="utf-8") as handle:  # streamed: a dataset may be large
        try:
            for number, line in enumerate(handle, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    line = _record_text(path, number, line, text_field)
                found = True
                yield line
        except UnicodeDecodeError as error:
            raise ValueError(f"dataset {path} is not UTF-8 text: {error.reason}") from None
    if not found:
        raise ValueError(f"dataset {path} is empty: no non-blank text")


def _record_text(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"dataset {path}:{number}: not a JSON record ({error.msg})") from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(
            f"dataset {path}:{number}: expected an object with a string {field!r} field"
        )
    return text
