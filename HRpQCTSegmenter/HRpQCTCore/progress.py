"""Progress reporting and cancellation shared by every long operation.

Long-running engine functions take ``progress: ProgressCallback | None`` and
``cancel: CancelToken | None``. They call ``report(progress, done, total, stage)`` as they go
and ``check(cancel)`` between units of work; the command line turns reports into a progress bar
(or machine-readable lines for Slicer's background process), the Slicer module into its progress
bar, and a Cancel button sets the token.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from HRpQCTCore.errors import CancelledError

__all__ = [
    "ProgressCallback",
    "CancelToken",
    "report",
    "check",
    "machine_progress_printer",
    "PROGRESS_PREFIX",
]

#: ``callback(done, total, stage)``: ``done`` of ``total`` units finished in ``stage``.
ProgressCallback = Callable[[int, int, str], None]

#: Lines starting with this prefix carry JSON progress for a parent process (Slicer).
PROGRESS_PREFIX = "HRPQCT-PROGRESS "


class CancelToken:
    """A thread-safe flag a caller sets to ask a running operation to stop."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the operation to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` has been called."""
        return self._event.is_set()


def report(progress: ProgressCallback | None, done: int, total: int, stage: str) -> None:
    """Call ``progress`` if one was given."""
    if progress is not None:
        progress(int(done), int(total), stage)


def check(cancel: CancelToken | None) -> None:
    """Raise :class:`~.errors.CancelledError` if ``cancel`` has been set."""
    if cancel is not None and cancel.cancelled:
        raise CancelledError(
            "Cancelled by the user; no output was written for the unfinished step.")


def machine_progress_printer(stream: TextIO | None = None) -> ProgressCallback:
    """A callback printing one JSON line per report, for a parent process to parse."""

    def _print(done: int, total: int, stage: str) -> None:
        out = stream or sys.stdout
        payload = json.dumps({"stage": stage, "done": done, "total": total})
        out.write(f"{PROGRESS_PREFIX}{payload}\n")
        out.flush()

    return _print
