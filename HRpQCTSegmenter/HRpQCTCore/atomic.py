"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Write to a temporary file in the destination folder, then ``os.replace`` it over the target
(atomic on POSIX and Windows within one file system). The temporary name keeps the target's
suffixes because writers such as SimpleITK choose the format from the extension.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic", "write_bytes_atomic"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    # Imported here: the io package's writers use this module (a cycle at import time).
    from HRpQCTCore.io.suffixes import compound_suffix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{compound_suffix(path)}"  # writers choose the format from the extension
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give the result the permissions any other
        # new file of the user would get.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode(encoding))
