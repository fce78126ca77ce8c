"""Tests for `tracer intervene` and `tracer validate` (tracer/cli/), run in-process.

End to end on the fixture written by `write_fixture` (GPT-2 family, 4 layers, cross-layer set).
The "before" distribution and the clean continuation are recomputed here with the plain Hugging Face
model; bad change specs must exit 2 naming the spec and the valid form.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracer.graph.graph import Graph
from tracer.interventions.intervene import FeatureChange, intervene
from tracer.interventions.validation import select_nodes
from tracer.model.replacement import ReplacementModel
from tracer.testing import write_fixture

PROMPT = "the capital of the state containing Dallas is"


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("fixture"))["model"].parent


def model_args(folder: Path) -> list[str]:
    return ["--model", str(folder / "model"), "--transcoders", str(folder / "transcoders")]


def intervene_args(folder: Path, *extra: str, prompt: str = PROMPT) -> list[str]:
    return ["intervene", *model_args(folder), "--prompt", prompt, *extra]


@pytest.fixture(scope="module")
def hf_model(fixture_dir: Path):
    """(plain transformers model, prompt ids with the start token)."""
    model = AutoModelForCausalLM.from_pretrained(fixture_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    ids = [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    return model, torch.tensor([ids])


# ---------------------------------------------------------------------------- intervene


def test_intervene_prints_before_and_after(fixture_dir: Path, hf_model) -> None:
    code, out, err = run_cli(
        intervene_args(
            fixture_dir,
            "--set",
            "1:*:5=40",
            "--scale",
            "2:3:7=-2",
            "--top-k",
            "3",
            "--mode",
            "direct",
        )
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["mode"] == "direct"
    assert report["changes"] == ["1:*:5=40", "2:3:7=-2"]
    model, ids = hf_model
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1], -1).topk(3)
    assert [t["id"] for t in report["before"]] == probs.indices.tolist()
    for entry, p in zip(report["before"], probs.values.tolist(), strict=True):
        assert entry["probability"] == pytest.approx(p, rel=1e-5)
    # the same change through the library
    rm = ReplacementModel.from_pretrained(
        str(fixture_dir / "model"), str(fixture_dir / "transcoders")
    )
    changes = [FeatureChange(1, None, 5, value=40.0), FeatureChange(2, 3, 7, scale=-2.0)]
    after = torch.softmax(intervene(rm, PROMPT, changes, mode="direct").logits[0, -1], -1).topk(3)
    assert [t["id"] for t in report["after"]] == after.indices.tolist()
    assert [t["probability"] for t in report["after"]] == pytest.approx(after.values.tolist())
    assert report["after"] != report["before"]
    assert report["after"][0]["token"] == rm.tokenizer.decode([report["after"][0]["id"]])


def test_intervene_generates_with_and_without_the_change(fixture_dir: Path, hf_model) -> None:
    code, out, err = run_cli(intervene_args(fixture_dir, "--set", "3:*:5=60", "--generate", "3"))
    assert code == 0, err
    generated = json.loads(out)["generated"]
    model, ids = hf_model
    sequence = ids
    with torch.no_grad():
        for _ in range(3):  # greedy, by hand
            token = model(sequence).logits[0, -1].argmax()
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    assert generated["clean"]["ids"] == sequence[0, ids.shape[1] :].tolist()
    assert len(generated["intervened"]["ids"]) == 3
    assert generated["intervened"]["ids"] != generated["clean"]["ids"]
    assert isinstance(generated["clean"]["text"], str)


FORM = "LAYER:POS:FEATURE="
BAD_SPECS = {
    "too few fields": (["--set", "1:2"], ["'1:2'", FORM + "VALUE"]),
    "no value": (["--set", "1:2:3"], ["'1:2:3'", FORM + "VALUE"]),
    "layer not a number": (["--set", "a:1:2=0"], ["'a:1:2=0'", "not a number", FORM]),
    "value not a number": (["--set", "1:2:3=x"], ["'1:2:3=x'", "not a number", FORM]),
    "nan value": (["--set", "1:2:3=nan"], ["'1:2:3=nan'", "finite", FORM]),
    "inf factor": (["--scale", "1:2:3=inf"], ["--scale '1:2:3=inf'", "finite", FORM + "FACTOR"]),
    "layer out of range": (["--set", "9:1:2=0"], ["'9:1:2=0'", "layer 9", "[0, 4)", FORM]),
    "position out of range": (["--set", "1:99:2=0"], ["'1:99:2=0'", "position 99", FORM]),
    "negative position": (["--set", "1:-1:2=0"], ["'1:-1:2=0'", "position -1", FORM]),
    "feature out of range": (["--set", "1:1:999=0"], ["'1:1:999=0'", "[0, 128)", FORM]),
    "no change": ([], ["no intervention given", "--set"]),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_intervene_rejects_bad_specs(case: str, fixture_dir: Path) -> None:
    extra, needles = BAD_SPECS[case]
    code, out, err = run_cli(intervene_args(fixture_dir, *extra))
    assert code == 2
    assert out == ""
    message = err.split("tracer intervene: error: ", 1)[1]
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------- validate


@pytest.fixture(scope="module")
def graph_path(fixture_dir: Path) -> Path:
    path = fixture_dir / "graphs" / "g.safetensors"
    args = ["attribute", *model_args(fixture_dir), "--prompt", PROMPT, "--out", str(path)]
    code, _, err = run_cli([*args, "--max-feature-nodes", "60", "--quiet"])
    assert code == 0, err
    return path


def read_outputs(folder: Path) -> tuple[list[dict], dict]:
    with (folder / "validation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((folder / "validation.json").read_text())


def test_validate_writes_csv_and_json(graph_path: Path, fixture_dir: Path, tmp_path: Path) -> None:
    args = ["validate", str(graph_path), *model_args(fixture_dir), "--top-n", "4"]
    code, out, err = run_cli([*args, "--out-dir", str(tmp_path)])
    assert code == 0, err
    printed = json.loads(out)
    rows, document = read_outputs(tmp_path)
    graph = Graph.load(graph_path)
    k = len(graph.logit_targets)
    assert printed["nodes"] == 4
    assert len(rows) == len(document["rows"]) == printed["rows"] == 4 * k * 3
    assert printed["summary"] == document["summary"]
    assert set(document["summary"]) == {"direct", "frozen_attention", "full"}
    # nodes of the pruned graph (default thresholds), most influential first
    expected = select_nodes(graph, 4, graph.prune(0.8, 0.98)).tolist()
    assert list(dict.fromkeys(int(r["node"]) for r in rows)) == expected
    assert document["metadata"]["node_threshold"] == 0.8
    for row in rows:  # float32 fixture: direct predictions hold to float32 rounding
        if row["mode"] == "direct":
            assert float(row["relative_error"]) < 1e-3 or abs(float(row["measured"])) < 1e-4


def test_validate_with_fewer_nodes_than_top_n(
    graph_path: Path, fixture_dir: Path, tmp_path: Path
) -> None:
    args = ["validate", str(graph_path), *model_args(fixture_dir), "--top-n", "1000"]
    args += ["--no-prune", "--mode", "direct", "--out-dir", str(tmp_path)]
    code, out, err = run_cli(args)
    assert code == 0, err
    graph = Graph.load(graph_path)
    n_nodes = len(select_nodes(graph, 1000))
    assert 0 < n_nodes < 1000
    rows, document = read_outputs(tmp_path)
    assert json.loads(out)["nodes"] == n_nodes
    assert len(rows) == n_nodes * len(graph.logit_targets)
    assert set(document["summary"]) == {"direct"}


def test_validate_rejects_another_prompt(
    graph_path: Path, fixture_dir: Path, tmp_path: Path
) -> None:
    args = ["validate", str(graph_path), *model_args(fixture_dir), "--prompt", "the capital of"]
    code, out, err = run_cli([*args, "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert out == ""
    assert "the graph was computed from" in err.split("tracer validate: error: ", 1)[1]
    assert not (tmp_path / "out").exists()
