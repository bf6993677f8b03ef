"""A check that a file meant to be a CSV table is text, before a CSV reader sees it.

Manifests, label tables and feature tables are CSV. Given a scan instead (``scan.nii.gz``
where ``manifest.csv`` belongs: an easy slip with tab completion), Python's CSV reader stops
with a ``UnicodeDecodeError`` traceback. :func:`ensure_text_file` looks at the first bytes and
says what the file seems to be and what was expected.
"""

from __future__ import annotations

from pathlib import Path

from HRpQCTCore.errors import InputFileError

__all__ = ["ensure_text_file"]

_HEAD_BYTES = 8192
# (test on the first bytes, what such a file usually is)
_SIGNATURES = (
    (lambda h: h.startswith(b"\x1f\x8b"), "a gzip-compressed file (e.g. a .nii.gz scan)"),
    (lambda h: h.startswith(b"CTDATA-HEADER_V1"), "a Scanco ISQ scan"),
    (lambda h: h.startswith(b"AIMDATA_V"), "a Scanco AIM scan"),
    (lambda h: h.startswith(b"NRRD000"), "a NRRD image"),
    (lambda h: h[128:132] == b"DICM", "a DICOM file"),
    (lambda h: h[344:348] in (b"n+1\0", b"ni1\0"), "a NIfTI image"),
    (lambda h: h.startswith(b"PK\x03\x04"), "a zip archive"),
)


def _looks_like(head: bytes) -> str | None:
    """What a binary file seems to be (None: it looks like text)."""
    for test, name in _SIGNATURES:
        if test(head):
            return name
    if b"\0" in head:
        return "a binary file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "text in another encoding than UTF-8 (save it as UTF-8 CSV)"
    return None


def ensure_text_file(path: str | Path, what: str, expected: str = "a CSV text file") -> Path:
    """Refuse ``path`` unless it exists and looks like UTF-8 text.

    Parameters
    ----------
    path:
        The file.
    what:
        What it should be, for the message (``"Manifest"``, ``"Feature table"``).
    expected:
        The expected format in words.

    Raises
    ------
    InputFileError
        If the file is missing, a folder, or binary (a scan, an archive, other bytes).
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputFileError(f"{what} {path} {problem}: check the path.")
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    seems = _looks_like(head)
    if seems is not None:
        raise InputFileError(
            f"{what} {path} is not {expected}: it looks like {seems}. Give the CSV file here "
            "(check the order of the arguments).")
    return path
