"""Reading the texts of a feature-pages dataset: a .txt file (one text per line) or JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The non-blank texts of a dataset file, in order; clear errors for what cannot be read."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"dataset {path} must be a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (give a .txt or .jsonl file)")
    found = False
    with open(path, encoding="utf-8") as handle:  # streamed: a dataset may be large
        try:
            for number, line in enumerate(handle, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    line = _record_text(path, number, line, text_field)
                found = True
                yield line
        except UnicodeDecodeError as error:
            raise ValueError(f"dataset {path} is not UTF-8 text: {error.reason}") from None
    if not found:
        raise ValueError(f"dataset {path} is empty: no non-blank text")


def _record_text(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"dataset {path}:{number}: not a JSON record ({error.msg})") from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(
            f"dataset {path}:{number}: expected an object with a string {field!r} field"
        )
    return text
