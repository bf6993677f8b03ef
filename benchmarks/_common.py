"""Shared helpers for benchmark scripts: machine description and peak memory."""

from __future__ import annotations

import datetime
import os
import platform
import resource


def machine() -> str:
    """One line naming the machine: CPU model, cores, RAM, Python."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {ram_gb:.0f} GB RAM, Python "
            f"{platform.python_version()}, {datetime.date.today().isoformat()}")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux: ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_KIB_PER_GIB = 2**20


def status_gib(field: str, pid: str = "self") -> float:
    """``VmHWM`` / ``VmRSS`` of a process in GiB from /proc (NaN if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / _KIB_PER_GIB
    except OSError:
        pass
    return float("nan")


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
