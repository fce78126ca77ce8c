"""Hub references, resolved by huggingface_hub itself against a local cache in offline mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hub_server import FakeHubServer, point_client_at
from huggingface_hub import constants
from safetensors.torch import save, save_file

from tracer import hub
from tracer.hub import (
    HfRef,
    HubError,
    looks_local,
    parse_hf_uri,
    resolve_model,
    resolve_repo_path,
)
from tracer.transcoders.files import load_transcoders

SHA_OLD, SHA_NEW = "1" * 40, "2" * 40
D_MODEL, D_TC = 4, 7


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache that the library reads, with all network calls refused."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # constants read the environment at import time; the download functions read these globals.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def snapshot(cache: Path, repo_id: str, sha: str, refs: tuple[str, ...] = ()) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/<branch>, snapshots/<sha>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)
    folder = repo / "snapshots" / sha
    folder.mkdir(parents=True)
    return folder


def write_plt(folder: Path, seed: int, n_layers: int = 2, **config) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    written = []
    for i in range(n_layers):
        w = {
            "W_enc": torch.randn(D_TC, D_MODEL, generator=g),
            "W_dec": torch.randn(D_TC, D_MODEL, generator=g),
            "b_enc": torch.randn(D_TC, generator=g),
            "b_dec": torch.randn(D_MODEL, generator=g),
        }
        save_file(w, folder / f"layer_{i}.safetensors")
        written.append(w)
    base = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(base | config))
    return written


# ---- parsing ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "ref"),
    [
        ("hf://org/repo/sub/dir@v1", HfRef("org/repo", "sub/dir", "v1")),
        ("hf://org/repo@v1/sub/dir", HfRef("org/repo", "sub/dir", "v1")),
        ("hf://org/repo/sub/dir?revision=v1", HfRef("org/repo", "sub/dir", "v1")),
        ("hf://org/repo", HfRef("org/repo", "", None)),
        ("hf://org/repo/a/./b/", HfRef("org/repo", "a/b", None)),
        (f"hf://org/repo/x.npz@{SHA_OLD}", HfRef("org/repo", "x.npz", SHA_OLD)),
        ("hf://org/repo@refs/pr/3/x.npz", HfRef("org/repo", "x.npz", "refs/pr/3")),
    ],
)
def test_parse_hf_uri(uri: str, ref: HfRef):
    assert parse_hf_uri(uri) == ref
    assert parse_hf_uri(ref.uri) == ref


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("org/repo/sub", "not a hub URI"),
        ("hf://org", "invalid hub URI"),
        ("hf://org/repo/sub@", "empty or padded revision"),
        ("hf://org/repo@v1/sub?revision=v2", "two revisions"),
        ("hf://org/repo/sub?rev=v2", "only query parameter allowed is revision"),
        ("hf://datasets/org/repo/sub", "dataset repo"),
        ("hf://org/repo/../x", "leaves the repo"),
        ("hf://org/re po/sub", "invalid hub URI"),
    ],
)
def test_parse_hf_uri_rejects(uri: str, match: str):
    with pytest.raises(ValueError, match=match):
        parse_hf_uri(uri)


# ---- resolving through huggingface_hub's cache --------------------------------------------------
def test_resolve_file_and_folder(hf_cache: Path):
    folder = snapshot(hf_cache, "org/repo", SHA_NEW, refs=("main",)) / "sub"
    write_plt(folder, seed=0)
    file = resolve_repo_path(parse_hf_uri("hf://org/repo/sub/config.yaml"))
    assert file == folder / "config.yaml" and hub.cached_commit(file) == SHA_NEW
    assert resolve_repo_path(parse_hf_uri(f"hf://org/repo/sub@{SHA_NEW}")) == folder
    got = resolve_repo_path(HfRef("org/repo", "sub", "main"), allow_patterns=["layer_*"])
    assert got == folder


def test_load_transcoders_from_hub_pins_the_commit(hf_cache: Path):
    old = write_plt(snapshot(hf_cache, "org/repo", SHA_OLD) / "sub", seed=1, scan="old")
    new = write_plt(snapshot(hf_cache, "org/repo", SHA_NEW, refs=("main",)) / "sub", seed=2)

    ts = load_transcoders("hf://org/repo/sub@main")
    assert ts.source == "hf://org/repo/sub@main" and ts.revision == SHA_NEW
    assert torch.equal(ts.layer(1).W_enc, new[1]["W_enc"])

    for pinned in (
        load_transcoders(f"hf://org/repo/sub@{SHA_OLD}"),
        load_transcoders("hf://org/repo/sub", revision=SHA_OLD),
    ):
        assert pinned.revision == SHA_OLD and pinned.scan == "old"
        assert torch.equal(pinned.layer(0).W_dec, old[0]["W_dec"])


def test_config_listing_files_in_another_repo(hf_cache: Path):
    """As mntss/gemma-scope-transcoders does: a config.yaml that lists another repo's files."""
    written = write_plt(snapshot(hf_cache, "google/scope", SHA_OLD) / "w", seed=4)
    curated = snapshot(hf_cache, "org/curated", SHA_NEW, refs=("main",))
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://google/scope/w/layer_{i}.safetensors@{SHA_OLD}" for i in range(2)],
    }
    (curated / "config.yaml").write_text(yaml.safe_dump(config))

    ts = load_transcoders("hf://org/curated")
    assert ts.revision == SHA_NEW and ts.feature_input_hook == "ln2.hook_normalized"
    assert torch.equal(ts.layer(1).W_enc, written[1]["W_enc"])


