"""Writing files so that nobody sees half of one: a temporary sibling, renamed when complete.

A failure leaves the previous file (if any) untouched and no temporary file behind. Files get the
usual permissions (0666 minus the umask), not the 0600 of a bare temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, write: Callable[[TextIO], None]) -> Path:
    """Write a text file atomically through `write(handle)`."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        write(handle)
    return Path(path)


def write_json(path: str | Path, document, **dump_options) -> Path:
    """Write JSON atomically; `dump_options` go to `json.dump` (e.g. indent, sort_keys)."""
    return write_text(path, lambda handle: json.dump(document, handle, **dump_options))
