"""A scan's own log file: every engine message of the thread running the scan, appended.

Batches run several scans in threads of one process (Dask workers), so the handler filters by
thread: each ``run.log`` holds only its scan's messages.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from HRpQCTCore.outputs import output_error

__all__ = ["scan_log"]


class _ThreadFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


class _LogFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (disk full), says so once and stops.

    logging's default prints a traceback for every message that fails to be written.
    """

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if not self.failed:
            self.failed = True
            exc = sys.exc_info()[1]
            print(f"hrpqct: cannot write the log file {self.baseFilename} ({exc}); its "
                  "remaining messages are lost (is the disk full?).", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)


_LOGGERS = ("hrpqct", "HRpQCTCore", "HRpQCTPhantom", "HRpQCTSegmentationEngine",
            "HRpQCTRadiomicsEngine", "HRpQCTPipeline")
_log_lock = threading.Lock()
_log_users = 0
_saved_levels: dict[str, int] = {}


@contextmanager
def scan_log(path: str | Path) -> Iterator[Path]:
    """Append the engine's log messages of this thread to ``path`` while the block runs.

    The engine's loggers are lowered to INFO for the duration if they were quieter (the
    console keeps its own level only if its handler has one; the command line sets it).
    """
    global _log_users
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handler = _LogFileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise output_error(path, exc) from None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ThreadFilter())
    root = logging.getLogger()
    with _log_lock:
        if _log_users == 0:
            for name in _LOGGERS:
                logger = logging.getLogger(name)
                if logger.getEffectiveLevel() > logging.INFO:
                    _saved_levels[name] = logger.level
                    logger.setLevel(logging.INFO)
        _log_users += 1
        root.addHandler(handler)
    try:
        yield path
    finally:
        with _log_lock:
            root.removeHandler(handler)
            _log_users -= 1
            if _log_users == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)
                _saved_levels.clear()
        with contextlib.suppress(OSError):  # a full disk: already reported by handleError
            handler.close()
