"""DVC stage zoo_corpus: the synthetic corpus, its eval prompts and the word-level tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tracer.atomic import write_folder, write_json
from tracer.zoo.config import load_zoo_params
from tracer.zoo.corpus import build_corpus, vocabulary
from tracer.zoo.layout import corpus_dir
from tracer.zoo.tokenizer import build_tokenizer


def main() -> None:
    params = load_zoo_params()
    corpus = build_corpus(params.corpus)
    tokenizer = build_tokenizer(vocabulary(corpus))

    def fill(folder: Path) -> None:
        (folder / "train.txt").write_text("\n".join(corpus.train) + "\n")
        prompts = {task: [dataclasses.asdict(p) for p in ps] for task, ps in corpus.eval.items()}
        write_json(folder / "eval.json", prompts)
        tokenizer.save_pretrained(folder / "tokenizer")

    out = write_folder(corpus_dir(Path(params.out_dir)), fill)
    print(f"corpus: {len(corpus.train)} sentences, {len(tokenizer)} tokens -> {out}")


if __name__ == "__main__":
    main()
