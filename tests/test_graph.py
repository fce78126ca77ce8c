"""Tests for tracer/graph/graph.py: the graph file (round trip, header, bad files, atomic save) and
the node layout of a real attribution graph on a tiny model.

Expectations come from outside the code under test: the safetensors header is read with
`safe_open`, tokens come from the tokenizer, logit probabilities from a plain forward of the
Hugging Face model, and the structural zeros from what the local replacement model can reach.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tracer.graph.graph
from tracer.attribution.attribute import attribute
from tracer.graph.graph import TENSOR_FIELDS, Graph, LogitTarget
from tracer.graph.storage import TENSOR_NAMES
from tracer.model.replacement import ReplacementModel


@pytest.fixture(scope="module")
def saved(plt_graph: Graph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plt_graph.save(tmp_path_factory.mktemp("graph") / "g.safetensors")


def token_id(model: ReplacementModel, word: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(word)


# ---------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(plt_graph: Graph, saved: Path, tiny_prompt: str) -> None:
    loaded = Graph.load(saved)
    for name in TENSOR_FIELDS:
        original, copy = getattr(plt_graph, name), getattr(loaded, name)
        assert copy.dtype == original.dtype, name
        assert torch.equal(copy, original), name
    assert loaded.logit_targets == plt_graph.logit_targets
    assert loaded.metadata == plt_graph.metadata
    assert loaded.input_string == plt_graph.input_string == tiny_prompt
    assert loaded.n_layers == plt_graph.n_layers
    assert loaded.layout == plt_graph.layout


def test_custom_direction_targets_survive(
    plt_model: ReplacementModel, tiny_prompt: str, tmp_path: Path
) -> None:
    austin, dallas = token_id(plt_model, "Austin"), token_id(plt_model, "Dallas")
    direction = LogitTarget("Austin - Dallas", (austin, dallas), (1.0, -1.0), 0.5)
    graph = attribute(
        tiny_prompt,
        plt_model,
        targets=[direction, "Austin", dallas],
        max_feature_nodes=8,
        progress=False,
    )
    loaded = Graph.load(graph.save(tmp_path / "custom.safetensors"))
    assert loaded.logit_targets == graph.logit_targets
    assert loaded.logit_targets[0] == direction
    assert [t.token_ids for t in loaded.logit_targets[1:]] == [(austin,), (dallas,)]
    assert torch.equal(loaded.adjacency_matrix, graph.adjacency_matrix)
    # The direction's row is the difference of the two plain logit rows (the mean cancels).
    rows = loaded.adjacency_matrix[loaded.layout.logit_slice]
    scale = rows.abs().max()
    torch.testing.assert_close(rows[0], rows[1] - rows[2], atol=1e-5 * scale, rtol=0)


def test_logit_targets_are_the_models_top_tokens(
    plt_graph: Graph, plt_model: ReplacementModel
) -> None:
    """Top tokens until 0.95 cumulative probability (at most 10), from a plain forward."""
    with torch.no_grad():
        logits = plt_model.model(plt_graph.input_tokens[None]).logits[0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    order = probs.argsort(descending=True).tolist()
    expected, total = [], 0.0
    for token in order[:10]:
        expected.append(token)
        total += float(probs[token])
        if total >= 0.95:
            break
    assert [t.token_ids for t in plt_graph.logit_targets] == [(t,) for t in expected]
    got = torch.tensor([t.probability for t in plt_graph.logit_targets], dtype=torch.float64)
    torch.testing.assert_close(got, probs[expected], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- header


def test_file_is_self_describing(
    saved: Path, plt_graph: Graph, plt_model: ReplacementModel, tiny_prompt: str
) -> None:
    with safe_open(str(saved), framework="pt") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
        tokens = handle.get_tensor("input_tokens")
    header = json.loads(metadata["tracer"])
    # The tiny graph is about 15% dense: its adjacency is stored as a bitmap and values.
    adjacency = plt_graph.adjacency_matrix
    nonzero = int((adjacency.view(torch.int32) != 0).sum())
    assert nonzero < 0.2 * adjacency.numel()
    assert header["adjacency"] == {
        "encoding": "bitmap-zlib",
        "n_nodes": plt_graph.layout.n_nodes,
        "dtype": "float32",
        "nonzero": nonzero,
    }
    assert names == set(TENSOR_FIELDS) - {"adjacency_matrix"} | set(TENSOR_NAMES["bitmap-zlib"])
    assert header["format"] == "tracer.graph/2"
    assert header["library_version"] == version("tracer")
    assert header["input_string"] == tiny_prompt
    assert header["n_layers"] == 2
    bos = plt_model.tokenizer.bos_token_id
    words = plt_model.tokenizer(tiny_prompt, add_special_tokens=False)["input_ids"]
    assert tokens.tolist() == [bos, *words]
    info = header["metadata"]
    assert info["model_id"] == "tiny-gpt2-plt-relu"
    assert info["transcoder_set"] == "fixture:plt-relu"
    assert "model_revision" in info and "transcoder_revision" in info
    assert info["config"] == {
        "max_n_logits": 10,
        "desired_logit_prob": 0.95,
        "batch_size": 256,
        "max_feature_nodes": None,
        "zero_bos": True,
        "custom_targets": False,
        "adjacency_dtype": "float32",
    }
    assert [tuple(t["token_ids"]) for t in header["logit_targets"]] == [
        t.token_ids for t in plt_graph.logit_targets
    ]


# ---------------------------------------------------------------------------- bad files


def write_with_header(
    saved: Path, path: Path, header: str | None, drop: tuple[str, ...] = (), **changes
) -> Path:
    """A copy of `saved` with the tracer header replaced (None: no header), tensors changed
    and the tensors named in `drop` left out."""
    with safe_open(str(saved), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in drop}
    tensors.update(changes)
    save_file(tensors, str(path), metadata=None if header is None else {"tracer": header})
    return path


def saved_header(saved: Path) -> dict:
    with safe_open(str(saved), framework="pt") as handle:
        return json.loads(handle.metadata()["tracer"])


def truncated(saved: Path, path: Path, keep: int) -> Path:
    data = saved.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    return path


BAD_FILES = {
    "empty": lambda saved, p: truncated(saved, p, 0),
    "truncated in the length prefix": lambda saved, p: truncated(saved, p, 5),
    "truncated in the header": lambda saved, p: truncated(saved, p, 60),
    "truncated in the tensors": lambda saved, p: truncated(saved, p, -1),
    "truncated by half": lambda saved, p: truncated(saved, p, saved.stat().st_size // 2),
    "random bytes": lambda saved, p: p.write_bytes(os.urandom(4096)) and p,
    "safetensors without our header": lambda saved, p: write_with_header(saved, p, None),
    "other metadata only": lambda saved, p: (
        save_file({"x": torch.zeros(3)}, str(p), metadata={"format": "pt"}) or p
    ),
    "header not JSON": lambda saved, p: write_with_header(saved, p, "{not json"),
    "header a JSON list": lambda saved, p: write_with_header(saved, p, "[1, 2]"),
    "header of another format": lambda saved, p: write_with_header(
        saved, p, json.dumps(saved_header(saved) | {"format": "other/9"})
    ),
    "header without logit targets": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps({k: v for k, v in saved_header(saved).items() if k != "logit_targets"}),
    ),
    "logit target without weights": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps(
            saved_header(saved)
            | {"logit_targets": [{"label": "x", "token_ids": [1], "probability": 0.5}]}
        ),
    ),
    "n_layers not a number": lambda saved, p: write_with_header(
        saved, p, json.dumps(saved_header(saved) | {"n_layers": "two"})
    ),
    "adjacency of the wrong size": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps(
            saved_header(saved)
            | {"adjacency": {"encoding": "dense", "n_nodes": 3, "dtype": "float32", "nonzero": 0}}
        ),
        drop=TENSOR_NAMES["bitmap-zlib"],
        adjacency_matrix=torch.zeros(3, 3),
    ),
    "old-format adjacency of the wrong size": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps(saved_header(saved) | {"format": "tracer.graph/1"}),
        drop=TENSOR_NAMES["bitmap-zlib"],
        adjacency_matrix=torch.zeros(3, 3),
    ),
    "selected feature out of range": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps(saved_header(saved)),
        selected_features=torch.full_like(Graph.load(saved).selected_features, 10**6),
    ),
    "active features not (n, 3)": lambda saved, p: write_with_header(
        saved,
        p,
        json.dumps(saved_header(saved)),
        active_features=Graph.load(saved).active_features[:, :2].contiguous(),
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_raises_a_clear_error(saved: Path, tmp_path: Path, kind: str) -> None:
    path = BAD_FILES[kind](saved, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as caught:
        Graph.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("missing", ["absent.safetensors", "a/folder"])
def test_missing_file_raises_file_not_found(tmp_path: Path, missing: str) -> None:
    path = tmp_path / missing
    if missing == "a/folder":
        path.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as caught:
        Graph.load(path)
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------------------- atomic save


def _failing_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    Path(filename).write_bytes(b"partial graph")
    raise OSError("simulated: no space left on device")


def test_failed_save_leaves_no_file(
    plt_graph: Graph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracer.graph.graph, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        plt_graph.save(tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_older_graph(
    plt_graph: Graph, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "g.safetensors"
    target.write_bytes(saved.read_bytes())
    monkeypatch.setattr(tracer.graph.graph, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        plt_graph.save(target)
    assert os.listdir(tmp_path) == ["g.safetensors"]
    assert target.read_bytes() == saved.read_bytes()
    assert torch.equal(Graph.load(target).adjacency_matrix, plt_graph.adjacency_matrix)


def test_save_replaces_and_leaves_no_temp_file(plt_graph: Graph, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "g.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    plt_graph.save(target)
    assert os.listdir(target.parent) == ["g.safetensors"]
    assert torch.equal(Graph.load(target).adjacency_matrix, plt_graph.adjacency_matrix)


# ---------------------------------------------------------------------------- layout


def node_positions_and_layers(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) context position of every node, (N,) layer (tokens -1, logits n_layers)."""
    layout, n_pos = graph.layout, graph.n_pos
    features = graph.active_features[graph.selected_features]  # (n_features, 3)
    error_layer, error_pos = torch.meshgrid(
        torch.arange(graph.n_layers), torch.arange(n_pos), indexing="ij"
    )
    pos = torch.cat(
        [
            features[:, 1],
            error_pos.reshape(-1),
            torch.arange(n_pos),
            torch.full((layout.n_logits,), n_pos - 1),
        ]
    )
    layer = torch.cat(
        [
            features[:, 0],
            error_layer.reshape(-1),
            torch.full((n_pos,), -1),
            torch.full((layout.n_logits,), graph.n_layers),
        ]
    )
    return pos, layer


