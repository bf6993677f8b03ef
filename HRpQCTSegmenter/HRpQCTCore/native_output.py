"""Keep what C/C++ libraries print out of the command's standard output.

Some compiled libraries write straight to file descriptor 1 (AimIO, behind aimio-py, prints
``=========== storage_type N`` before failing on an unknown AIM data type). The command's
stdout carries its results and, for the Slicer modules, JSON progress lines, so such text must
not land there. :func:`native_stdout_to_log` points descriptor 1 at a temporary file around a
library call and logs what arrived (at DEBUG: the error the call raises says what matters).

Descriptor 1 belongs to the whole process, so the redirection is serialised with a lock and
Python's own ``sys.stdout`` is flushed first; only the library call belongs inside the block.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = ["native_stdout_to_log"]

log = logging.getLogger(__name__)
_lock = threading.Lock()


def _flush_c_streams() -> None:
    """``fflush(NULL)``: push C stdio buffers (where ``std::cout`` writes) to their fd."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass  # no C library to ask (Windows): its runtime flushes cout's lines itself


@contextmanager
def native_stdout_to_log(library: str = "a native library") -> Iterator[None]:
    """Capture what is written to descriptor 1 inside the block; log it at DEBUG.

    Parameters
    ----------
    library:
        The library's name, for the log line.

    Notes
    -----
    Where descriptor 1 cannot be duplicated (no console, an embedded interpreter without
    one), the block runs without capture.
    """
    with _lock:
        with suppress(AttributeError, OSError, ValueError):
            sys.stdout.flush()
        try:
            saved = os.dup(1)
        except OSError:
            yield
            return
        capture = tempfile.TemporaryFile()  # noqa: SIM115 (closed below, after dup2 back)
        try:
            os.dup2(capture.fileno(), 1)
            try:
                yield
            finally:
                _flush_c_streams()  # C stdio buffers a pipe's text until later: flush it now
                os.dup2(saved, 1)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace").strip()
                if text:
                    log.debug("%s printed: %s", library, text)
        finally:
            os.close(saved)
            capture.close()
