"""Every published transcoder layout, fetched from a loopback hub, laid out, loaded and attributed.

Each layout is rebuilt here at tiny sizes from a reference set in our convention, with the
published config text, file names, tensor names and orientations:
- GemmaScope (Gemma-2): a config repo whose `transcoders:` are hf:// URIs of `params.npz` files in
  another repo (`W_enc` stored (d_model, d_transcoder), `threshold`);
- GemmaScope-2 per-layer safetensors (`w_enc`/`w_dec`/`b_enc`/`b_dec`/`threshold`,
  `affine_skip_connection`; encoder and skip transposed), listed from a config repo;
- GemmaScope-2 cross-layer transcoders, one file per source layer holding decoders to every layer;
- a CLT whose config names `repo_id`/`subfolder`/`revision` instead of listing files;
- a TopK set (`activation: topk`, `k`).
Each is fetched (closure downloaded, pinned, checksummed), laid out in a folder of its own with a
rewritten config, loaded from there, compared with the reference weights and attributed; adjacency
columns are checked against real direct-effect interventions (float64, 1e-8 of the column max).
Then the failures: checksum mismatch, a cross-repo file missing, a revision that does not exist,
bad configs (nothing fetched), and the DVC round trip to a machine without hub access.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_server import FakeHubServer, point_client_at
from huggingface_hub import constants
from safetensors.torch import save
from test_attribution_exactness import assert_columns_match_interventions, sample_columns

from tracer.attribution.attribute import attribute
from tracer.experiments.fetch import FetchError, fetch_profile, folder_sha256, materialize
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders
from tracer.transcoders.files import load_transcoders, save_transcoders
from tracer.transcoders.sets import LayerWeights, TranscoderSet

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS, D_MODEL, D_TC = 2, 32, 48
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
SCOPE, SCOPE2 = "google/gemma-scope-2b-pt-transcoders", "google/gemma-scope-2-1b-pt"
CONFIG_REPO = "mntss/gemma-scope-transcoders"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "gemma2"
    build_model("gemma2", n_layers=N_LAYERS, d_model=D_MODEL).save_pretrained(folder)
    return folder


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHubServer() as server:
        point_client_at(server, monkeypatch, tmp_path / "hf-home")
        yield server


def config_text(kind: str, read: str, write: str, **extra) -> bytes:
    config = {
        "model_name": "google/gemma-2-2b",
        "model_kind": kind,
        "feature_input_hook": read,
        "feature_output_hook": write,
        "scan": "tiny-scan",
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False).encode()


def reference(kind: str, read: str = "mlp.hook_in", clt_skip: bool = False) -> TranscoderSet:
    ts = build_transcoders(kind, n_layers=N_LAYERS, d_model=D_MODEL, d_transcoder=D_TC)
    ts.feature_input_hook, ts.feature_output_hook = read, "hook_mlp_out"
    if clt_skip:
        g = torch.Generator().manual_seed(7)
        for i in range(N_LAYERS):
            ts.layer(i).W_skip = torch.randn(D_MODEL, D_MODEL, generator=g) * 0.05
    return ts


# ---- the published layouts -------------------------------------------------------------------
def gemmascope_npz(hub: FakeHubServer) -> tuple[str, TranscoderSet]:
    """mntss/gemma-scope-transcoders: a config listing params.npz files of google's repo."""
    ts = reference("plt-jumprelu", read="ln2.hook_normalized")
    files, uris = {}, []
    for i in range(N_LAYERS):
        w, buffer = ts.layer(i), io.BytesIO()
        np.savez(
            buffer,
            W_enc=w.W_enc.T.numpy(),  # GemmaScope: (d_model, d_transcoder)
            W_dec=w.W_dec.numpy(),
            b_enc=w.b_enc.numpy(),
            b_dec=w.b_dec.numpy(),
            threshold=w.threshold.numpy(),
        )
        path = f"layer_{i}/width_16k/average_l0_{70 + i}/params.npz"
        files[path] = buffer.getvalue()
        uris.append(f"hf://{SCOPE}/{path}")
    files["README.md"] = b"scope weights"
    hub.add_repo(SCOPE, files)
    config = config_text("transcoder_set", "ln2.hook_normalized", "hook_mlp_out", transcoders=uris)
    hub.add_repo(CONFIG_REPO, {"config.yaml": config, "README.md": b"configs"})
    return f"hf://{CONFIG_REPO}", ts


