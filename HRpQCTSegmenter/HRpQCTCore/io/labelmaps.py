"""Label maps on a scan's grid, read and written in one place.

A label map is either a Slicer segmentation (``.seg.nrrd``: one segment per region, what a
radiologist opens and corrects in Segment Editor) or an integer image (NIfTI, NRRD, MHA). The
command line, the pipeline and the radiomics engine all go through :func:`read_label_map` and
:func:`write_label_map`, so every entry point applies the same checks: the file exists, lies on
the scan's grid, and holds whole-number labels that fit uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTCore.io.readers import format_from_name
from HRpQCTCore.io.segnrrd import read_seg_nrrd, write_seg_nrrd
from HRpQCTCore.io.suffixes import compound_suffix
from HRpQCTCore.io.writers import write_label_image
from HRpQCTCore.regions import REGIONS, LabelDefinition
from HRpQCTCore.scan import Scan

__all__ = ["LABEL_MAP_SUFFIXES", "MAX_LABEL", "label_map_format", "read_label_map",
           "write_label_map"]

#: Endings :func:`write_label_map` writes (and :func:`read_label_map` reads without guessing).
LABEL_MAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
#: Largest label value: label maps are stored as uint8.
MAX_LABEL = 255
SEG_NRRD = ".seg.nrrd"
#: Formats only the scan reader opens (Scanco masks are AIM char data; DICOM is a series).
_SCAN_READER_FORMATS = ("aim", "isq", "dicom")


def label_map_format(path: str | Path) -> str:
    """The ending of ``path`` among :data:`LABEL_MAP_SUFFIXES`, in lower case.

    Commands call it before any long computation, so a wrong output name fails at once.

    Raises
    ------
    HRpQCTError
        If the ending is none of :data:`LABEL_MAP_SUFFIXES`.
    """
    suffix = compound_suffix(path).lower()
    if suffix not in LABEL_MAP_SUFFIXES:
        raise HRpQCTError(f"Cannot tell the output format of {path}: use one of "
                          f"{', '.join(LABEL_MAP_SUFFIXES)}")
    return suffix


def write_label_map(labels: np.ndarray, reference: Scan, path: str | Path, *,
                    segments: Sequence[LabelDefinition] = REGIONS) -> Path:
    """Write ``labels`` with ``reference``'s geometry, atomically; the format from the name.

    Parameters
    ----------
    labels:
        Integer label map ``[z, y, x]`` of the reference's shape.
    reference:
        The scan the labels belong to (geometry only; none of its metadata is written).
    path:
        ``.seg.nrrd`` (a Slicer segmentation with one segment per entry of ``segments``, also
        for labels that are absent, so they can be painted) or ``.nii.gz``, ``.nii``,
        ``.nrrd``, ``.mha`` (a uint8 image).
    segments:
        The label definitions of a ``.seg.nrrd``: the seven regions (default) or, for raw
        network output, ``NETWORK_CLASSES[1:]``. Ignored for images.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        ``.seg.nrrd``: labels of the wrong shape or with values no segment has.
    InvalidScanError
        Images: labels of the wrong shape or not whole numbers in 0..255.
    UnsupportedFormatError
        For an ending that is neither.
    """
    path = Path(path)
    if compound_suffix(path).lower() == SEG_NRRD:
        return write_seg_nrrd(labels, reference, path, regions=segments)
    return write_label_image(labels, reference, path)


def read_label_map(path: str | Path, reference: Scan | Sequence[int] | None = None, *,
                   max_label: int = MAX_LABEL, name: str = "Label map",
                   hint: str = "") -> np.ndarray:
    """Read a label map (``.seg.nrrd`` or an image) as uint8 ``[z, y, x]``, checked.

    Parameters
    ----------
    path:
        A Slicer ``.seg.nrrd`` (segments flattened to their label values), a NIfTI, NRRD or
        MetaImage file, or a Scanco mask / DICOM series (read by the scan reader).
    reference:
        The scan (or its shape) the labels must lie on; None: no grid check.
    max_label:
        Largest label allowed (255: anything uint8 holds; 7 for the seven regions).
    name:
        What the file is, for the messages (``"Region label map"``).
    hint:
        Appended to the message about wrong values (e.g. which kind of map is expected).

    Raises
    ------
    InputFileError
        If the file is missing or unreadable, lies on another grid, or holds values that are
        not whole numbers in ``0..max_label``.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{name} {path} does not exist: check the path.")
    labels = np.asarray(_read_voxels(path, name))
    if reference is not None:
        _check_grid(labels, reference, path, name)
    _check_values(labels, max_label, path, hint)
    return labels.astype(np.uint8)


def _read_voxels(path: Path, name: str) -> np.ndarray:
    if compound_suffix(path).lower() == SEG_NRRD:
        return read_seg_nrrd(path)[0]
    if path.is_dir() or format_from_name(path) in _SCAN_READER_FORMATS:
        from HRpQCTCore.io.readers import read_scan

        return read_scan(path, units="hu").hu  # values as stored: no unit conversion
    import SimpleITK as sitk

    # Read as stored (uint8 for our files), not as float32 HU: a quarter of the memory.
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputFileError(f"Cannot read {name.lower()} {path}: {exc}") from None


def _check_grid(labels: np.ndarray, reference: Scan | Sequence[int], path: Path,
                name: str) -> None:
    shape = reference.shape if isinstance(reference, Scan) else tuple(reference)
    if labels.shape != tuple(shape):
        raise InputFileError(
            f"{name} {path} has shape {labels.shape}, the scan {tuple(shape)}: they must share "
            "one grid (use the label map made for this scan).")


def _check_values(labels: np.ndarray, max_label: int, path: Path, hint: str) -> None:
    if not labels.size:
        return
    wrong = bool(labels.min() < 0 or labels.max() > max_label)
    if not wrong and not np.issubdtype(labels.dtype, np.integer):
        wrong = not np.all(np.equal(np.mod(labels, 1), 0))
    if wrong:
        raise InputFileError(f"{path} does not hold integer labels 0..{max_label}"
                             + (f": {hint}" if hint else ""))