@pytest.mark.parametrize("name", ["plt_graph", "clt_graph"])
def test_node_counts_and_order(name: str, request: pytest.FixtureRequest) -> None:
    graph: Graph = request.getfixturevalue(name)
    layout = graph.layout
    n_selected = graph.selected_features.shape[0]
    assert layout.n_features == n_selected
    assert layout.n_errors == graph.n_layers * graph.n_pos == 2 * 9
    assert layout.n_tokens == graph.n_pos == 9
    assert layout.n_logits == len(graph.logit_targets)
    n = n_selected + 2 * 9 + 9 + len(graph.logit_targets)
    assert graph.adjacency_matrix.shape == (n, n)
    # Without max_feature_nodes every active feature is a node, ordered by (layer, pos, feature).
    assert torch.equal(graph.selected_features, torch.arange(graph.active_features.shape[0]))
    keys = graph.active_features[graph.selected_features].tolist()
    assert keys == sorted(keys)
    assert len({tuple(k) for k in keys}) == len(keys)
    assert graph.activation_values.shape == (graph.active_features.shape[0],)
    assert bool((graph.activation_values != 0).all())


@pytest.mark.parametrize("name", ["plt_graph", "clt_graph"])
def test_structural_zeros(name: str, request: pytest.FixtureRequest) -> None:
    graph: Graph = request.getfixturevalue(name)
    layout, adjacency = graph.layout, graph.adjacency_matrix
    # Errors and tokens are sources only; nothing reads a logit.
    assert not adjacency[layout.error_slice].any()
    assert not adjacency[layout.token_slice].any()
    assert not adjacency[:, layout.logit_slice].any()
    # Causal attention: nothing reaches an earlier position.
    pos, layer = node_positions_and_layers(graph)
    assert not adjacency[pos[None, :] > pos[:, None]].any()
    # A feature reads its layer's MLP input: features and errors of that layer or later write
    # after it (a CLT decoder writes to layers >= its own), so they cannot reach it.
    features = torch.zeros(layout.n_nodes, dtype=torch.bool)
    features[layout.feature_slice] = True
    writers = features.clone()
    writers[layout.error_slice] = True
    too_late = features[:, None] & writers[None, :] & (layer[None, :] >= layer[:, None])
    assert not adjacency[too_late].any()
    # The start token: no active features there and its errors are zeroed.
    assert bool((graph.active_features[:, 1] > 0).all())
    assert not adjacency[:, layout.error_slice][:, pos[layout.error_slice] == 0].any()
    # The checks above are not vacuous: the graph has feature -> feature edges and every logit
    # row is reached by some token.
    feature_block = adjacency[layout.feature_slice, layout.feature_slice]
    assert bool((feature_block != 0).any())
    assert bool((adjacency[layout.logit_slice, layout.token_slice] != 0).any(dim=1).all())