def test_cross_layer_transcoder_on_hub(hf_cache: Path):
    folder = snapshot(hf_cache, "org/clt", SHA_NEW, refs=("main",)) / "clt-tiny"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    decoders = []
    for i in range(2):
        enc = {
            f"W_enc_{i}": torch.randn(D_TC, D_MODEL, generator=g),
            f"b_enc_{i}": torch.randn(D_TC, generator=g),
            f"b_dec_{i}": torch.randn(D_MODEL, generator=g),
        }
        save_file(enc, folder / f"W_enc_{i}.safetensors")
        dec = {f"W_dec_{i}": torch.randn(D_TC, 2 - i, D_MODEL, generator=g)}
        save_file(dec, folder / f"W_dec_{i}.safetensors")
        decoders.append(dec[f"W_dec_{i}"])
    config = {
        "model_name": "org/model",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    ts = load_transcoders("hf://org/clt/clt-tiny", revision="main")
    assert ts.cross_layer and ts.n_layers == 2 and ts.revision == SHA_NEW
    assert torch.equal(ts.decoder(0, 1), decoders[0][:, 1])


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("hf://org/nope/sub", r"repo 'org/nope'"),
        ("hf://org/repo/sub@v9", r"revision 'v9'"),
        (f"hf://org/repo/sub@{SHA_OLD}", f"revision '{SHA_OLD}'"),
        ("hf://org/repo/other", r"path 'other/config.yaml'"),
    ],
)
def test_unresolvable_references_raise_hub_error(hf_cache: Path, uri: str, match: str):
    write_plt(snapshot(hf_cache, "org/repo", SHA_NEW, refs=("main",)) / "sub", seed=0)
    with pytest.raises(HubError, match=match):
        load_transcoders(uri)


def test_missing_file_inside_a_resolved_folder(hf_cache: Path):
    write_plt(snapshot(hf_cache, "org/repo", SHA_NEW, refs=("main",)) / "sub", seed=0)
    with pytest.raises(HubError, match="'sub/nothing' is not in the downloaded snapshot"):
        resolve_repo_path(HfRef("org/repo", "sub/nothing"))


def test_conflicting_revisions(hf_cache: Path):
    with pytest.raises(ValueError, match="pins revision 'v1' but revision='v2'"):
        load_transcoders("hf://org/repo/sub@v1", revision="v2")


