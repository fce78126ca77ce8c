"""Transcoder sets on disk: round trips, hand-written upstream layouts, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tracer.transcoders.files import TranscoderFileError, load_transcoders, save_transcoders
from tracer.transcoders.sets import LayerWeights, TranscoderSet

N_LAYERS, D_MODEL, D_TC = 3, 6, 10  # d_model != d_transcoder so orientation mistakes show
FIELDS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")


def random_set(cross_layer: bool, activation: str, skip: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    layers = []
    for i in range(N_LAYERS):
        dec = (D_TC, N_LAYERS - i, D_MODEL) if cross_layer else (D_TC, D_MODEL)
        layers.append(
            LayerWeights(
                W_enc=rand(D_TC, D_MODEL),
                b_enc=rand(D_TC),
                W_dec=rand(*dec),
                b_dec=rand(D_MODEL),
                threshold=rand(D_TC).abs() if activation == "jumprelu" else None,
                W_skip=rand(D_MODEL, D_MODEL) if skip else None,
            )
        )
    return TranscoderSet.from_layers(
        layers,
        activation=activation,
        cross_layer=cross_layer,
        feature_input_hook="hook_resid_mid",
        feature_output_hook="hook_mlp_out",
        top_k=3 if activation == "topk" else None,
        model_name="org/tiny-model",
    )


def write_config(folder: Path, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "model_name": "org/tiny-model",
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "mlp.hook_out",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump({**base, **config}))


def plt_tensors(seed: int, d_tc: int = D_TC, threshold_key: str = "activation_function.threshold"):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_tc, D_MODEL, generator=g),
        "W_dec": torch.randn(d_tc, D_MODEL, generator=g),
        "b_enc": torch.randn(d_tc, generator=g),
        "b_dec": torch.randn(D_MODEL, generator=g),
        threshold_key: torch.rand(d_tc, generator=g),
    }


def write_plt_folder(folder: Path, n_layers: int = 2, **config) -> list[dict]:
    """An upstream per-layer folder written without save_transcoders."""
    written = [plt_tensors(i) for i in range(n_layers)]
    write_config(folder, **config)
    for i, tensors in enumerate(written):
        save_file(tensors, folder / f"layer_{i}.safetensors")
    return written


def jump(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return pre * (pre > threshold)


# ---- round trips ------------------------------------------------------------------------------
CASES = {
    "plt-relu": dict(cross_layer=False, activation="relu"),
    "plt-jumprelu": dict(cross_layer=False, activation="jumprelu"),
    "plt-topk": dict(cross_layer=False, activation="topk"),
    "plt-jumprelu-skip": dict(cross_layer=False, activation="jumprelu", skip=True),
    "clt-relu": dict(cross_layer=True, activation="relu"),
    "clt-jumprelu-skip": dict(cross_layer=True, activation="jumprelu", skip=True),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_bit_exact_and_lazy(tmp_path: Path, case: str):
    ts = random_set(**CASES[case])
    ts.scan = "tiny-scan"
    save_transcoders(ts, tmp_path / "set")
    loaded = load_transcoders(tmp_path / "set")

    assert loaded._layers == {}  # nothing read yet
    for attr in ("n_layers", "d_model", "d_transcoder", "activation", "cross_layer", "top_k"):
        assert getattr(loaded, attr) == getattr(ts, attr), attr
    for attr in ("feature_input_hook", "feature_output_hook", "model_name", "scan"):
        assert getattr(loaded, attr) == getattr(ts, attr), attr
    assert loaded.source == str(tmp_path / "set") and loaded.revision is None

    loaded.layer(1)
    assert set(loaded._layers) == {1}
    for i in range(N_LAYERS):
        for f in FIELDS:
            a, b = getattr(ts.layer(i), f), getattr(loaded.layer(i), f)
            assert (a is None) == (b is None), (i, f)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (i, f)


def test_lazy_reads_a_layer_file_only_when_asked(tmp_path: Path):
    save_transcoders(random_set(False, "relu"), tmp_path / "set")
    loaded = load_transcoders(tmp_path / "set")
    (tmp_path / "set" / "layer_2.safetensors").unlink()  # gone after load: only layer 2 may fail
    loaded.layer(0), loaded.layer(1)
    with pytest.raises(FileNotFoundError, match="layer_2.safetensors"):
        loaded.layer(2)


def test_eager_load_reads_every_layer(tmp_path: Path):
    save_transcoders(random_set(True, "jumprelu"), tmp_path / "set")
    assert set(load_transcoders(tmp_path / "set", lazy=False)._layers) == {0, 1, 2}


def test_save_in_bf16_stores_bf16_and_loads_back_exactly(tmp_path: Path):
    ts = random_set(True, "jumprelu", skip=True)
    save_transcoders(ts, tmp_path / "set", dtype=torch.bfloat16)
    with safe_open(tmp_path / "set" / "W_dec_0.safetensors", framework="pt") as f:
        assert f.get_slice("W_dec_0").get_dtype() == "BF16"
    loaded = load_transcoders(tmp_path / "set", dtype=torch.bfloat16)
    for f in FIELDS:
        want = getattr(ts.layer(2), f).to(torch.bfloat16)
        assert torch.equal(getattr(loaded.layer(2), f), want), f


def test_saved_config_is_upstream_shaped(tmp_path: Path):
    save_transcoders(random_set(True, "relu"), tmp_path / "set")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert config["feature_input_hook"] == "hook_resid_mid"
    assert "transcoders" not in config  # upstream then finds W_enc_{i} files in the folder
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names == sorted(
        ["config.yaml"] + [f"W_{k}_{i}.safetensors" for k in ("enc", "dec") for i in range(3)]
    )


def test_overwrite(tmp_path: Path):
    save_transcoders(random_set(False, "relu", seed=1), tmp_path / "set")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_transcoders(random_set(False, "relu", seed=2), tmp_path / "set")
    new = random_set(False, "relu", seed=2)
    save_transcoders(new, tmp_path / "set", overwrite=True)
    assert torch.equal(load_transcoders(tmp_path / "set").layer(0).W_enc, new.layer(0).W_enc)
    assert sorted(os.listdir(tmp_path)) == ["set"]


def test_failed_save_leaves_nothing(tmp_path: Path):
    good = random_set(False, "relu")

    def flaky(i: int) -> LayerWeights:
        if i == 1:
            raise RuntimeError(f"disk gone while reading layer {i}")
        return good.layer(i)

    ts = TranscoderSet(N_LAYERS, D_MODEL, D_TC, "relu", cross_layer=False, loader=flaky)
    with pytest.raises(RuntimeError, match="layer 1"):
        save_transcoders(ts, tmp_path / "out" / "set")
    assert os.listdir(tmp_path / "out") == []


# ---- hand-written upstream layouts --------------------------------------------------------------
@pytest.mark.parametrize("threshold_key", ["activation_function.threshold", "threshold"])
def test_upstream_plt_folder(tmp_path: Path, threshold_key: str):
    folder = tmp_path / "plt"
    folder.mkdir()
    written = [plt_tensors(i, threshold_key=threshold_key) for i in range(2)]
    (folder / "weights").mkdir()
    for i, tensors in enumerate(written):
        save_file(tensors, folder / "weights" / f"tc_{i}.safetensors")
    write_config(
        folder, scan="org/tiny-scan", transcoders=[f"weights/tc_{i}.safetensors" for i in range(2)]
    )
    ts = load_transcoders(folder)
    assert (ts.n_layers, ts.d_model, ts.d_transcoder) == (2, D_MODEL, D_TC)
    assert ts.activation == "jumprelu" and not ts.cross_layer and ts.scan == "org/tiny-scan"
    assert ts.feature_input_hook == "ln2.hook_normalized"
    x = torch.randn(4, D_MODEL)
    for i, w in enumerate(written):
        pre = x @ w["W_enc"].T + w["b_enc"]
        torch.testing.assert_close(ts.encode(i, x), jump(pre, w[threshold_key]))
        assert torch.equal(ts.decoder(i, i), w["W_dec"])
        assert torch.equal(ts.layer(i).b_dec, w["b_dec"])


def test_upstream_plt_folder_without_transcoder_list(tmp_path: Path):
    written = [plt_tensors(i) for i in range(3)]
    write_config(tmp_path, activation="relu")
    for i, tensors in enumerate(written):
        save_file(tensors, tmp_path / f"layer_{i}.safetensors")
    ts = load_transcoders(tmp_path)
    assert ts.n_layers == 3 and ts.activation == "relu"  # the config overrides the threshold
    assert torch.equal(ts.layer(2).W_enc, written[2]["W_enc"])


def write_clt_folder(folder: Path, n_layers: int = 3, threshold_shape=(D_TC,)) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n_layers):
        w = {
            f"W_enc_{i}": torch.randn(D_TC, D_MODEL, generator=g),
            f"b_enc_{i}": torch.randn(D_TC, generator=g),
            f"b_dec_{i}": torch.randn(D_MODEL, generator=g),
            f"threshold_{i}": torch.rand(threshold_shape, generator=g),
        }
        save_file(w, folder / f"W_enc_{i}.safetensors")
        dec = {f"W_dec_{i}": torch.randn(D_TC, n_layers - i, D_MODEL, generator=g)}
        save_file(dec, folder / f"W_dec_{i}.safetensors")
        written.append(w | dec)
    return written


@pytest.mark.parametrize("where", ["same folder", "subfolder"])
def test_upstream_clt_folder(tmp_path: Path, where: str):
    weights = tmp_path if where == "same folder" else tmp_path / "clt"
    written = write_clt_folder(weights)
    listing = {} if where == "same folder" else {"transcoders": ["clt"]}
    write_config(tmp_path, model_kind="cross_layer_transcoder", **listing)
    ts = load_transcoders(tmp_path)
    assert ts.cross_layer and ts.activation == "jumprelu" and ts.n_layers == 3
    x = torch.randn(4, D_MODEL)
    for i, w in enumerate(written):
        pre = x @ w[f"W_enc_{i}"].T + w[f"b_enc_{i}"]
        torch.testing.assert_close(ts.encode(i, x), jump(pre, w[f"threshold_{i}"]))
        for target in range(i, 3):  # slot k writes to layer i + k
            assert torch.equal(ts.decoder(i, target), w[f"W_dec_{i}"][:, target - i])
        assert torch.equal(ts.layer(i).b_dec, w[f"b_dec_{i}"])


def write_gemmascope_folder(folder: Path, n_layers: int = 2, compressed: bool = False):
    """GemmaScope's params.npz: W_enc stored (d_model, d_transcoder)."""
    rng = np.random.default_rng(0)
    written = []
    for i in range(n_layers):
        params = {
            "W_enc": rng.standard_normal((D_MODEL, D_TC)).astype(np.float32),
            "W_dec": rng.standard_normal((D_TC, D_MODEL)).astype(np.float32),
            "b_enc": rng.standard_normal(D_TC).astype(np.float32),
            "b_dec": rng.standard_normal(D_MODEL).astype(np.float32),
            "threshold": rng.random(D_TC).astype(np.float32),
        }
        path = folder / f"layer_{i}" / "width_16k" / "average_l0_7" / "params.npz"
        path.parent.mkdir(parents=True)
        (np.savez_compressed if compressed else np.savez)(path, **params)
        written.append(params)
    paths = [f"layer_{i}/width_16k/average_l0_7/params.npz" for i in range(n_layers)]
    write_config(folder, transcoders=paths)
    return written