def gemmascope2_plt(hub: FakeHubServer) -> tuple[str, TranscoderSet]:
    """GemmaScope-2 per-layer safetensors with an affine skip, listed by a config repo."""
    ts = reference("plt-skip")
    files, uris = {}, []
    for i in range(N_LAYERS):
        w = ts.layer(i)
        tensors = {
            "w_enc": w.W_enc.T.contiguous(),  # (d_model, d_transcoder)
            "w_dec": w.W_dec,
            "b_enc": w.b_enc,
            "b_dec": w.b_dec,
            "threshold": w.threshold,
            "affine_skip_connection": w.W_skip.T.contiguous(),  # used as x @ A
        }
        path = f"transcoder_all/layer_{i}_width_16k_l0_small_affine/params.safetensors"
        files[path] = save(tensors)
        uris.append(f"hf://{SCOPE2}/{path}")
    hub.add_repo(SCOPE2, files)
    sub = "transcoder_all/width_16k_l0_small_affine"
    config = config_text("transcoder_set", "mlp.hook_in", "hook_mlp_out", transcoders=uris)
    hub.add_repo("mwhanna/gemma-scope-2-1b-pt", {f"{sub}/config.yaml": config})
    return f"hf://mwhanna/gemma-scope-2-1b-pt/{sub}", ts


def gemmascope2_clt(hub: FakeHubServer) -> tuple[str, TranscoderSet]:
    """GemmaScope-2 CLT: one file per source layer, decoders to every layer (earlier ones unused)."""
    ts = reference("clt", clt_skip=True)
    files, uris = {}, []
    junk = torch.Generator().manual_seed(11)
    for i in range(N_LAYERS):
        w = ts.layer(i)
        w_dec = torch.randn(D_TC, N_LAYERS, D_MODEL, generator=junk) * 100  # slots < i: unused
        w_dec[:, i:] = w.W_dec
        tensors = {
            "w_enc": w.W_enc.T.contiguous(),
            "w_dec": w_dec,
            "b_enc": w.b_enc,
            "b_dec": w.b_dec,
            "threshold": w.threshold,
            "affine_skip_connection": w.W_skip,  # a CLT's skip is used as x @ W_skip, as stored
        }
        path = f"clt/width_262k_l0_medium_affine/params_layer_{i}.safetensors"
        files[path] = save(tensors)
        uris.append(f"hf://{SCOPE2}/{path}")
    hub.add_repo(SCOPE2, files)
    config = config_text("cross_layer_transcoder", "mlp.hook_in", "hook_mlp_out", transcoders=uris)
    sub = "clt/width_262k_l0_medium_affine"
    hub.add_repo("mwhanna/gemma-scope-2-1b-pt", {f"{sub}/config.yaml": config})
    return f"hf://mwhanna/gemma-scope-2-1b-pt/{sub}", ts


def clt_by_repo_id(hub: FakeHubServer, tmp_path: Path) -> tuple[str, TranscoderSet]:
    """A CLT config naming repo_id/subfolder/revision; W_enc_{i}/W_dec_{i} files live there."""
    ts = reference("clt", read="hook_resid_mid")
    save_transcoders(ts, tmp_path / "clt")
    (tmp_path / "clt" / "config.yaml").unlink()
    hub.add_folder("org/clt-weights", tmp_path / "clt", prefix="clt-tiny", branch="v1")
    config = config_text(
        "cross_layer_transcoder",
        "hook_resid_mid",
        "hook_mlp_out",
        repo_id="org/clt-weights",
        subfolder="clt-tiny",
        revision="v1",
    )
    hub.add_repo("org/clt-config", {"config.yaml": config})
    return "hf://org/clt-config", ts


