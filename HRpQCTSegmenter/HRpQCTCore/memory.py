"""Memory estimates made before a large allocation, so an impossible one is refused with numbers.

A voxel size of 1e-9 mm or ``--resample-mm 0.0001`` asks for arrays of terabytes; numpy would
fail somewhere deep inside with a traceback (or the machine would start swapping). Callers
estimate what they are about to allocate and call :func:`require_memory` first, which compares
the estimate with the memory this process can still get (the smaller of the machine's available
memory and a container limit) and raises a message that says what was asked and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from HRpQCTCore.errors import HRpQCTError

__all__ = ["available_memory_bytes", "format_bytes", "require_memory"]

#: Estimates are rough; refuse only what clearly cannot fit (more than this share of what is
#: available), so a valid scan near the limit is not refused because of the estimate's slack.
USABLE_FRACTION = 0.9
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                  Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    """Free physical pages times the page size (POSIX systems without ``/proc``)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limit() -> int | None:
    """The container's memory limit, if one is set (cgroup v2 or v1)."""
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate, in bytes (None: cannot be told here)."""
    candidates = [v for v in (_meminfo_available() or _sysconf_available(), _cgroup_limit())
                  if v is not None and v > 0]
    return min(candidates) if candidates else None


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; up to EiB, then plain powers of ten."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{n:.3g} bytes"  # pragma: no cover - the loop always returns


def require_memory(needed_bytes: float, what: str, advice: str, *,
                   error: type[HRpQCTError] = HRpQCTError,
                   available: int | None = None) -> None:
    """Refuse an allocation that cannot fit before it is attempted.

    Parameters
    ----------
    needed_bytes:
        The caller's estimate of what it is about to allocate.
    what:
        What needs it, for the message (``"resampling to 0.0001 mm (4.6e12 voxels)"``).
    advice:
        What the user can do (e.g. a coarser voxel size, or checking the file's spacing).
    error:
        The exception class raised (its exit code: 2 for an option, 4 for the scan's data).
    available:
        Memory available (default: :func:`available_memory_bytes`); tests pass a number.

    Raises
    ------
    HRpQCTError
        ``error`` when the estimate exceeds :data:`USABLE_FRACTION` of the available memory.
    """
    limit = available_memory_bytes() if available is None else available
    if limit is None:
        limit = 1 << 50  # unknown: refuse only the absurd (> 1 PiB)
    if needed_bytes > USABLE_FRACTION * limit:
        raise error(
            f"Not enough memory for {what}: it needs about {format_bytes(needed_bytes)}, but "
            f"only {format_bytes(limit)} is available. {advice}")