@pytest.mark.parametrize("compressed", [False, True])
def test_gemmascope_npz_folder(tmp_path: Path, compressed: bool):
    written = write_gemmascope_folder(tmp_path, compressed=compressed)
    ts = load_transcoders(tmp_path)
    assert (ts.d_model, ts.d_transcoder, ts.activation) == (D_MODEL, D_TC, "jumprelu")
    x = torch.randn(4, D_MODEL)
    for i, p in enumerate(written):
        pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
        torch.testing.assert_close(ts.encode(i, x), jump(pre, torch.from_numpy(p["threshold"])))
        assert torch.equal(ts.decoder(i, i), torch.from_numpy(p["W_dec"]))


def test_gemmascope_npz_in_our_orientation_is_refused(tmp_path: Path):
    write_gemmascope_folder(tmp_path)
    path = tmp_path / "layer_1" / "width_16k" / "average_l0_7" / "params.npz"
    with np.load(path) as npz:
        params = dict(npz)
    params["W_enc"] = params["W_enc"].T  # (d_transcoder, d_model): not GemmaScope's layout
    np.savez(path, **params)
    with pytest.raises(TranscoderFileError, match=r"layer_1/.*params.npz.*'W_enc'.*GemmaScope"):
        load_transcoders(tmp_path)


