"""User-facing errors.

Every error a user can cause (bad file, wrong units, missing calibration, bad option) is raised
as an :class:`HRpQCTError` subclass whose message says what is wrong *and what to do*. The
command line prints the message without a traceback and exits with :attr:`exit_code`; the
Slicer modules show it in the GUI.
"""

from __future__ import annotations

__all__ = [
    "HRpQCTError",
    "InputFileError",
    "UnsupportedFormatError",
    "CorruptFileError",
    "InvalidDataError",
    "InvalidScanError",
    "CalibrationError",
    "CancelledError",
    "ArtefactError",
    "BatchFailuresError",
    "OutputError",
]


class HRpQCTError(Exception):
    """Base class of errors caused by input or configuration, not by a bug."""

    exit_code = 2


class InputFileError(HRpQCTError):
    """An input path is missing, empty or unreadable."""

    exit_code = 3


class UnsupportedFormatError(InputFileError):
    """The file's format is not one the engine reads."""


class CorruptFileError(InputFileError):
    """The file is truncated or its content is inconsistent with its header."""


class InvalidDataError(HRpQCTError):
    """A file was read, but its content cannot be used (e.g. a feature table lacking the
    features a classifier needs)."""

    exit_code = 4


class InvalidScanError(InvalidDataError):
    """The data read are not a usable HR-pQCT scan (2D/4D, NaN/Inf, empty)."""


class CalibrationError(HRpQCTError):
    """Units cannot be converted to HU (no calibration in the file and none given)."""

    exit_code = 5


class ArtefactError(HRpQCTError):
    """A bundled or user-supplied artefact (weights, classifier) is missing or fails its check."""

    exit_code = 6


class BatchFailuresError(HRpQCTError):
    """A batch finished, but some of its scans failed (listed in its failure table)."""

    exit_code = 7


class OutputError(HRpQCTError, OSError):
    """An output cannot be written: disk full, file-size limit, read-only or missing folder,
    no permission, a folder where a file is wanted (or the reverse).

    Also an :class:`OSError`, so code that falls back on any OS error (e.g. a cache folder
    that cannot be written) keeps doing so; :attr:`errno` is the original error's.
    """

    exit_code = 8

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CancelledError(HRpQCTError):
    """The user cancelled a long operation."""

    exit_code = 130
