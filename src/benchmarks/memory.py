"""Peak resident memory of this process (Linux): reset the high-water mark, run, read it back.

ru_maxrss would not do: Linux carries the parent's resident size over fork and exec, and it
cannot be reset; VmHWM in /proc/self/status belongs to this process's memory map and can be
(``clear_refs`` 5).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STATUS = Path("/proc/self/status")


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB. KeyError if absent."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(f"{field} not in {STATUS}")


def reset_peak() -> float:
    """Resets the peak-RSS mark (where the kernel allows it) and returns the current RSS, MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return status_mib("VmRSS")


def peak_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak` (or the start), MiB; falls back
    to ru_maxrss where /proc is not there."""
    try:
        return status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(fn: Callable[[], T]) -> tuple[T, float, float]:
    """(fn(), seconds, peak RSS above the RSS before the call in MiB, never below 0)."""
    before = reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, max(peak_mib() - before, 0.0)