# ---- bad input -------------------------------------------------------------------------------
def test_clt_threshold_stored_with_a_leading_axis(tmp_path: Path):
    written = write_clt_folder(tmp_path, threshold_shape=(1, D_TC))
    write_config(tmp_path, model_kind="cross_layer_transcoder")
    threshold = load_transcoders(tmp_path).layer(1).threshold
    assert torch.equal(threshold, written[1]["threshold_1"][0])


def test_missing_config(tmp_path: Path):
    write_clt_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.yaml.*W_enc_0.safetensors"):
        load_transcoders(tmp_path)


def test_unknown_model_kind_lists_valid_ones(tmp_path: Path):
    write_plt_folder(tmp_path, model_kind="sae")
    with pytest.raises(TranscoderFileError, match="'sae'.*transcoder_set, cross_layer_transcoder"):
        load_transcoders(tmp_path)


def test_missing_hook_in_config(tmp_path: Path):
    write_plt_folder(tmp_path, feature_output_hook=None)
    with pytest.raises(TranscoderFileError, match="feature_output_hook"):
        load_transcoders(tmp_path)


@pytest.mark.parametrize(
    ("key", "hook", "valid"),
    [
        (
            "feature_input_hook",
            "ln2.hook_scale",
            "hook_resid_mid, ln2.hook_normalized, mlp.hook_in",
        ),
        ("feature_input_hook", "blocks.3.hook_mlp_out", "hook_resid_mid, ln2.hook_normalized"),
        ("feature_output_hook", "hook_resid_post", "hook_mlp_out, mlp.hook_out"),
    ],
)
def test_unknown_hook_name_lists_valid_ones(tmp_path: Path, key: str, hook: str, valid: str):
    """A hook name no family maps is refused when the config is read, naming the valid ones."""
    write_plt_folder(tmp_path, **{key: hook})
    with pytest.raises(
        TranscoderFileError, match=f"{key} '{hook}' is not supported; valid: {valid}"
    ):
        load_transcoders(tmp_path)


