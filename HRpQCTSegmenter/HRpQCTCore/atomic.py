"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Write to a temporary file in the destination folder, check it, flush it to the disk, then
``os.replace`` it over the target (atomic on POSIX and Windows within one file system) and
flush the folder. The temporary name keeps the target's suffixes because writers such as
SimpleITK choose the format from the extension.

A write that fails (disk full, file-size limit, read-only folder, no permission, a check that
finds the file short) raises :class:`~HRpQCTCore.errors.OutputError` and leaves nothing under
the final name, and no temporary file either. Libraries that write through their own I/O
(SimpleITK's C++ writers) may report a full disk as a ``RuntimeError`` or not at all, so
writers pass a ``check`` that reads the file back before it is renamed.

A caller that must know which files are about to appear (the pipeline's resume record) sets
:func:`replace_hook`: it is called with the final and the temporary path just before the
rename, when the temporary file is complete and checked.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from HRpQCTCore.errors import OutputError
from HRpQCTCore.outputs import check_output_file, ensure_folder, output_error

__all__ = ["atomic_path", "write_text_atomic", "write_bytes_atomic", "replace_hook",
           "check_nonempty", "fsync_path", "OutputError"]

#: Called as ``hook(final, tmp)`` before each rename of this context (thread, task).
_REPLACE_HOOK: contextvars.ContextVar[Callable[[Path, Path], None] | None] = \
    contextvars.ContextVar("hrpqct_replace_hook", default=None)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replace_hook(hook: Callable[[Path, Path], None]) -> Iterator[None]:
    """Call ``hook(final, tmp)`` before every rename of :func:`atomic_path` in this block."""
    token = _REPLACE_HOOK.set(hook)
    try:
        yield
    finally:
        _REPLACE_HOOK.reset(token)


def check_nonempty(path: Path) -> None:
    """The default check: a written file holds at least one byte.

    Raises
    ------
    OSError
        (ENOSPC-like) if it is empty: a writer that swallowed its error wrote nothing.
    """
    if path.stat().st_size == 0:
        raise OSError(0, "the written file is empty (was the disk full?)")


def fsync_path(path: Path, *, folder: bool = False) -> None:
    """Flush ``path`` (a file, or with ``folder`` a directory entry list) to the disk.

    Folders cannot be opened (or synced) on every platform and file system; that is not an
    error: the rename is still atomic, only its durability after a power cut is weaker.
    """
    if folder:
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        if not hasattr(os, "O_DIRECTORY"):
            return  # Windows: folders cannot be opened this way
        try:
            fd = os.open(path, flags)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a delayed ENOSPC (NFS, some quotas) surfaces here
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    # Imported here: the io package's writers use this module (a cycle at import time).
    from HRpQCTCore.io.suffixes import compound_suffix

    suffix = f".tmp{compound_suffix(path)}"  # writers choose the format from the extension
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from None
    os.close(fd)
    return Path(name)


def _finish(tmp: Path, path: Path, check: Callable[[Path], None] | None,
            allow_empty: bool) -> None:
    """Check, flush and rename the complete temporary file."""
    if not allow_empty:
        check_nonempty(tmp)
    if check is not None:
        check(tmp)
    # mkstemp creates the file private (0600); give the result the permissions any other
    # new file of the user would get.
    os.chmod(tmp, 0o666 & ~_umask())
    fsync_path(tmp)
    hook = _REPLACE_HOOK.get()
    if hook is not None:
        hook(path, tmp)
    os.replace(tmp, path)
    fsync_path(path.parent, folder=True)


@contextmanager
def atomic_path(path: str | Path, *, check: Callable[[Path], None] | None = None,
                allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    Parameters
    ----------
    path:
        The final file.
    check:
        Called with the temporary file once the block has written it; raises (any
        exception) if the file is not complete.
    allow_empty:
        Accept an empty file (by default a file must hold at least one byte: a writer that
        swallowed a full disk often leaves an empty one).

    Raises
    ------
    OutputError
        If the folder cannot be created or written, the block or the rename fails with an
        :class:`OSError`, or ``check`` fails with one (image writers turn SimpleITK's
        ``RuntimeError`` into an OSError first). Other exceptions of the block pass
        unchanged. In every case the temporary file is removed and ``path`` is left as it
        was.
    """
    path = Path(path)
    check_output_file(path)
    ensure_folder(path.parent)
    tmp = _temporary(path)
    try:
        yield tmp
        _finish(tmp, path, check, allow_empty)
    except OutputError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _exact_size(size: int) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        written = path.stat().st_size
        if written != size:
            raise OSError(0, f"only {written} of {size} bytes were written")
    return check


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (checked: the file has exactly its size)."""
    with atomic_path(path, check=_exact_size(len(data)), allow_empty=not data) as tmp, \
            open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode(encoding))
