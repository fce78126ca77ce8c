"""Where the zoo's pieces live under its folder, and reading them back."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ZOO = REPO_ROOT / "zoo"


def corpus_dir(zoo: Path) -> Path:
    return zoo / "corpus"


def model_dir(zoo: Path, name: str) -> Path:
    return zoo / "models" / name


def transcoder_dir(zoo: Path, model: str, kind: str) -> Path:
    return zoo / "transcoders" / model / kind


def report_path(zoo: Path, model: str, what: str) -> Path:
    return zoo / "reports" / model / f"{what}.json"


def read_corpus(zoo: Path) -> tuple[list[str], list]:
    """(training sentences, eval prompts) written by the zoo_corpus stage."""
    from tracer.zoo.corpus import EvalPrompt

    folder = corpus_dir(zoo)
    if not (folder / "train.txt").is_file():
        raise FileNotFoundError(f"{folder} has no train.txt; run `dvc repro zoo_corpus` first")
    train = (folder / "train.txt").read_text().splitlines()
    prompts = json.loads((folder / "eval.json").read_text())
    return train, [EvalPrompt(**p) for task in sorted(prompts) for p in prompts[task]]


def load_tokenizer(zoo: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(corpus_dir(zoo) / "tokenizer")
