"""Reading a scan and its 7-region label map for radiomics (shared by the commands)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from HRpQCTCore.errors import InputFileError
from HRpQCTCore.regions import REGIONS

__all__ = ["read_region_map", "scan_id_from_path"]


def scan_id_from_path(path: str | Path) -> str:
    """A scan identifier from a file name (the name without its extensions).

    Only the file name is used, never header fields, so no patient identifier is copied.
    """
    name = Path(path).name
    for suffix in (".seg.nrrd", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def read_region_map(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a 7-region label map (``.seg.nrrd``, NIfTI, NRRD, MHA) on a scan's grid.

    Raises
    ------
    InputFileError
        If the file is missing, unreadable, on another grid, or holds values that are not
        region labels.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"Region label map {path} does not exist: check the path.")
    if path.name.lower().endswith(".seg.nrrd"):
        from HRpQCTCore.io.segnrrd import read_seg_nrrd

        labels, _ = read_seg_nrrd(path)
    else:
        import SimpleITK as sitk

        try:
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError as exc:
            raise InputFileError(f"Cannot read region label map {path}: {exc}") from None
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise InputFileError(
            f"Region label map {path} has shape {labels.shape}, the scan {tuple(shape)}: they "
            "must share one grid (use the label map made for this scan).")
    top = max(d.label for d in REGIONS)
    if labels.size and (labels.min() < 0 or labels.max() > top
                        or not np.all(np.equal(np.mod(labels, 1), 0))):
        raise InputFileError(
            f"{path} holds values outside the region labels 0..{top}: is it a 7-region map "
            "(from `hrpqct segment`/`postprocess`) and not a 5-class network output?")
    return labels.astype(np.uint8)
