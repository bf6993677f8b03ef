"""A scan's 7-region label map for radiomics, and the scan's name (commands and pipeline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from HRpQCTCore.io.labelmaps import read_label_map
from HRpQCTCore.io.suffixes import compound_suffix
from HRpQCTCore.regions import REGIONS
from HRpQCTCore.scan import Scan

__all__ = ["read_region_map", "scan_id_from_path"]

#: Said when a map holds values beyond the region labels: the usual mix-up.
_NOT_A_REGION_MAP = ("is it a 7-region map (from `hrpqct segment`/`postprocess`) and not a "
                     "5-class network output?")


def scan_id_from_path(path: str | Path) -> str:
    """A scan identifier from a file name (the name without its extensions).

    Only the file name is used, never header fields, so no patient identifier is copied.
    """
    name = Path(path).name
    suffix = compound_suffix(name)
    return name[: -len(suffix)] if suffix else name


def read_region_map(path: str | Path, reference: Scan | tuple[int, ...]) -> np.ndarray:
    """Read a 7-region label map (``.seg.nrrd``, NIfTI, NRRD, MHA) on a scan's grid.

    Parameters
    ----------
    path:
        The label map.
    reference:
        The scan (its shape, spacing, origin and direction must match the map's), or just a
        shape (then only the shape is compared).

    Raises
    ------
    InputFileError
        If the file is missing, unreadable, truncated, on another grid, or holds values that
        are not region labels.
    """
    return read_label_map(path, reference, max_label=max(d.label for d in REGIONS),
                          name="Region label map", hint=_NOT_A_REGION_MAP)
