"""Tests for tracer/cli/: `tracer fixture | attribute | prune | score`, run in-process.

End to end on the fixture model (4 layers, d_model 64, context 128), then every kind of bad input:
each must exit with code 2, say what is wrong on stderr and leave no output file behind.
Expected numbers are recomputed here from the graph file with the library's Graph API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from transformers import AutoTokenizer

from tracer.cli import main
from tracer.graph.graph import Graph
from tracer.testing import build_transcoders
from tracer.transcoders.files import save_transcoders

PROMPT = "the capital of the state containing Dallas is"
N_FEATURES = 40  # --max-feature-nodes of the end-to-end graph
SCORE_KEYS = ("replacement", "completeness", "pruned_replacement", "pruned_completeness")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fixture")
    code, out, _ = run_cli(["fixture", "--out", str(folder)])
    assert code == 0
    assert json.loads(out) == {
        "model": str(folder / "model"),
        "transcoders": str(folder / "transcoders"),
    }
    return folder


@pytest.fixture(scope="module")
def attributed(fixture_dir: Path) -> tuple[Path, dict]:
    """(graph file, printed summary) of `tracer attribute --max-feature-nodes N_FEATURES`."""
    graph = fixture_dir / "graphs" / "g.safetensors"
    code, out, err = run_cli(
        [
            "attribute",
            "--model",
            str(fixture_dir / "model"),
            "--transcoders",
            str(fixture_dir / "transcoders"),
            "--prompt",
            PROMPT,
            "--out",
            str(graph),
            "--max-feature-nodes",
            str(N_FEATURES),
            "--quiet",
        ]
    )
    assert code == 0, err
    return graph, json.loads(out)


def attribute_args(fixture_dir: Path, out: Path, **overrides: str) -> list[str]:
    """`tracer attribute` arguments on the fixture; overrides replace --model/--prompt/..."""
    options = {
        "model": str(fixture_dir / "model"),
        "transcoders": str(fixture_dir / "transcoders"),
        "prompt": PROMPT,
        "out": str(out),
    } | overrides
    args = ["attribute", "--quiet"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def graph_args(command: str, graph: Path, out: Path) -> list[str]:
    """`tracer prune|score GRAPH`, with `--json OUT` for prune."""
    return [command, str(graph), *(["--json", str(out)] if command == "prune" else [])]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- end to end


def test_attribute_keeps_exactly_max_feature_nodes(
    attributed: tuple[Path, dict], fixture_dir: Path
) -> None:
    path, summary = attributed
    graph = Graph.load(path)
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    n_tokens = 1 + len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])  # + BOS
    assert summary["graph"] == str(path)
    assert summary["tokens"] == graph.n_pos == n_tokens
    assert summary["feature_nodes"] == graph.layout.n_features == N_FEATURES
    assert graph.selected_features.shape == (N_FEATURES,)
    assert summary["active_features"] == graph.active_features.shape[0] > N_FEATURES
    assert summary["logits"] == [t.label for t in graph.logit_targets]
    n = graph.layout.n_nodes
    assert summary["file"]["file_bytes"] == path.stat().st_size
    assert summary["file"]["dense_bytes"] == n * n * graph.adjacency_matrix.element_size()
    assert graph.input_string == PROMPT
    assert graph.metadata["model_id"] == str(fixture_dir / "model")
    assert graph.metadata["transcoder_set"] == str(fixture_dir / "transcoders")
    assert graph.metadata["config"]["max_feature_nodes"] == N_FEATURES


@pytest.mark.parametrize("thresholds", [(), ("--node-threshold", "0.5", "--edge-threshold", "0.9")])
def test_prune_writes_only_kept_nodes_and_edges(
    attributed: tuple[Path, dict],
    fixture_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    thresholds: tuple[str, ...],
) -> None:
    path, _ = attributed
    node_threshold = float(thresholds[1]) if thresholds else 0.8
    edge_threshold = float(thresholds[3]) if thresholds else 0.98
    out = tmp_path / "viewer" / "g.json"
    assert main(["prune", str(path), "--json", str(out), *thresholds]) == 0
    summary = json.loads(capsys.readouterr().out)
    document = json.loads(out.read_text())
    graph = Graph.load(path)
    result = graph.prune(node_threshold, edge_threshold)
    n_kept = int(result.node_mask.sum())
    assert n_kept < graph.layout.n_nodes  # pruning did drop something
    assert len(document["nodes"]) == summary["nodes"] == n_kept
    assert len(document["links"]) == summary["links"] == int(result.edge_mask.sum())
    assert document["metadata"]["node_threshold"] == node_threshold
    assert document["metadata"]["edge_threshold"] == edge_threshold
    # Token labels come from the model's tokenizer, found through the graph's model id.
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    expected = [tokenizer.decode([t]) for t in graph.input_tokens.tolist()]
    assert document["metadata"]["prompt_tokens"] == expected
    assert list(out.parent.iterdir()) == [out]


def test_score_equals_graph_scores(
    attributed: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = attributed
    assert main(["score", str(path), "--node-threshold", "0.7", "--edge-threshold", "0.95"]) == 0
    scores = json.loads(capsys.readouterr().out)
    for key in SCORE_KEYS:
        assert 0 <= scores[key] <= 1, key
    graph = Graph.load(path)
    result = graph.prune(0.7, 0.95)
    full, pruned = graph.scores(), graph.scores(result)
    assert scores["replacement"] == full.replacement
    assert scores["completeness"] == full.completeness
    assert scores["pruned_replacement"] == pruned.replacement
    assert scores["pruned_completeness"] == pruned.completeness
    assert scores["pruned_nodes"] == int(result.node_mask.sum())
    assert scores["pruned_edges"] == int(result.edge_mask.sum())
    assert (scores["node_threshold"], scores["edge_threshold"]) == (0.7, 0.95)


def test_console_script(attributed: tuple[Path, dict], tmp_path: Path) -> None:
    """The installed `tracer` entry point: JSON on stdout, and exit code 2 on a bad file."""
    path, _ = attributed
    script = Path(sys.executable).parent / "tracer"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    good = subprocess.run([script, "score", path], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["replacement"] == Graph.load(path).scores().replacement
    bad_run = subprocess.run([script, "score", bad], capture_output=True, text=True, timeout=120)
    assert bad_run.returncode == 2
    assert str(bad) in bad_run.stderr and "Traceback" not in bad_run.stderr


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def narrow_transcoders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid transcoder set for 4 layers of d_model 48 (the fixture model has 64)."""
    ts = build_transcoders("plt-relu", n_layers=4, d_model=48, d_transcoder=16)
    return save_transcoders(ts, tmp_path_factory.mktemp("narrow") / "transcoders")


