"""Where outputs may go: plain identifiers, never over an input, into folders that can be written.

Every command and the pipeline ask here before writing, so each refusal reads the same:

* :func:`plain_name`: an identifier (a scan id from a manifest or ``--scan-id``) that becomes
  part of a file or folder name must be a plain name, or ``../../x`` would write outside the
  output folder;
* :func:`refuse_inputs_as_outputs`: an output that *is* an input (the same path, or the same
  file through a symbolic or hard link) would destroy the input, even with ``--overwrite``;
* :func:`ensure_folder` and :func:`output_error`: a folder that cannot be created and an
  :class:`OSError` while writing (disk full, file-size limit, read-only, no permission) become
  an :class:`~HRpQCTCore.errors.OutputError` that says what to do.

This module imports only :mod:`HRpQCTCore.errors`: :mod:`HRpQCTCore.atomic` uses it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path, PureWindowsPath

from HRpQCTCore.errors import HRpQCTError, OutputError

__all__ = ["plain_name", "same_file", "refuse_inputs_as_outputs", "ensure_folder",
           "output_error", "check_output_file"]

#: What to do, by the errno of a failed write.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose an output on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another output",
    errno.EFBIG: "the file is larger than this system allows (file-size limit, e.g. "
                 "`ulimit -f`, or the file system's maximum): raise the limit or choose an "
                 "output on another file system",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "the operation is not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.EISDIR: "a folder has that name: give a file name, or move the folder away",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another output path",
    errno.EEXIST: "a file has that name where a folder is needed: choose another output path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter one",
}


def plain_name(name: object, what: str = "scan id") -> str:
    """``name`` if it is a plain file name (no folder part); else a usage error.

    Refused: empty names, ``.`` and ``..``, names with ``/`` or ``\\``, absolute or
    drive paths, NUL and other control characters, leading or trailing spaces.

    Raises
    ------
    HRpQCTError
        (exit code 2) saying what is wrong with the name.
    """
    text = "" if name is None else str(name)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif text in (".", ".."):
        problem = "is a folder reference"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "holds a control character (NUL, newline, ...)"
    elif "/" in text or "\\" in text or PureWindowsPath(text).drive or os.path.isabs(text):
        problem = "is a path, not a name"
    elif text != text.strip():
        problem = "starts or ends with a space"
    if problem:
        raise HRpQCTError(
            f"The {what} {text!r} {problem}: it becomes part of output file names, so it must "
            "be a plain name (letters, digits, '-', '_', '.'; no folder). Give another "
            f"{what}.")
    return text


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file (same path, symbolic or hard link)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(os.path.realpath(a)) == os.path.abspath(os.path.realpath(b))


def refuse_inputs_as_outputs(outputs: Iterable[str | Path | None],
                             inputs: Iterable[str | Path | None]) -> None:
    """Refuse any output that is one of the inputs (``--overwrite`` does not change that).

    Raises
    ------
    HRpQCTError
        (exit code 2) naming the output and the input.
    """
    ins = [Path(p) for p in inputs if p]
    for out in (Path(p) for p in outputs if p):
        for given in ins:
            if same_file(out, given):
                raise HRpQCTError(
                    f"The output {out} is the input {given}: writing it would destroy the "
                    "input (--overwrite does not allow that). Choose another output name.")


def output_error(path: str | Path, exc: BaseException) -> OutputError:
    """An :class:`OutputError` for a failed write of ``path`` (an OSError or a library's)."""
    code = getattr(exc, "errno", None)
    advice = _ADVICE.get(code) if code is not None else None
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if advice is None:
        advice = ("check that the disk has space and the folder can be written, then run "
                  "the command again")
    return OutputError(f"Cannot write {path}: {reason}; {advice}. Nothing was written under "
                       "that name.", code)


def ensure_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) if needed; it must be a folder one can write to.

    Raises
    ------
    OutputError
        If it is a file, cannot be created, or cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"The {what} {folder} is a file, not a folder: choose a folder "
                          "name (it is created if missing).", errno.ENOTDIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the {what} {folder}: "
                          f"{exc.strerror or exc}; "
                          f"{_ADVICE.get(exc.errno, 'choose a writable location')}.",
                          exc.errno) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"The {what} {folder} cannot be written: "
                          f"{_ADVICE[errno.EACCES]}.", errno.EACCES)
    return folder


def check_output_file(path: str | Path) -> Path:
    """Refuse an output file name that is a folder (checked before any long computation).

    Raises
    ------
    OutputError
        If ``path`` is an existing folder or a part of its folder is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: {_ADVICE[errno.EISDIR]}.", errno.EISDIR)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"Cannot write {path}: {_ADVICE[errno.ENOTDIR]}.",
                                  errno.ENOTDIR)
            break
    return path
