"""The committed zoo: every model and transcoder set meets its report, recomputed here."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tracer.experiments.params import load_params
from tracer.transcoders.files import load_transcoders
from tracer.zoo.layout import (
    REPO_ROOT,
    load_tokenizer,
    model_dir,
    read_corpus,
    report_path,
    transcoder_dir,
)
from tracer.zoo.train import accuracy
from tracer.zoo.transcoder_training import collect_activations, evaluate_transcoders

PARAMS = load_params(REPO_ROOT / "params.yaml").zoo
ZOO = REPO_ROOT / PARAMS.out_dir
EVAL_SENTENCES = 2000  # as pipelines/zoo_transcoders.py: reports use the corpus's last sentences
CHANCE_TWO_HOP = 0.5  # the 10 states' capitals are the plausible answers: chance is ~0.1


def report(model: str, what: str) -> dict:
    return json.loads(report_path(ZOO, model, what).read_text())


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(ZOO)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ZOO)


def load(name: str):
    return AutoModelForCausalLM.from_pretrained(model_dir(ZOO, name), dtype=torch.float32).eval()


def test_zoo_is_small():
    size = sum(f.stat().st_size for f in Path(ZOO).rglob("*") if f.is_file())
    assert size < 25 * 2**20, f"zoo is {size / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", sorted(PARAMS.models))
def test_model_meets_reported_accuracy(name, corpus, tokenizer):
    _, prompts = corpus
    measured = accuracy(load(name), tokenizer, prompts)
    reported = report(name, "lm")["accuracy"]
    assert measured.keys() == reported.keys()
    for key, value in reported.items():
        assert abs(measured[key] - value) <= 0.02, key
    assert measured["two_hop/held_out"] >= CHANCE_TWO_HOP


@pytest.mark.parametrize("name", sorted(PARAMS.models))
def test_transcoders_meet_reported_variance_explained(name, corpus, tokenizer):
    train, _ = corpus
    held = train[-EVAL_SENTENCES:]
    activations = collect_activations(load(name), tokenizer, held, PARAMS.activation_tokens // 4)
    reported = report(name, "transcoders")
    assert set(reported) == set(PARAMS.transcoders)
    for kind in PARAMS.transcoders:
        ts = load_transcoders(transcoder_dir(ZOO, name, kind))
        measured = evaluate_transcoders(ts, activations)
        for layer, value in enumerate(reported[kind]["variance_explained"]):
            assert abs(measured["variance_explained"][layer] - value) <= 0.01, (kind, layer)
        assert min(measured["variance_explained"]) > 0.5, kind


def test_showcase_graph_scores_and_state_swap_match_the_report():
    """The GPT-2 zoo model with its CLT on a held-out two-hop prompt: scores recorded in the report
    and README are recomputed here (within 0.02), and the state swap does what the report says."""
    from tracer.model.replacement import ReplacementModel
    from tracer.zoo.showcase import run_showcase

    reported = report("gpt2", "showcase")
    model = ReplacementModel.from_pretrained(
        str(model_dir(ZOO, "gpt2")), str(transcoder_dir(ZOO, "gpt2", "clt"))
    )
    measured = run_showcase(model, reported["city"], reported["swap_city"])
    assert reported["prompt"] in {p.prompt for p in read_corpus(ZOO)[1] if p.held_out}
    for key, value in reported["scores"].items():
        assert abs(measured["scores"][key] - value) <= 0.02, key
    assert measured["intervention"] == reported["intervention"]
    readme = (REPO_ROOT / "README.md").read_text()
    for key in ("replacement", "completeness", "pruned_replacement", "pruned_completeness"):
        assert f"{reported['scores'][key]:.2f}" in readme, key
