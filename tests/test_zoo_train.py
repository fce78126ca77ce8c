"""Zoo LM training: a short run learns, saved models reload in transformers and in tracer."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tracer.zoo.config import CorpusConfig, LMConfig
from tracer.zoo.corpus import EvalPrompt, build_corpus, vocabulary
from tracer.zoo.tokenizer import build_tokenizer
from tracer.zoo.train import accuracy, build_lm, encode_sentences, train_lm


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = build_corpus(CorpusConfig(n_train=2000))
    return corpus, build_tokenizer(vocabulary(corpus))


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "gemma2"])
def test_short_training_run_decreases_loss(architecture, corpus_and_tokenizer, tmp_path):
    corpus, tokenizer = corpus_and_tokenizer
    config = LMConfig(
        architecture=architecture,
        n_layers=2,
        d_model=32,
        n_heads=2,
        d_mlp=64,
        steps=60,
        batch_size=16,
        lr=1e-2,
        warmup=5,
    )
    model = build_lm(config, tokenizer)
    losses = train_lm(model, tokenizer, corpus.train, config, progress=False)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_accuracy_counts_argmax_hits(corpus_and_tokenizer):
    """A model whose logits always favour one word scores 1 exactly on prompts answered by it."""
    _, tokenizer = corpus_and_tokenizer
    word = "austin"
    target = tokenizer.convert_tokens_to_ids(word)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., target] = 1.0
            return type("Out", (), {"logits": logits})

    prompts = [
        EvalPrompt("the capital of texas is", "austin", "single_hop", False),
        EvalPrompt("the opposite of hot is", "cold", "antonym", True),
        EvalPrompt("the opposite of cold is", "hot", "antonym", True),
    ]
    scores = accuracy(Fixed(), tokenizer, prompts)
    assert scores == {"antonym/held_out": 0.0, "single_hop/trained": 1.0}


def test_bad_config_and_long_sentences_are_refused(corpus_and_tokenizer):
    _, tokenizer = corpus_and_tokenizer
    with pytest.raises(ValueError, match="architecture"):
        LMConfig(architecture="mamba")
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="exceeds the context"):
        encode_sentences(tokenizer, ["one two three four five six seven"], context=8)