@pytest.fixture(scope="module")
def unknown_kind_transcoders(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unknown-kind") / "transcoders"
    shutil.copytree(fixture_dir / "transcoders", folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model_kind"] = "mystery_transcoder"
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


BAD_ATTRIBUTE = {
    "empty prompt": ({"prompt": ""}, ["prompt is empty"]),
    "blank prompt": ({"prompt": "   "}, ["prompt is empty"]),
    "prompt past the context": ({"prompt": "the " * 128}, ["129 tokens", "128"]),
    "two-token target": ({"target": "Dallas is"}, ["'Dallas is'", "2 tokens"]),
    "missing model folder": ({"model": "{tmp}/no-such-model"}, ["{tmp}/no-such-model"]),
    "missing transcoder folder": ({"transcoders": "{tmp}/no-such-set"}, ["{tmp}/no-such-set"]),
    "transcoders of another d_model": ({"transcoders": "{narrow}"}, ["48", "64"]),
    "unknown model_kind": ({"transcoders": "{unknown_kind}"}, ["model_kind", "mystery"]),
}


@pytest.mark.parametrize("case", list(BAD_ATTRIBUTE))
def test_attribute_rejects_bad_input(
    case: str,
    fixture_dir: Path,
    narrow_transcoders: Path,
    unknown_kind_transcoders: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides, needles = BAD_ATTRIBUTE[case]
    places = {
        "tmp": tmp_path,
        "narrow": narrow_transcoders,
        "unknown_kind": unknown_kind_transcoders,
    }
    out = tmp_path / "out" / "g.safetensors"
    args = attribute_args(fixture_dir, out, **{k: v.format(**places) for k, v in overrides.items()})
    before = files_under(fixture_dir)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err.split("tracer attribute: error: ", 1)[1]  # after loading progress
    for needle in needles:
        assert needle.format(**places) in message, message
    assert not (tmp_path / "out").exists()
    assert files_under(fixture_dir) == before


BAD_OPTIONS = {
    "--max-feature-nodes 0": (
        ["--max-feature-nodes", "0"],
        "--max-feature-nodes must be an integer >= 1, got 0",
    ),
    "--max-feature-nodes 2.5": (
        ["--max-feature-nodes", "2.5"],
        "--max-feature-nodes must be an integer >= 1, got '2.5'",
    ),
    "--batch-size -1": (["--batch-size", "-1"], "--batch-size must be an integer >= 1, got -1"),
    "--desired-logit-prob 2": (
        ["--desired-logit-prob", "2"],
        "--desired-logit-prob must be in [0, 1], got 2.0",
    ),
    "--dtype float16": (["--dtype", "float16"], "invalid choice: 'float16'"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_attribute_rejects_bad_options(
    case: str, fixture_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, needle = BAD_OPTIONS[case]
    out = tmp_path / "out" / "g.safetensors"
    with pytest.raises(SystemExit) as caught:
        main([*attribute_args(fixture_dir, out), *extra])
    assert caught.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


BAD_THRESHOLDS = {
    "--node-threshold 1.5": (
        ["--node-threshold", "1.5"],
        "--node-threshold must be in [0, 1], got 1.5",
    ),
    "--edge-threshold -0.1": (
        ["--edge-threshold", "-0.1"],
        "--edge-threshold must be in [0, 1], got -0.1",
    ),
    "--node-threshold nan": (["--node-threshold", "nan"], "--node-threshold must be in [0, 1]"),
    "--edge-threshold high": (
        ["--edge-threshold", "high"],
        "--edge-threshold must be in [0, 1], got 'high'",
    ),
}


@pytest.mark.parametrize("command", ["prune", "score"])
@pytest.mark.parametrize("case", list(BAD_THRESHOLDS))
def test_thresholds_outside_unit_interval_are_rejected(
    case: str,
    command: str,
    attributed: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra, needle = BAD_THRESHOLDS[case]
    out = tmp_path / "g.json"
    with pytest.raises(SystemExit) as caught:
        main([*graph_args(command, attributed[0], out), *extra])
    assert caught.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


BAD_GRAPHS = {
    "random bytes": lambda path, good: path.write_bytes(os.urandom(999)),
    "truncated": lambda path, good: path.write_bytes(good.read_bytes()[:-100]),
    "missing": lambda path, good: None,
}


@pytest.mark.parametrize("command", ["prune", "score"])
@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_corrupt_graph_is_rejected(
    case: str,
    command: str,
    attributed: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "g.safetensors"
    BAD_GRAPHS[case](path, attributed[0])
    out = tmp_path / "viewer" / "g.json"
    assert main(graph_args(command, path, out)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(path) in captured.err.split(f"tracer {command}: error: ", 1)[1]
    assert not out.parent.exists()


# ---------------------------------------------------------------------------- tokenizer of prune


def test_prune_without_the_models_tokenizer_labels_tokens_by_id(
    attributed: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The graph's model folder moved (or the model was in memory): prune still works."""
    graph = Graph.load(attributed[0])
    for model_id in (str(tmp_path / "moved-model"), "unknown"):
        graph.metadata["model_id"] = model_id
        path = graph.save(tmp_path / "moved.safetensors")
        out = tmp_path / "moved.json"
        assert main(["prune", str(path), "--json", str(out)]) == 0
        captured = capsys.readouterr()
        assert "tokenizer" in captured.err and model_id in captured.err
        tokens = json.loads(out.read_text())["metadata"]["prompt_tokens"]
        assert tokens == [str(t) for t in graph.input_tokens.tolist()]


def test_prune_with_a_missing_explicit_tokenizer_fails(
    attributed: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g.json"
    missing = tmp_path / "no-tokenizer"
    args = ["prune", str(attributed[0]), "--json", str(out), "--tokenizer", str(missing)]
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()
