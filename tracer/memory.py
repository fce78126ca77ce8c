"""Process memory: keep freed tensor memory from lingering in the C allocator; measure peaks.

glibc raises its mmap threshold dynamically after large frees, so the batch-sized temporaries of a
forward pass end up on the heap and stay counted in RSS long after torch freed them (we measured a
1.3 GB high-water mark for 170 MB of live tensors). A fixed 1 MiB threshold makes large blocks
mmap-backed and returned on free. Process-wide, Linux/glibc only, idempotent: an opt-in for
programs (the CLI, pipeline stages, benchmarks), which the library itself never calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

M_MMAP_THRESHOLD = -3
_done = False


def return_freed_memory() -> bool:
    """Make large allocations go straight back to the OS when freed; False if not supported."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False
    return _done


def peak_growth(run: Callable[[], object]) -> int:
    """Bytes by which this process's peak RSS during `run()` exceeds its RSS before. Linux only.

    Resets the kernel's high-water mark (VmHWM) first rather than reading ru_maxrss, which a
    child process inherits from its parent at the fork and never lowers.
    """
    status = Path("/proc/self/status")
    if not status.is_file():
        raise OSError("peak_growth needs Linux's /proc/self/status")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts at the current RSS
    before = _status_kb(status.read_text(), "VmRSS")
    run()
    return (_status_kb(status.read_text(), "VmHWM") - before) * 1024


def _status_kb(status: str, field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))