def test_missing_listed_layer_file(tmp_path: Path):
    write_plt_folder(tmp_path, transcoders=["layer_0.safetensors", "layer_5.safetensors"])
    with pytest.raises(FileNotFoundError, match="layer_5.safetensors"):
        load_transcoders(tmp_path)


def test_gap_in_layer_files(tmp_path: Path):
    write_plt_folder(tmp_path, n_layers=3)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_1.safetensors is missing"):
        load_transcoders(tmp_path)


def test_missing_clt_decoder(tmp_path: Path):
    write_clt_folder(tmp_path)
    write_config(tmp_path, model_kind="cross_layer_transcoder")
    (tmp_path / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="W_dec_1.safetensors"):
        load_transcoders(tmp_path)


def test_missing_tensor_names_file_key_and_keys_present(tmp_path: Path):
    write_plt_folder(tmp_path)
    tensors = plt_tensors(1)
    del tensors["b_dec"]
    save_file(tensors, tmp_path / "layer_1.safetensors")
    with pytest.raises(
        TranscoderFileError, match=r"layer_1.safetensors: missing tensor 'b_dec'.*W_enc"
    ):
        load_transcoders(tmp_path)


def test_shape_mismatch_between_layers(tmp_path: Path):
    write_plt_folder(tmp_path, n_layers=3)
    save_file(plt_tensors(2, d_tc=D_TC + 1), tmp_path / "layer_2.safetensors")
    with pytest.raises(TranscoderFileError, match=r"layer_2.safetensors: tensor 'W_dec' has shape"):
        load_transcoders(tmp_path)


def test_clt_decoder_with_wrong_number_of_targets(tmp_path: Path):
    write_clt_folder(tmp_path)
    write_config(tmp_path, model_kind="cross_layer_transcoder")
    save_file({"W_dec_1": torch.zeros(D_TC, 3, D_MODEL)}, tmp_path / "W_dec_1.safetensors")
    with pytest.raises(TranscoderFileError, match=r"W_dec_1.safetensors.*\(10, 2, 6\)"):
        load_transcoders(tmp_path)


def test_optional_tensor_in_some_layers_only(tmp_path: Path):
    write_plt_folder(tmp_path)
    save_file(
        plt_tensors(1) | {"W_skip": torch.zeros(D_MODEL, D_MODEL)}, tmp_path / "layer_1.safetensors"
    )
    with pytest.raises(TranscoderFileError, match=r"layer 1 .*W_skip"):
        load_transcoders(tmp_path)