def topk_set(hub: FakeHubServer, tmp_path: Path) -> tuple[str, TranscoderSet]:
    """A TopK per-layer set: `activation: topk` with circuit-tracer's `k`, layer_{i} files."""
    ts = reference("plt-topk")
    save_transcoders(ts, tmp_path / "topk")
    config = config_text("transcoder_set", "mlp.hook_in", "hook_mlp_out", activation="topk", k=8)
    (tmp_path / "topk" / "config.yaml").write_bytes(config)
    hub.add_folder("org/topk", tmp_path / "topk")
    return "hf://org/topk", ts


LAYOUTS = {
    "gemmascope-npz": lambda hub, tmp: gemmascope_npz(hub),
    "gemmascope2-plt": lambda hub, tmp: gemmascope2_plt(hub),
    "gemmascope2-clt": lambda hub, tmp: gemmascope2_clt(hub),
    "clt-repo-id": clt_by_repo_id,
    "topk": topk_set,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fetch_lay_out_load_and_attribute_exactly(
    hub: FakeHubServer, model_dir: Path, tmp_path: Path, layout: str
):
    uri, ts = LAYOUTS[layout](hub, tmp_path)
    record = fetch_profile(str(model_dir), uri)["transcoders"]
    # every file of the closure is pinned to the commit its repo served, and checksummed
    for f in record["files"]:
        repo_and_path, _, sha = f["uri"].removeprefix("hf://").rpartition("@")
        repo_id = "/".join(repo_and_path.split("/")[:2])
        assert hub.repos[repo_id][1].get(sha) is not None
        assert set(f) & {"sha256", "git-sha1"}
    laid_out = materialize(record, tmp_path / "fetched")
    folder = Path(laid_out["path"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert not set(config) & {"repo_id", "subfolder", "revision"}
    named = config.get("transcoders") or []
    assert all((folder / name).is_file() and "://" not in name for name in named)
    assert folder_sha256(folder) == record["sha256"]

    hub.requests.clear()
    loaded = load_transcoders(folder)
    assert hub.requests == []  # the folder is self-contained
    assert (loaded.cross_layer, loaded.activation, loaded.top_k) == (
        ts.cross_layer,
        ts.activation,
        ts.top_k,
    )
    for i in range(N_LAYERS):
        got, want = loaded.layer(i), ts.layer(i)
        for field in LayerWeights.__dataclass_fields__:
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), field
            assert a is None or torch.equal(a, b.to(a.dtype)), (layout, i, field)

    model = build_model("gemma2", n_layers=N_LAYERS, d_model=D_MODEL).to(torch.float64)
    rm = ReplacementModel(model, loaded)
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    assert graph.layout.n_features > 20
    assert_columns_match_interventions(rm, graph, sample_columns(graph, 12), 1e-8)


# ---- failures ---------------------------------------------------------------------------------
def weight_downloads(hub: FakeHubServer) -> list[str]:
    return [
        r
        for r in hub.requests
        if r.startswith("GET ")
        and "/resolve/" in r
        and r.split()[1].endswith((".npz", ".safetensors"))
    ]


def edit_listing(hub: FakeHubServer, edit) -> None:
    """A new commit of the GemmaScope config repo with `transcoders:` replaced by edit(list)."""
    sha = hub.repos[CONFIG_REPO][0]["main"]
    config = yaml.safe_load(hub.repos[CONFIG_REPO][1][sha]["config.yaml"])
    config["transcoders"] = edit(config["transcoders"])
    hub.add_repo(CONFIG_REPO, {"config.yaml": yaml.safe_dump(config).encode()})


def assert_fails_before_any_download(hub: FakeHubServer, model_dir: Path, uri: str, match: str):
    hub.requests.clear()
    with pytest.raises(FetchError, match=match):
        fetch_profile(str(model_dir), uri)
    assert weight_downloads(hub) == []


def write_params(work: Path, model_dir: Path, uri: str) -> None:
    """A params.yaml with one profile, `scope`: the tiny model and the set at `uri`."""
    project = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {key: project[key] for key in ("zoo", "prompts")}  # the other sections default
    params["profiles"] = {"scope": {"model": str(model_dir), "transcoders": uri}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def test_checksum_mismatch_names_the_file_and_evicts_it(hub: FakeHubServer, model_dir: Path):
    uri, _ = gemmascope_npz(hub)
    bad = "layer_1/width_16k/average_l0_71/params.npz"
    hub.corrupt.add((SCOPE, bad))  # same size, other bytes: huggingface_hub alone accepts it
    with pytest.raises(FetchError, match=rf"'{SCOPE}'.*'{bad}'.*failed its checksum"):
        fetch_profile(str(model_dir), uri)
    cached = Path(constants.HF_HUB_CACHE) / f"models--{SCOPE.replace('/', '--')}"
    assert not [p for p in cached.rglob("params.npz") if "average_l0_71" in str(p)]
    hub.corrupt.clear()
    assert len(fetch_profile(str(model_dir), uri)["transcoders"]["files"]) == N_LAYERS


def test_missing_cross_repo_file_fails_before_any_download(hub: FakeHubServer, model_dir: Path):
    uri, _ = gemmascope_npz(hub)
    missing = "layer_1/width_16k/average_l0_999/params.npz"
    edit_listing(hub, lambda t: [t[0], f"hf://{SCOPE}/{missing}"])
    assert_fails_before_any_download(
        hub, model_dir, uri, rf"'{SCOPE}'.*'{missing}'.*not in the repo"
    )


@pytest.mark.parametrize(
    ("revision_of", "match"),
    [
        ("config", rf"repo '{CONFIG_REPO}'.*revision 'v9'.*revision not found"),
        ("cross-repo", rf"repo '{SCOPE}'.*revision 'v9'.*revision not found"),
    ],
)
def test_revision_that_does_not_exist(hub: FakeHubServer, model_dir: Path, revision_of, match):
    uri, _ = gemmascope_npz(hub)
    if revision_of == "config":
        uri += "@v9"
    else:
        edit_listing(hub, lambda t: [f"{t[0]}@v9", t[1]])
    assert_fails_before_any_download(hub, model_dir, uri, match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[:1], r"have 1 layers but model .* has 2.*nothing was fetched"),
        (lambda t: [t[0], "s3://bucket/layer_1.npz"], r"transcoders\[1\].*neither a path"),
        (lambda t: [t[0], 7], r"transcoders\[1\] must be a path or an hf://"),
        (lambda t: [t[0], f"hf://{SCOPE}/layer_1/params.pt"], r"params\.pt.*pickles"),
    ],
    ids=["fewer-files-than-layers", "other-scheme", "not-a-string", "pickle"],
)
def test_bad_configs_fail_before_any_download(hub: FakeHubServer, model_dir: Path, edit, match):
    uri, _ = gemmascope_npz(hub)
    edit_listing(hub, edit)
    assert_fails_before_any_download(hub, model_dir, uri, match)


def test_failed_fetch_leaves_the_previous_output(
    hub: FakeHubServer, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri, _ = gemmascope_npz(hub)
    work = tmp_path / "work"
    write_params(work, model_dir, uri)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["fetch.py", "scope"])
    runpy.run_path(str(ROOT / "pipelines" / "fetch.py"), run_name="__main__")
    output = work / "outputs" / "fetched" / "scope"
    before = folder_sha256(output)
    assert (
        output / "transcoders" / "hub" / SCOPE / "layer_0/width_16k/average_l0_70/params.npz"
    ).is_file()

    # a new machine (empty hub cache) where the hub serves a corrupt file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "other-cache"))
    bad = "layer_0/width_16k/average_l0_70/params.npz"
    hub.corrupt.add((SCOPE, bad))
    with pytest.raises(FetchError, match=rf"'{bad}'.*failed its checksum"):
        runpy.run_path(str(ROOT / "pipelines" / "fetch.py"), run_name="__main__")
    assert folder_sha256(output) == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["scope"]  # no temporary left


# ---- the DVC round trip: fetch here, push, pull on a machine without the hub ----------------
def dvc(work: Path, *args: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dvc_round_trip_then_offline(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    work, remote = tmp_path / "project", tmp_path / "remote"
    write_params(work, model_dir, f"hf://{CONFIG_REPO}")
    stage = {
        "cmd": f"{sys.executable} {ROOT / 'pipelines' / 'fetch.py'} scope",
        "params": ["profiles.scope"],
        "outs": ["outputs/fetched/scope"],
    }
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch": stage}}))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DVC_"))}
    base |= {"PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "NO_PROXY": "127.0.0.1"}
    dvc(work, "init", "--no-scm", "-q", env=base)
    dvc(work, "remote", "add", "-d", "store", str(remote), env=base)

    with FakeHubServer() as hub:
        gemmascope_npz(hub)
        online = base | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-online")}
        dvc(work, "repro", env=online)
        dvc(work, "push", "-q", env=online)
    fetched = work / "outputs" / "fetched" / "scope"
    record = json.loads((fetched / "fetched.json").read_text())["transcoders"]
    # another machine: no hub (the server is gone), an empty hub cache, offline mode
    shutil.rmtree(fetched)
    shutil.rmtree(work / ".dvc" / "cache")
    offline = base | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-none")}
    dvc(work, "pull", "-q", env=offline)
    assert "up to date" in dvc(work, "status", env=offline)
    assert "didn't change" in dvc(work, "repro", env=offline)
    assert folder_sha256(fetched / "transcoders") == record["sha256"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-none" / "hub"))
    rm = ReplacementModel(
        build_model("gemma2", n_layers=N_LAYERS, d_model=D_MODEL).to(torch.float64),
        load_transcoders(work / record["path"]),
    )
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    assert_columns_match_interventions(rm, graph, sample_columns(graph, 6), 1e-8)


def test_local_config_naming_hub_files_is_fetched_whole(
    hub: FakeHubServer, model_dir: Path, tmp_path: Path
):
    """A config kept locally whose `transcoders:` are hf:// URIs: its hub files are downloaded,
    pinned, checksummed and laid out with it, so the fetched folder needs no hub."""
    _, ts = gemmascope_npz(hub)
    local = tmp_path / "local-set"
    local.mkdir()
    sha = hub.repos[CONFIG_REPO][0]["main"]
    (local / "config.yaml").write_bytes(hub.repos[CONFIG_REPO][1][sha]["config.yaml"])
    record = fetch_profile(str(model_dir), str(local))["transcoders"]
    assert record["source"] == str(local) and record["revision"] is None
    scope_sha = hub.repos[SCOPE][0]["main"]
    assert {f["uri"].rpartition("@")[2] for f in record["files"]} == {scope_sha}
    folder = Path(materialize(record, tmp_path / "fetched")["path"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert all("://" not in name and (folder / name).is_file() for name in config["transcoders"])
    hub.requests.clear()
    loaded = load_transcoders(folder)
    assert hub.requests == []
    for i in range(N_LAYERS):
        assert torch.equal(loaded.layer(i).W_enc, ts.layer(i).W_enc.to(loaded.dtype))
    hub.corrupt.add((SCOPE, "layer_1/width_16k/average_l0_71/params.npz"))
    shutil.rmtree(constants.HF_HUB_CACHE)
    with pytest.raises(FetchError, match="params.npz"):
        fetch_profile(str(model_dir), str(local))
