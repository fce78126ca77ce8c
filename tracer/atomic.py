"""Writing files and folders so that nobody sees half of one: a temporary sibling, renamed when
complete.

A failure leaves the previous file or folder (if any) untouched and nothing temporary behind.
Files and folders get the usual permissions (0666 / 0777 minus the umask), not the 0600 / 0700
of bare temporary ones.
This is the project's one writer of JSON documents and of output folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, write: Callable[[TextIO], None]) -> Path:
    """Write a text file atomically through `write(handle)`."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        write(handle)
    return Path(path)


def write_json(path: str | Path, document, *, indent: int | None = 2) -> Path:
    """Write JSON atomically with sorted keys, so the same document gives the same bytes.

    `indent=None` writes one compact line (large documents such as viewer graphs).
    """

    def dump(handle: TextIO) -> None:
        json.dump(document, handle, indent=indent, sort_keys=True)
        handle.write("\n")

    return write_text(path, dump)


def write_folder(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder, then swap it in: a failure leaves the old folder intact."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide outputs from others
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
