"""`tracer estimate`: predictions against what attribution, pruning and saving really take.

Peaks are measured in fresh processes (tests/estimate_probe.py) as the growth of the process's
high-water mark over its RSS just before the phase: attribution with the model loaded, pruning
and scoring from the graph file. Two regimes: every feature a node (the adjacency dominates)
and a node budget over many active features (rows over all active features dominate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.attribution.estimate import (
    Shapes,
    active_per_cell,
    bound_per_cell,
    estimate,
    estimate_prompt,
    shapes_of_model,
)
from tracer.cli import main
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders, write_fixture

PROBE = Path(__file__).with_name("estimate_probe.py")
TOLERANCE = 0.25
CONFIGS = {
    "all-features": ("plt-topk", 128, 2048, "all", 256),  # ~8k nodes, a 300 MB adjacency
    "node-budget": ("plt-relu", 96, 1024, 512, 128),  # ~200k active features, 512 nodes
    "long-prompt": ("plt-topk", 384, 1024, 256, 256),  # the batch's linear forward dominates
}


def probe(config: str, phase: str, graph: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(PROBE), *map(str, CONFIGS[config]), phase, str(graph)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=list(CONFIGS))
def measured(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    graph = tmp_path_factory.mktemp("estimate") / "graph.safetensors"
    attributed = probe(request.param, "attribute", graph)
    pruned = probe(request.param, "prune", graph)
    return {"attribute": attributed, "prune": pruned}


def within(predicted: float, actual: float, tolerance: float = TOLERANCE) -> bool:
    return abs(predicted - actual) <= tolerance * actual


def test_peaks_and_file_size_within_a_quarter_of_measured(measured: dict) -> None:
    run, pruned = measured["attribute"], measured["prune"]
    predicted = run["estimate"]
    assert predicted["nodes"] == run["nodes"] and predicted["active_features"] == run["active"]
    assert within(predicted["attribution_peak_bytes"], run["measured"]), (
        predicted["attribution_peak_bytes"],
        run["measured"],
    )
    assert within(predicted["pruning_peak_bytes"], pruned["measured"]), (
        predicted["pruning_peak_bytes"],
        pruned["measured"],
    )
    # With a node budget the file assumes the selected features sit like the active ones; the
    # greedy choice concentrates them, so the size is only roughly right there.
    file_tolerance = (
        TOLERANCE if predicted["feature_nodes"] == predicted["active_features"] else 0.5
    )
    assert within(predicted["graph_file_bytes"], run["file_bytes"], file_tolerance), (
        predicted["graph_file_bytes"],
        run["file_bytes"],
    )


def test_structural_nonzero_count_is_close_to_a_real_graph() -> None:
    """The file-size model counts the entries that can be non-zero; a real graph has them."""
    from tracer.attribution.estimate import _nonzero

    torch.manual_seed(0)
    rm = ReplacementModel(
        build_model("llama", n_layers=3, d_model=32, vocab=64),
        build_transcoders("plt-topk", n_layers=3, d_model=32, d_transcoder=64, top_k=4),
    )
    ids = rm.tokenize(torch.randint(4, 64, (20,), generator=torch.Generator().manual_seed(1)))
    graph = attribute(ids, rm, max_n_logits=5, desired_logit_prob=1.0, progress=False)
    cells, found = active_per_cell(rm, ids, None)
    assert found == "prompt" and int(cells.sum()) == graph.active_features.shape[0]
    expected = _nonzero(cells, 1.0, len(graph.logit_targets))
    assert abs(expected - graph.n_edges()) <= 0.05 * graph.n_edges()


def test_topk_bound_without_weights_holds(tmp_path: Path) -> None:
    write_fixture(tmp_path, family="llama", kind="plt-topk")
    prompt = "the capital of the state containing Dallas is"
    # a TopK set needs no weights by default; the forward pass can still be asked for
    bound = estimate_prompt(str(tmp_path / "model"), str(tmp_path / "transcoders"), prompt)
    counted = estimate_prompt(
        str(tmp_path / "model"), str(tmp_path / "transcoders"), prompt, use_weights=True
    )
    assert bound.active_from == "bound" and counted.active_from == "prompt"
    assert bound.n_pos == counted.n_pos
    rm = ReplacementModel.from_pretrained(str(tmp_path / "model"), str(tmp_path / "transcoders"))
    graph = attribute(prompt, rm, progress=False)
    assert counted.active_features == graph.active_features.shape[0] <= bound.active_features
    assert bound.active_features == rm.transcoders.top_k * rm.n_layers * (graph.n_pos - 1)
    assert not bound.warnings  # a TopK bound is exact up to zeros, not a worst case


def test_sampling_extrapolates_per_position() -> None:
    rm = ReplacementModel(
        build_model("llama", n_layers=2, d_model=32, vocab=64),
        build_transcoders("plt-relu", n_layers=2, d_model=32, d_transcoder=64),
    )
    ids = rm.tokenize(torch.randint(4, 64, (40,), generator=torch.Generator().manual_seed(2)))
    cells, found = active_per_cell(rm, ids, 10)
    assert found == "sample of 10 tokens" and cells.shape == (2, ids.shape[0])
    sample, _ = active_per_cell(rm, ids[:10], None)
    assert torch.equal(cells[:, :10], sample)
    assert torch.allclose(cells[:, 10:], sample[:, 1:].mean(1, keepdim=True).expand(-1, 31))


def test_warns_when_memory_is_short() -> None:
    shapes = Shapes(26, 2304, 8, 256000, 16384, False, None, 10_000_000_000, 2_000_000_000)
    found = estimate(shapes, 2048, active=500_000, active_from="given", available=16 << 30)
    assert any("attribution needs" in w and "max_feature_nodes" in w for w in found.warnings)
    assert any("pruning needs" in w for w in found.warnings)
    budget = estimate(
        shapes, 2048, active=500_000, active_from="given", max_feature_nodes=4096, available=1 << 40
    )
    assert budget.nodes == 4096 + 27 * 2048 + 10 and not budget.warnings
    with pytest.raises(ValueError, match="active must be"):
        estimate(shapes, 10, active=torch.zeros(3, 3), active_from="given")


def test_bound_marks_the_start_token_inactive() -> None:
    shapes = Shapes(2, 8, 2, 10, 100, False, None, 0, 0)
    cells = bound_per_cell(shapes, 5)
    assert cells[:, 0].sum() == 0 and cells.sum() == 2 * 4 * 100


def test_cli_prints_the_estimate_as_json(tmp_path: Path, capsys) -> None:
    write_fixture(tmp_path, family="gpt2", kind="clt")
    code = main(
        [
            "estimate",
            "--model",
            str(tmp_path / "model"),
            "--transcoders",
            str(tmp_path / "transcoders"),
            "--prompt",
            "the capital of the state containing Dallas is",
            "--max-feature-nodes",
            "7",
            "--json",
        ]
    )
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    rm = ReplacementModel.from_pretrained(str(tmp_path / "model"), str(tmp_path / "transcoders"))
    assert found["feature_nodes"] == 7 and found["active_from"] == "prompt"
    assert found["n_pos"] == rm.tokenize("the capital of the state containing Dallas is").shape[0]
    assert shapes_of_model(rm).d_transcoder == found["d_transcoder"]


# ---- hub profiles, without downloading weights -------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hub_server import FakeHubServer, point_client_at

    with FakeHubServer() as hub:
        point_client_at(hub, monkeypatch, tmp_path / "hf-home")
        yield hub


@pytest.mark.parametrize("stored", ["safetensors", "npz-in-another-repo"])
def test_no_weights_estimate_of_a_hub_profile_reads_only_headers(
    fake_hub, tmp_path: Path, capsys, stored: str
) -> None:
    import io

    import numpy as np
    import yaml
    from safetensors.torch import load_file

    local = write_fixture(tmp_path / "local", family="llama", kind="plt-topk")
    fake_hub.add_folder("org/tiny-model", local["model"])
    weights = sorted(local["transcoders"].glob("layer_*.safetensors"))
    if stored == "safetensors":
        fake_hub.add_folder("org/tiny-set", local["transcoders"])
        weight_bytes = sum(p.stat().st_size for p in weights)
    else:  # GemmaScope's shape: a config listing params.npz files of another repo
        files = {}
        for i, path in enumerate(weights):
            tensors, buffer = load_file(path), io.BytesIO()
            tensors["W_enc"] = tensors["W_enc"].T  # GemmaScope stores (d_model, d_transcoder)
            np.savez(buffer, **{k: v.numpy() for k, v in tensors.items()})
            files[f"layer_{i}/params.npz"] = buffer.getvalue()
        fake_hub.add_repo("org/weights", files)
        config = yaml.safe_load((local["transcoders"] / "config.yaml").read_text())
        config["transcoders"] = [f"hf://org/weights/{name}" for name in files]
        fake_hub.add_repo("org/tiny-set", {"config.yaml": yaml.safe_dump(config).encode()})
        weight_bytes = sum(len(b) for b in files.values())
    prompt = "the capital of the state containing Dallas is"
    args = ["estimate", "--prompt", prompt, "--no-weights", "--json"]
    assert main([*args, "--model", "org/tiny-model", "--transcoders", "hf://org/tiny-set"]) == 0
    remote = json.loads(capsys.readouterr().out)

    # no weight file crossed the network whole: only ranged reads of their headers
    weight_gets = [
        r for r in fake_hub.requests if r.startswith("GET") and (".safetensors" in r or ".npz" in r)
    ]
    assert weight_gets and all("bytes=" in r for r in weight_gets)
    cache = Path(constants_cache())
    assert not [p for p in cache.rglob("*") if p.suffix in (".safetensors", ".npz")]
    model_bytes = sum(p.stat().st_size for p in local["model"].iterdir())
    assert remote["download_bytes"] == model_bytes + weight_bytes

    found = estimate_prompt(
        str(local["model"]), str(local["transcoders"]), prompt, use_weights=False
    )
    same = {
        k: v for k, v in found.to_dict().items() if k not in ("available_bytes", "download_bytes")
    }
    assert {k: remote[k] for k in same} == same
    assert found.download_bytes == 0


def constants_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
