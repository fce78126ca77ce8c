"""The zoo's synthetic corpus (determinism, held-out hygiene, mixture) and word-level tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tracer.zoo.corpus import (
    ANTONYMS,
    NAMES,
    SEQUENCES,
    STATE_OF,
    STATES,
    TASKS,
    Corpus,
    CorpusConfig,
    build_corpus,
    vocabulary,
)
from tracer.zoo.tokenizer import SPECIAL_TOKENS, build_tokenizer

CONFIG = CorpusConfig(seed=3, n_train=4000)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(CONFIG)


def classify(sentence: str) -> str:
    """The task of a training sentence, read from its words alone."""
    words = sentence.split(" ")
    sequence_words = {w for seq, _ in SEQUENCES.values() for w in seq}
    if set(words) <= sequence_words:
        return "successor"
    if "opposite" in words:
        return "antonym"
    if "containing" in words:
        return "two_hop"
    if set(words) & set(NAMES):
        return "ioi"
    if set(words) & set(STATES):
        return "single_hop"
    return "unknown"


def test_same_config_gives_same_corpus_and_seed_changes_it(corpus: Corpus) -> None:
    again = build_corpus(CONFIG)
    assert again.train == corpus.train
    assert again.train_tasks == corpus.train_tasks
    assert again.eval == corpus.eval
    other = build_corpus(CONFIG.model_copy(update={"seed": 4}))
    assert other.train != corpus.train


def test_held_out_compositions_unseen_but_both_hops_trained(corpus: Corpus) -> None:
    train, text = set(corpus.train), "\n".join(corpus.train)
    two_hop = corpus.eval["two_hop"]
    held = [e for e in two_hop if e.held_out]
    n_compositions = sum(len(cities) for _, cities in STATES.values())
    assert len(two_hop) == n_compositions
    assert len(held) == round(CONFIG.two_hop_held_out * n_compositions) > 0
    for e in two_hop:
        city = e.prompt.split(" ")[-2]
        state = STATE_OF[city]
        assert e.answer == STATES[state][0]
        assert f"{city} is in the state of {state}" in train
        assert f"the capital of {state} is {e.answer}" in train
        if e.held_out:
            assert f"{e.prompt} {e.answer}" not in text
        else:
            assert f"{e.prompt} {e.answer}" in train


def test_no_held_out_prompt_is_trained(corpus: Corpus) -> None:
    text = "\n".join(corpus.train)
    ioi_pairs = [set(s.split(" ")) & set(NAMES) for s in corpus.train if classify(s) == "ioi"]
    for task in TASKS:
        for e in corpus.eval[task]:
            if not e.held_out:
                continue
            assert f"{e.prompt} {e.answer}" not in text, e
            if task == "ioi":
                names = set(e.prompt.split(" ")) & set(NAMES)
                assert len(names) == 2 and e.answer in names
                assert not any(names == pair for pair in ioi_pairs), e
    held = {t: sum(e.held_out for e in corpus.eval[t]) for t in TASKS}
    assert held["ioi"] == CONFIG.n_eval_ioi
    assert held["antonym"] == 2 * round(CONFIG.antonym_held_out * len(ANTONYMS))


def test_eval_answers_follow_the_fact_tables(corpus: Corpus) -> None:
    pairs = {frozenset(p) for p in ANTONYMS}
    for e in corpus.eval["antonym"]:
        first = e.prompt.split(" ")[0 if e.prompt.endswith(" of") else -2]
        assert frozenset((first, e.answer)) in pairs, e
    for e in corpus.eval["successor"]:
        words, cyclic = next(s for s in SEQUENCES.values() if e.answer in s[0])
        *_, before, last = e.prompt.split(" ")
        i = words.index(last)
        assert words[i - 1] == before and (cyclic or i + 1 < len(words))
        assert words[(i + 1) % len(words)] == e.answer
    for e in corpus.eval["ioi"]:
        words = e.prompt.split(" ")
        assert e.answer in words and words.count(e.answer) == 1 and words.count(words[-5]) == 2


def test_eval_words_are_trained_vocabulary(corpus: Corpus) -> None:
    vocab = set(vocabulary(corpus))
    assert vocabulary(corpus) == sorted(vocab)
    for task in TASKS:
        assert corpus.eval[task], task
        for e in corpus.eval[task]:
            assert e.task == task
            assert e.answer in vocab and " " not in e.answer
            assert set(e.prompt.split(" ")) <= vocab, e


def test_tasks_mixed_in_configured_proportion(corpus: Corpus) -> None:
    assert len(corpus.train) == CONFIG.n_train
    assert [classify(s) for s in corpus.train] == corpus.train_tasks
    total = sum(CONFIG.mix.values())
    for task in TASKS:
        expected = CONFIG.n_train * CONFIG.mix[task] / total
        assert abs(corpus.train_tasks.count(task) - expected) <= 1, task
    for sentence in corpus.train[:200]:
        assert sentence == " ".join(sentence.split()) and sentence == sentence.lower()


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="mix"):
        CorpusConfig(mix={"ioi": 1.0})
    with pytest.raises(ValueError, match="single_hop"):
        build_corpus(CorpusConfig(n_train=100))
    with pytest.raises(ValueError, match="two_hop_held_out"):
        build_corpus(CorpusConfig(two_hop_held_out=0.9))


def test_tokenizer_round_trips_through_save_pretrained(corpus: Corpus, tmp_path) -> None:
    words = vocabulary(corpus)
    build_tokenizer(words).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert ids == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens(ids) == list(SPECIAL_TOKENS)
    assert len(tok) == len(words) + 4
    assert tok.convert_tokens_to_ids(words) == list(range(4, len(words) + 4))
    sentences = [e.prompt for t in TASKS for e in corpus.eval[t]] + corpus.train[:100]
    assert any(" , " in s for s in sentences)  # punctuation must survive decoding
    for s in sentences:
        encoded = tok(s)["input_ids"]
        assert len(encoded) == len(s.split(" ")) and tok.unk_token_id not in encoded
        assert tok.decode(encoded) == s
    assert tok("dallas zanzibar")["input_ids"] == [tok.convert_tokens_to_ids("dallas"), 3]


def test_tokenizer_refuses_bad_words() -> None:
    for words in (["a", "a"], ["a", "<unk>"], ["a b"], [""]):
        with pytest.raises(ValueError, match="words"):
            build_tokenizer(words)