def test_connection_errors_become_hub_errors(monkeypatch: pytest.MonkeyPatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(HubError, match=r"repo 'org/repo', path 'a/b.npz', revision 'v1'.*refused"):
        resolve_repo_path(HfRef("org/repo", "a/b.npz", "v1"))


# ---- models -----------------------------------------------------------------------------------
def test_resolve_model(tmp_path: Path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model("org/tiny-model", revision="v1") == "org/tiny-model"
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid hub"):
        resolve_model("not a/valid id")
    # more than one '/' is a path by the one local-or-hub rule (hub ids are 'org/name')
    with pytest.raises(FileNotFoundError, match="model folder not/a/folder does not exist"):
        resolve_model("not/a/folder")
    assert looks_local("./gpt2") and looks_local(tmp_path) and looks_local("zoo/models/gpt2")
    assert not looks_local("gpt2") and not looks_local("org/name")
    assert not looks_local("hf://org/name/sub/dir")
    with pytest.raises(ValueError, match="local folder; a revision"):
        resolve_model(tmp_path, revision="v1")
    with pytest.raises(ValueError, match="not a URI"):
        resolve_model("hf://org/tiny-model")


# ---- a loopback server imitating the hub: real downloads, allow_patterns, pinning --------------
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHubServer() as hub:
        point_client_at(hub, monkeypatch, tmp_path / "hf-home")
        yield hub


def plt_repo_files(listed: bool) -> tuple[dict[str, bytes], list[dict]]:
    g = torch.Generator().manual_seed(3)
    layers = [
        {
            "W_enc": torch.randn(D_TC, D_MODEL, generator=g),
            "W_dec": torch.randn(D_TC, D_MODEL, generator=g),
            "b_enc": torch.randn(D_TC, generator=g),
            "b_dec": torch.randn(D_MODEL, generator=g),
        }
        for _ in range(2)
    ]
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    if listed:
        config["transcoders"] = ["w/a.safetensors", "w/b.safetensors"]
        names = config["transcoders"]
    else:
        names = ["layer_0.safetensors", "layer_1.safetensors"]
    files = {f"sub/{n}": save(w) for n, w in zip(names, layers, strict=True)}
    files["sub/config.yaml"] = yaml.safe_dump(config).encode()
    files["sub/unused.safetensors"] = save({"x": torch.zeros(1)})
    files["features/layer_0.bin"] = b"dashboard data, not weights" * 100
    return files, layers


@pytest.mark.parametrize("listed", [False, True])
def test_download_fetches_only_the_set_and_pins_the_commit(fake_hub, listed: bool):
    files, layers = plt_repo_files(listed)
    fake_hub.repos["org/repo"] = ({"main": SHA_NEW}, {SHA_NEW: files})
    ts = load_transcoders("hf://org/repo/sub")
    assert ts.revision == SHA_NEW
    assert torch.equal(ts.layer(1).W_dec, layers[1]["W_dec"])
    fetched = [r for r in fake_hub.requests if r.startswith("GET org/repo/resolve/")]
    assert len(fetched) == 3  # config + two layers
    assert not any("features/" in r or "unused" in r for r in fetched)
    # After the config, every download names the commit, not the branch.
    assert all(SHA_NEW in r for r in fetched if "config.yaml" not in r)

    fake_hub.requests.clear()
    again = load_transcoders(f"hf://org/repo/sub@{SHA_NEW}")
    assert torch.equal(again.layer(0).W_enc, layers[0]["W_enc"])
    assert not [r for r in fake_hub.requests if "/resolve/" in r]  # pinned: served from the cache


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (HfRef("org/nope", "sub/config.yaml"), "repository not found"),
        (HfRef("org/repo", "sub/config.yaml", "v9"), "revision not found"),
        (HfRef("org/repo", "sub/missing.yaml"), "file not found in the repo"),
    ],
)
def test_hub_errors_name_repo_path_and_revision(fake_hub, ref: HfRef, reason: str):
    fake_hub.repos["org/repo"] = ({"main": SHA_NEW}, {SHA_NEW: plt_repo_files(False)[0]})
    with pytest.raises(
        HubError, match=rf"repo '{ref.repo_id}', path '{ref.path_in_repo}'.*{reason}"
    ):
        resolve_repo_path(ref)
