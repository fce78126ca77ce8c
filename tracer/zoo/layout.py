"""Where the zoo's pieces live under its folder, and writing them atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tracer.atomic import atomic_path

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


def write_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder, then swap it in: a failure leaves the old folder intact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, document: dict) -> Path:
    """Write JSON atomically, indented with sorted keys for stable diffs."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


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
