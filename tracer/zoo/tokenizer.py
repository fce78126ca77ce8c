"""A word-level fast tokenizer: one id per whitespace-separated word, special tokens at ids 0-3.

No BOS is added on encode: callers prepend `tokenizer.bos_token_id` themselves, so a prompt's ids
line up one-to-one with its words.
"""

from __future__ import annotations

from collections import Counter

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")  # ids 0, 1, 2, 3


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A WordLevel + WhitespaceSplit tokenizer: specials at ids 0-3, then `words` in order."""
    bad = [w for w in words if w.split() != [w]]
    if bad:
        raise ValueError(f"words must be non-empty and free of whitespace, got {bad[:5]}")
    clashes = sorted(set(words) & set(SPECIAL_TOKENS))
    if clashes:
        raise ValueError(f"words must not contain the special tokens {SPECIAL_TOKENS}: {clashes}")
    repeated = sorted(w for w, n in Counter(words).items() if n > 1)
    if repeated:
        raise ValueError(f"words must be distinct, repeated: {repeated[:5]}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos, pad, unk = SPECIAL_TOKENS
    # Clean-up would glue punctuation to the previous word (" ," -> ","), breaking the round trip.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
    )
