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
from tracer.experiments.fetch import FetchError, fetch_profile, folder_sha256, materialize
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


def test_fetch_pins_the_commit_and_loads(
    hub: FakeHubServer, local_profile: dict[str, Path], tmp_path: Path
):
    got = fetch_profile(MODEL, f"hf://{SET}/layers@main", revision="main")
    model_sha, set_sha = hub.repos[MODEL][0]["main"], hub.repos[SET][0]["main"]
    assert got["model"]["revision"] == model_sha and got["transcoders"]["revision"] == set_sha
    # The model is the snapshot as it is: the local folder's content hash.
    assert got["model"]["sha256"] == folder_sha256(local_profile["model"])
    names = sorted(f["name"] for f in got["transcoders"]["files"])
    assert names == ["layer_0.safetensors", "layer_1.safetensors"]
    assert {f["uri"] for f in got["transcoders"]["files"]} == {
        f"hf://{SET}/layers/{n}@{set_sha}" for n in names
    }

    hub.requests.clear()
    again = fetch_profile(
        MODEL, f"hf://{SET}/layers", revision=model_sha, transcoder_revision=set_sha
    )
    # pinned commits: no download and no checksum listing (both from the cache); the only
    # request left is the listing of the set's folder for its layer_{i} files
    assert [r for r in hub.requests if "/tree/" not in r] == []
    assert [again[p]["sha256"] for p in ("model", "transcoders")] == [
        got[p]["sha256"] for p in ("model", "transcoders")
    ]

    laid_out = {part: materialize(got[part], tmp_path / part) for part in ("model", "transcoders")}
    for name in names:  # the weights are the published files, byte for byte
        published = local_profile["transcoders"] / name
        assert (tmp_path / "transcoders" / name).read_bytes() == published.read_bytes()
    assert folder_sha256(tmp_path / "transcoders") == got["transcoders"]["sha256"]
    rm = ReplacementModel.from_pretrained(
        laid_out["model"]["path"], laid_out["transcoders"]["path"]
    )
    graph = attribute([5, 6, 7], rm, progress=False)
    assert graph.adjacency_matrix.isfinite().all()


def test_corrupt_download_is_caught_and_evicted(hub: FakeHubServer):
    hub.corrupt.add((MODEL, WEIGHTS))  # same size, different bytes: the client alone accepts it
    with pytest.raises(FetchError, match=rf"'{MODEL}'.*'{WEIGHTS}'.*checksum"):
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
        (MODEL, f"hf://{SET}/other@main", {}, rf"repo '{SET}', path 'other/config.yaml'.*'main'"),
    ],
)
def test_unresolvable_references(hub: FakeHubServer, model, transcoders, kwargs, match):
    with pytest.raises(FetchError, match=match):
        fetch_profile(model, transcoders, **kwargs)


def test_model_repo_without_weights(hub: FakeHubServer, local_profile: dict[str, Path]):
    config = (local_profile["model"] / "config.json").read_bytes()
    hub.add_repo("org/empty", {"config.json": config, "README.md": b"no weights"})
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
    # the set's config is read first (before any weights), so it is the one that cannot be had
    with pytest.raises(FetchError, match=rf"hf://{SET}/layers.*'{SET}'.*cannot be reached"):
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
    project = yaml.safe_load((ROOT / "params.yaml").read_text())
    # the sections every params.yaml must have; the others (which may name profiles) default
    params = {key: project[key] for key in ("zoo", "prompts")}
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


def test_hub_profiles_are_written_out_disabled():
    """The four hub profiles, under the repo names the reference tool uses, off by default."""
    from tracer.experiments.params import load_params
    from tracer.hub import is_hf_uri, parse_hf_uri

    profiles = load_params(ROOT / "params.yaml").profiles
    hub = [p for p in profiles.values() if is_hf_uri(p.transcoders)]
    assert {(p.model, parse_hf_uri(p.transcoders).repo_id) for p in hub} == {
        ("google/gemma-2-2b", "mntss/gemma-scope-transcoders"),
        ("meta-llama/Llama-3.2-1B", "mntss/clt-llama-3.2-1b-524k"),
        ("google/gemma-3-1b-pt", "mwhanna/gemma-scope-2-1b-pt"),
        ("Qwen/Qwen3-0.6B", "mwhanna/qwen3-0.6b-transcoders-lowl0"),
    }
    assert not any(p.enabled for p in hub)
