"""The feature pages' dataset: local files copied, hub dataset files downloaded at a pinned
commit and checked against the hub's checksum (a fake hub on 127.0.0.1), and bad specs refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hub_server import FakeHubServer, point_client_at

from tracer.atomic import write_folder
from tracer.experiments.datasets import dataset_record, fetch_dataset, fetched_texts
from tracer.experiments.params import check_dataset_spec

TEXTS = ["the capital of texas is austin", "tampa is a city in florida", "three four five"]
JSONL = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)).encode()
URI = "hf://datasets/org/texts/data/train.jsonl"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHubServer() as server:
        server.add_repo("datasets/org/texts", {"data/train.jsonl": JSONL, "README.md": b"# t\n"})
        point_client_at(server, monkeypatch, tmp_path / "hf-home")
        yield server


def test_hub_dataset_is_pinned_checked_and_read(hub: FakeHubServer, tmp_path: Path):
    sha = hub.repos["datasets/org/texts"][0]["main"]
    folder = tmp_path / "dataset"
    write_folder(folder, lambda f: fetch_dataset(URI, "main", f))
    record = dataset_record(folder)
    assert record["source"] == URI and record["revision"] == sha  # the branch, resolved once
    assert record["sha256"] == hashlib.sha256(JSONL).hexdigest()
    assert (folder / record["file"]).read_bytes() == JSONL
    assert list(fetched_texts(folder)) == TEXTS


def test_corrupt_download_fails_and_keeps_the_previous_dataset(hub, tmp_path: Path):
    folder = tmp_path / "dataset"
    write_folder(folder, lambda f: fetch_dataset(URI, "main", f))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    hub.add_repo("datasets/org/texts", {"data/train.jsonl": JSONL + b'{"text": "new"}\n'})
    hub.corrupt.add(("datasets/org/texts", "data/train.jsonl"))
    with pytest.raises(ValueError, match="checksum .* does not match the hub's"):
        write_folder(folder, lambda f: fetch_dataset(URI, "main", f))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "hf-home"]  # no temporary


@pytest.mark.parametrize(
    ("uri", "revision", "message"),
    [
        (URI, "no-such-branch", "cannot fetch the dataset"),
        ("hf://datasets/org/missing/train.jsonl", None, "cannot fetch the dataset"),
        ("hf://datasets/org/texts/data/other.jsonl", None, "cannot fetch the dataset"),
    ],
)
def test_unresolvable_hub_datasets(hub, tmp_path: Path, uri, revision, message):
    with pytest.raises(ValueError, match=message):
        fetch_dataset(uri, revision, tmp_path)


def test_local_dataset_is_copied_with_its_checksum(tmp_path: Path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    record = fetch_dataset("zoo/corpus/train.txt", None, folder)
    data = Path("zoo/corpus/train.txt").read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert (folder / record["file"]).read_bytes() == data


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("texts.jsonl", "inside zoo/corpus or datasets/"),
        ("/tmp/texts.txt", "inside zoo/corpus or datasets/"),
        ("datasets/../texts.txt", "inside zoo/corpus or datasets/"),
        ("datasets/texts.csv", ".txt or .jsonl"),
        ("hf://org/model/texts.txt", "hf://datasets/ORG/NAME/FILE"),
        ("hf://datasets/org/texts/data.txt@main", "features.dataset_revision"),
        ("hf://datasets/org/texts.txt", "names no file"),
    ],
)
def test_bad_dataset_specs(spec, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("/", "/")):
        check_dataset_spec(spec)
