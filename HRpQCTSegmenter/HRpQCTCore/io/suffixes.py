"""File name extensions, with the compound ones (``.seg.nrrd``, ``.nii.gz``) kept whole.

``Path.suffix`` sees only ``.gz`` in ``scan.nii.gz`` and ``.nrrd`` in ``regions.seg.nrrd``; the
format (and a scan's identifier) depends on the whole ending, so every caller asks here.
This module imports nothing of the project: :mod:`HRpQCTCore.atomic` uses it too.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COMPOUND_SUFFIXES", "compound_suffix"]

#: Endings of two parts that name one format.
COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")


def compound_suffix(path: str | Path) -> str:
    """The extension of ``path``'s file name, spelled as in the name (case kept).

    A compound ending of :data:`COMPOUND_SUFFIXES` is returned whole (``.nii.gz``), any other
    name gives :attr:`pathlib.PurePath.suffix` (``""`` when there is none).
    """
    name = Path(path).name
    for compound in COMPOUND_SUFFIXES:
        if name.lower().endswith(compound):
            return name[-len(compound):]
    return Path(name).suffix