@pytest.mark.parametrize("cut", [20, -50])
def test_corrupt_or_truncated_safetensors(tmp_path: Path, cut: int):
    write_plt_folder(tmp_path)
    path = tmp_path / "layer_1.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(TranscoderFileError, match="layer_1.safetensors is not a valid safetensors"):
        load_transcoders(tmp_path)


def test_pickle_files_are_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_plt_folder(tmp_path, transcoders=["layer_0.safetensors", "layer_1.pt"])
    torch.save(plt_tensors(1), tmp_path / "layer_1.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(TranscoderFileError, match="layer_1.pt: .pt files are pickles"):
        load_transcoders(tmp_path)


def test_npz_with_object_arrays_is_refused(tmp_path: Path):
    write_gemmascope_folder(tmp_path)
    path = tmp_path / "layer_0" / "width_16k" / "average_l0_7" / "params.npz"
    with np.load(path) as npz:
        params = dict(npz)
    params["b_dec"] = np.array([{"evil": 1}], dtype=object)
    np.savez(path, **params)
    with pytest.raises(TranscoderFileError, match=r"params.npz: array 'b_dec'.*pickle"):
        load_transcoders(tmp_path)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"activation": "gelu"}, "'gelu' is not valid; valid: relu, jumprelu, topk"),
        ({"activation": "topk"}, "topk needs top_k >= 1, got None"),
        ({"activation": "topk", "top_k": 4, "k": 5}, "top_k and k disagree"),
        ({"activation": "relu", "top_k": 4}, "top_k=4 given for activation 'relu'"),
    ],
)
def test_bad_activation_config(tmp_path: Path, config: dict, match: str):
    write_plt_folder(tmp_path, **config)
    with pytest.raises(TranscoderFileError, match=match):
        load_transcoders(tmp_path)


def test_jumprelu_without_threshold(tmp_path: Path):
    write_config(tmp_path, activation="jumprelu")
    tensors = plt_tensors(0)
    del tensors["activation_function.threshold"]
    save_file(tensors, tmp_path / "layer_0.safetensors")
    with pytest.raises(TranscoderFileError, match="layer_0.safetensors: activation jumprelu needs"):
        load_transcoders(tmp_path)


def test_upstream_k_key_sets_top_k(tmp_path: Path):
    write_plt_folder(tmp_path, activation="topk", k=4)
    assert load_transcoders(tmp_path).top_k == 4


def test_revision_for_a_local_folder(tmp_path: Path):
    write_plt_folder(tmp_path)
    with pytest.raises(ValueError, match="revision='v1' applies only to hf:// URIs"):
        load_transcoders(tmp_path, revision="v1")


def test_not_a_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere is not a folder"):
        load_transcoders(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"subfolder": "clt"}, r"\['subfolder'\] given without repo_id"),
        ({"repo_id": "org/w", "transcoders": ["a.safetensors"]}, "either transcoders:.*not both"),
        ({"repo_id": "org/w/extra"}, "must be 'org/name' only"),
        ({"repo_id": "org/w", "revision": 3}, "revision must be a string, got 3"),
    ],
)
def test_bad_location_keys(tmp_path: Path, config: dict, match: str):
    write_config(tmp_path, **config)
    with pytest.raises(TranscoderFileError, match=match):
        load_transcoders(tmp_path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("s3://bucket/layer_1.safetensors", r"transcoders\[1\] 's3://.*neither a path"),
        ({"path": "layer_1.safetensors"}, r"transcoders\[1\] must be a path or an hf://"),
        ("../outside.safetensors", r"outside.safetensors does not exist"),
        ("layer_1.ckpt", r"layer_1.ckpt: .ckpt files are pickles"),
    ],
)
def test_bad_transcoder_entries(tmp_path: Path, entry, match: str):
    write_plt_folder(tmp_path, transcoders=["layer_0.safetensors", entry])
    with pytest.raises((TranscoderFileError, FileNotFoundError), match=match):
        load_transcoders(tmp_path)


def test_clt_listed_file_by_file_needs_gemmascope2_tensors(tmp_path: Path):
    write_plt_folder(tmp_path, model_kind="cross_layer_transcoder")
    write_config(
        tmp_path,
        model_kind="cross_layer_transcoder",
        transcoders=["layer_0.safetensors", "layer_1.safetensors"],
    )
    with pytest.raises(TranscoderFileError, match="needs GemmaScope-2 tensors.*W_dec"):
        load_transcoders(tmp_path)
