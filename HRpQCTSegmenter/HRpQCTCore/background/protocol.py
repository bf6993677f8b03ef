"""What a background ``hrpqct`` command tells its parent, and what its exit code means.

The child prints JSON progress lines after :data:`~HRpQCTCore.progress.PROGRESS_PREFIX` and,
on failure, one ``hrpqct <command>: error: <message>`` line; its exit code is one of those
documented in :mod:`HRpQCTPipeline.cli`. This module turns that into progress fractions and
into messages that say what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from HRpQCTCore.progress import PROGRESS_PREFIX

__all__ = [
    "ProgressUpdate",
    "parse_progress_line",
    "parse_error_line",
    "STAGE_SPANS",
    "LOADING_SPAN",
    "overall_fraction",
    "EXIT_CODE_ADVICE",
    "RADIOMICS_EXIT_CODE_ADVICE",
    "RADIOMICS_STAGE_SPANS",
    "CANCEL_EXIT_CODE",
    "describe_failure",
]


@dataclass(frozen=True)
class ProgressUpdate:
    """One machine progress line: ``done`` of ``total`` units of ``stage``."""

    stage: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        """Fraction of the stage done, in [0, 1]."""
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0


def parse_progress_line(line: str) -> ProgressUpdate | None:
    """The progress in ``line``, or None if it is not a (well-formed) progress line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        payload = json.loads(line[len(PROGRESS_PREFIX):])
        return ProgressUpdate(stage=str(payload["stage"]), done=int(payload["done"]),
                              total=int(payload["total"]))
    except (ValueError, KeyError, TypeError):
        return None


def parse_error_line(line: str) -> str | None:
    """The message of an ``hrpqct <command>: error: <message>`` line, else None."""
    head, sep, message = line.partition(": error: ")
    if sep and head.startswith("hrpqct"):
        return message.strip()
    return None


#: Share of the whole ``hrpqct segment`` run taken by each stage (start, end); unknown stages
#: keep the bar where it is.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "read": (0.00, 0.03),
    "convert": (0.03, 0.05),
    "segmenting slices": (0.05, 0.80),
    "post-processing": (0.80, 0.88),
    "soft-tissue subdivision": (0.88, 0.97),
}
#: The same for ``hrpqct radiomics`` (its one stage; the rest is reading and the tables).
RADIOMICS_STAGE_SPANS: dict[str, tuple[float, float]] = {
    "radiomics (slices)": (0.03, 0.95),
    "radiomics (scan)": (0.03, 0.95),
}
#: Where the bar stands while the module loads the result into the scene.
LOADING_SPAN = (0.97, 1.0)


def overall_fraction(update: ProgressUpdate, previous: float = 0.0,
                     spans: Mapping[str, tuple[float, float]] = STAGE_SPANS) -> float:
    """Fraction of the whole run after ``update``; never goes backwards."""
    span = spans.get(update.stage)
    if span is None:
        return previous
    start, end = span
    return max(previous, start + (end - start) * update.fraction)


#: What to do, by exit code of ``hrpqct segment`` (see :mod:`HRpQCTPipeline.cli`).
#: Exit code 8 of either command: its temporary output could not be written.
_OUTPUT_ADVICE = ("The result could not be written to the temporary folder (the disk may be "
                  "full or not writable): free some space and try again.")
EXIT_CODE_ADVICE: dict[int, str] = {
    1: "This is a bug in the segmenter: please report it with the log shown below.",
    2: "Check the module's settings (model, device) and try again.",
    3: "The input could not be read: check that the volume is a complete 3D scan.",
    4: "The input volume is not a usable HR-pQCT scan (it must be a 3D stack with finite "
       "values); load the complete scan.",
    5: "Choose the input units that match the volume (HU, native or density) and, for native "
       "or density, enter the scanner's calibration constants. A Scanco .AIM/.ISQ loaded by "
       "drag and drop is already in HU.",
    6: "The segmentation model is missing or damaged: choose a model folder written by "
       "'hrpqct train-segmenter', or reinstall the extension for the bundled model.",
    8: _OUTPUT_ADVICE,
}
#: What to do, by exit code of ``hrpqct radiomics`` (the Radiomics module's process).
RADIOMICS_EXIT_CODE_ADVICE: dict[int, str] = {
    1: "This is a bug in the feature extraction: please report it with the log shown below.",
    2: "Check the module's settings (mode, classifier file) and try again.",
    3: "The volume or the region map written for the extraction could not be read; please "
       "report this with the log shown below.",
    4: "The volume or the segmentation cannot be used: check that the segmentation holds the "
       "regions (on the volume's slices) and that the volume is in HU.",
    6: "The classifier file is missing or damaged: choose a file written by 'hrpqct "
       "train-classifier', or reinstall the extension for the bundled classifier.",
    8: _OUTPUT_ADVICE,
}
#: Exit code of an ``hrpqct`` command that was cancelled.
CANCEL_EXIT_CODE = 130
#: Exit codes meaning the child was killed by the system (POSIX: -SIGKILL; shells: 128 + 9).
_KILLED_BY_MEMORY = (-9, 137)


def describe_failure(exit_code: int, error_message: str | None,
                     stderr_tail: Sequence[str] = (), *,
                     advice: Mapping[int, str] = EXIT_CODE_ADVICE,
                     program: str = "segmentation") -> str:
    """A message for the GUI: what went wrong and what to do.

    Parameters
    ----------
    exit_code:
        The child's exit code.
    error_message:
        Its ``hrpqct <command>: error:`` message, if it printed one.
    stderr_tail:
        Its last stderr lines, shown when there is no error message (e.g. a crash).
    advice:
        What to do, by exit code (:data:`EXIT_CODE_ADVICE`, :data:`RADIOMICS_EXIT_CODE_ADVICE`).
    program:
        What the process does, for the messages ("segmentation", "feature extraction").
    """
    if exit_code in _KILLED_BY_MEMORY:
        return (f"The {program} process was killed by the system, most often because the "
                "computer ran out of memory. Close other programs, or choose the CPU device "
                "if the GPU is small (fewer worker processes for features), and try again.")
    what_to_do = advice.get(exit_code, advice[1])
    if error_message:
        return f"{error_message}\n\n{what_to_do}"
    detail = "\n".join(line for line in stderr_tail if line.strip())[-1500:]
    if exit_code == 1 and "ModuleNotFoundError" in detail:
        what_to_do = (f"A Python package the {program} needs is missing: press Apply again "
                      "and accept installing the dependencies.")
    text = f"The {program} process failed (exit code {exit_code}). {what_to_do}"
    return f"{text}\n\n{detail}" if detail else text
