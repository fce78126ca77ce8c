"""Fetching profiles: real huggingface_hub downloads from a loopback fake hub, pinned and verified."""

from __future__ import annotations

import json
import runpy
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import FakeHubServer, point_client_at
from huggingface_hub import constants

from tracer.attribution.attribute import attribute
from tracer.experiments.fetch import FetchError, fetch_profile, folder_sha256
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders
from tracer.transcoders.files import save_transcoders

MODEL, SET = "org/tiny-gpt2", "org/tiny-plt"
WEIGHTS = "model.safetensors"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_profile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 (save_pretrained + tokenizer) and a per-layer transcoder set, as files."""
    out = tmp_path_factory.mktemp("profile")
    tokenizer = build_tokenizer()
    build_model("gpt2", vocab=len(tokenizer)).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    ts = build_transcoders("plt-relu", n_layers=2, d_model=32)
    save_transcoders(ts, out / "transcoders")
    return {"model": out / "model", "transcoders": out / "transcoders"}


@pytest.fixture
def hub(local_profile: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHubServer() as server:
        server.add_folder(MODEL, local_profile["model"])
        server.add_folder(SET, local_profile["transcoders"], prefix="layers")
        point_client_at(server, monkeypatch, tmp_path / "hf-home")
        yield server


def test_fetch_pins_the_commit_and_loads(hub: FakeHubServer, local_profile: dict[str, Path]):
    got = fetch_profile(MODEL, f"hf://{SET}/layers@main", revision="main")
    model_sha, set_sha = hub.repos[MODEL][0]["main"], hub.repos[SET][0]["main"]
    assert got["model"]["revision"] == model_sha and got["transcoders"]["revision"] == set_sha
    # Same files as the local folders, so the same content hash.
    for part in ("model", "transcoders"):
        assert got[part]["sha256"] == folder_sha256(local_profile[part])
    assert Path(got["transcoders"]["path"]).parts[-3:] == ("snapshots", set_sha, "layers")

    hub.requests.clear()
    again = fetch_profile(
        MODEL, f"hf://{SET}/layers", revision=model_sha, transcoder_revision=set_sha
    )
    assert hub.requests == []  # pinned commits: pure cache hits, checksums from the cache
    assert [again[p]["sha256"] for p in ("model", "transcoders")] == [
        got[p]["sha256"] for p in ("model", "transcoders")
    ]

    rm = ReplacementModel.from_pretrained(got["model"]["path"], got["transcoders"]["path"])
    graph = attribute([5, 6, 7], rm, progress=False)
    assert graph.adjacency_matrix.isfinite().all()


def test_corrupt_download_is_caught_and_evicted(hub: FakeHubServer):
    hub.corrupt.add((MODEL, WEIGHTS))  # same size, different bytes: the client alone accepts it
    with pytest.raises(FetchError, match=rf"'{MODEL}'.*'main'.*'{WEIGHTS}'.*checksum"):
        fetch_profile(MODEL, f"hf://{SET}/layers")
    snapshot = Path(hub_cache_repo(MODEL)) / "snapshots"
    assert not list(snapshot.rglob(WEIGHTS))
    served = bytes(b ^ 0xFF for b in hub.repos[MODEL][1][hub.repos[MODEL][0]["main"]][WEIGHTS])
    blobs = Path(hub_cache_repo(MODEL)) / "blobs"
    assert not [p for p in blobs.iterdir() if p.read_bytes() == served]

    hub.corrupt.clear()  # the server heals: the next fetch downloads the file again and passes
    got = fetch_profile(MODEL, f"hf://{SET}/layers")
    assert (Path(got["model"]["path"]) / WEIGHTS).is_file()


def hub_cache_repo(repo_id: str) -> str:
    return f"{constants.HF_HUB_CACHE}/models--{repo_id.replace('/', '--')}"


@pytest.mark.parametrize(
    ("model", "transcoders", "kwargs", "match"),
    [
        ("org/nope", f"hf://{SET}/layers", {}, r"repo 'org/nope' at revision 'main'.*not found"),
        (
            MODEL,
            f"hf://{SET}/layers",
            {"revision": "v9"},
            rf"'{MODEL}' at revision 'v9'.*not found",
        ),
        (MODEL, f"hf://{SET}/other@main", {}, rf"'{SET}' at revision 'main'.*'other/config.yaml'"),
    ],
)
def test_unresolvable_references(hub: FakeHubServer, model, transcoders, kwargs, match):
    with pytest.raises(FetchError, match=match):
        fetch_profile(model, transcoders, **kwargs)


def test_model_repo_without_weights(hub: FakeHubServer):
    hub.add_repo("org/empty", {"config.json": b"{}", "README.md": b"no weights"})
    with pytest.raises(FetchError, match=r"'org/empty' at revision 'main'.*\*\.safetensors"):
        fetch_profile("org/empty", f"hf://{SET}/layers")


def test_unreachable_server(hub: FakeHubServer, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        closed + "/{repo_id}/resolve/{revision}/{filename}",
    )
    with pytest.raises(FetchError, match=rf"'{MODEL}' at revision 'v1'.*cannot be reached"):
        fetch_profile(MODEL, f"hf://{SET}/layers", revision="v1")


def test_local_folders_are_hashed_not_copied(local_profile: dict[str, Path], tmp_path: Path):
    model = shutil.copytree(local_profile["model"], tmp_path / "model")
    first = fetch_profile(str(model), str(local_profile["transcoders"]))
    assert first["model"] == {
        "source": str(model),
        "revision": None,
        "path": str(model),
        "sha256": folder_sha256(model),
    }
    assert first["transcoders"]["revision"] is None
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    assert (
        fetch_profile(str(model), str(local_profile["transcoders"]))["model"]["sha256"]
        != (first["model"]["sha256"])
    )
    with pytest.raises(FetchError, match="neither an existing local folder nor an hf://"):
        fetch_profile(str(model), str(tmp_path / "missing"))


def test_truncated_download_becomes_a_fetch_error(hub: FakeHubServer):
    hub.truncate.add((MODEL, WEIGHTS))  # huggingface_hub retries for ~5 s, then gives up
    with pytest.raises(FetchError, match=rf"'{MODEL}' at revision 'main'.*hub request failed"):
        fetch_profile(MODEL, f"hf://{SET}/layers")


def test_stage_writes_one_record_per_profile(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profiles"] = {
        "tiny": {"model": MODEL, "revision": "main", "transcoders": f"hf://{SET}/layers"},
        "off": {"model": "org/absent", "transcoders": "hf://org/absent", "enabled": False},
    }
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)
    for name in ("tiny", "off"):
        monkeypatch.setattr(sys, "argv", ["fetch.py", name])
        runpy.run_path(str(ROOT / "pipelines" / "fetch.py"), run_name="__main__")
    off = json.loads((work / "outputs/fetched/off/fetched.json").read_text())
    tiny = json.loads((work / "outputs/fetched/tiny/fetched.json").read_text())
    assert off == {"enabled": False}
    assert tiny["model"]["revision"] == hub.repos[MODEL][0]["main"]
    assert tiny["transcoders"]["source"] == f"hf://{SET}/layers" and tiny["dtype"] == "float32"
    # the downloads are copied out of the hub cache into the (DVC-cached) stage output
    for part in ("model", "transcoders"):
        folder = work / "outputs/fetched/tiny" / part
        assert tiny[part]["path"] == f"outputs/fetched/tiny/{part}"
        assert folder.is_dir() and not any(p.is_symlink() for p in folder.rglob("*"))
        assert folder_sha256(folder) == tiny[part]["sha256"]
    assert (work / "outputs/fetched/tiny/transcoders/config.yaml").is_file()
    # what the graph stages load from the stage output is the hub's model
    model = ReplacementModel.from_pretrained(
        str(work / tiny["model"]["path"]), str(work / tiny["transcoders"]["path"])
    )
    assert model.n_layers > 0
