"""Label maps on a scan's grid, read and written in one place.

A label map is either a Slicer segmentation (``.seg.nrrd``: one segment per region, what a
radiologist opens and corrects in Segment Editor) or an integer image (NIfTI, NRRD, MHA). The
command line, the pipeline and the radiomics engine all go through :func:`read_label_map` and
:func:`write_label_map`, so every entry point applies the same checks: the file exists, lies on
the scan's grid (shape, and with a scan as reference also spacing, origin and direction), and
holds whole-number labels that fit uint8. Compressed NIfTI maps are checked to be complete:
ITK reads a truncated ``.nii.gz`` as zeros past the cut without a word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from HRpQCTCore.errors import CorruptFileError, HRpQCTError, InputFileError
from HRpQCTCore.io.readers import _nifti_check_data, format_from_name
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
#: Largest difference still taken as "the same grid": spacing relative to the scan's, origin
#: in voxels, direction cosines. Loose enough for float32 headers (NIfTI) and Scanco's
#: whole-voxel AIM positions, tight enough that no label lands in another voxel.
SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05
DIRECTION_TOL = 1e-3


@dataclass(frozen=True)
class _Geometry:
    """Where a label map's voxels lie (the parts of a Scan's geometry)."""

    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: tuple[float, ...]


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
        The scan the labels must lie on (shape, spacing, origin and direction are compared,
        within :data:`SPACING_RTOL`, :data:`ORIGIN_TOL_VOXELS` and :data:`DIRECTION_TOL`), or
        only its shape; None: no grid check.
    max_label:
        Largest label allowed (255: anything uint8 holds; 7 for the seven regions).
    name:
        What the file is, for the messages (``"Region label map"``).
    hint:
        Appended to the message about wrong values (e.g. which kind of map is expected).

    Raises
    ------
    InputFileError
        If the file is missing, unreadable or truncated, lies on another grid, or holds values
        that are not whole numbers in ``0..max_label``.
    InvalidScanError
        If a NIfTI map has no voxel size (pixdim 0).
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{name} {path} does not exist: check the path.")
    voxels, geometry = _read_voxels(path, name)
    labels = np.asarray(voxels)
    if reference is not None:
        _check_grid(labels, reference, path, name)
        if isinstance(reference, Scan) and geometry is not None:
            _check_geometry(geometry, reference, path, name)
    _check_values(labels, max_label, path, hint)
    return labels.astype(np.uint8)


def _read_voxels(path: Path, name: str) -> tuple[np.ndarray, _Geometry | None]:
    if compound_suffix(path).lower() == SEG_NRRD:
        labels, info = read_seg_nrrd(path)
        return labels, _Geometry(info.spacing_mm, info.origin_mm, info.direction)
    if path.is_dir() or format_from_name(path) in _SCAN_READER_FORMATS:
        from HRpQCTCore.io.readers import read_scan

        scan = read_scan(path, units="hu")  # values as stored: no unit conversion
        return np.asarray(scan.hu), _Geometry(scan.spacing_mm, scan.origin_mm, scan.direction)
    import SimpleITK as sitk

    if format_from_name(path) == "nifti":
        try:  # complete (ITK pads a cut .nii.gz with zeros), finite, with a voxel size
            _nifti_check_data(path)
        except CorruptFileError as exc:
            raise CorruptFileError(f"Cannot read {name.lower()} {path}: {exc}") from None
    # Read as stored (uint8 for our files), not as float32 HU: a quarter of the memory.
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputFileError(f"Cannot read {name.lower()} {path}: {_first_line(exc)}. The file "
                             "is damaged, truncated or not an image: write it again.") from None
    geometry = (_Geometry(tuple(reversed(image.GetSpacing())), tuple(image.GetOrigin()),
                          tuple(image.GetDirection())) if image.GetDimension() == 3 else None)
    return sitk.GetArrayFromImage(image), geometry


def _first_line(exc: Exception) -> str:
    """The useful line of an ITK error (its last one), without the C++ file and line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _check_grid(labels: np.ndarray, reference: Scan | Sequence[int], path: Path,
                name: str) -> None:
    shape = reference.shape if isinstance(reference, Scan) else tuple(reference)
    if labels.shape != tuple(shape):
        raise InputFileError(
            f"{name} {path} has shape {labels.shape}, the scan {tuple(shape)}: they must share "
            "one grid (use the label map made for this scan).")


def _geometry_differences(geometry: _Geometry, scan: Scan) -> list[str]:
    """What differs between a label map's grid and the scan's, in words (empty: same grid)."""
    found = []
    spacing = scan.spacing_mm
    if len(geometry.spacing_mm) != 3 or any(
            not math.isclose(a, b, rel_tol=SPACING_RTOL)
            for a, b in zip(geometry.spacing_mm, spacing, strict=True)):
        found.append(f"spacing {_show(geometry.spacing_mm)} mm, the scan {_show(spacing)} mm")
    voxel = min(spacing)
    if len(geometry.origin_mm) != 3 or any(
            abs(a - b) > ORIGIN_TOL_VOXELS * voxel
            for a, b in zip(geometry.origin_mm, scan.origin_mm, strict=True)):
        found.append(f"origin {_show(geometry.origin_mm)} mm, the scan "
                     f"{_show(scan.origin_mm)} mm")
    if len(geometry.direction) != 9 or any(
            abs(a - b) > DIRECTION_TOL
            for a, b in zip(geometry.direction, scan.direction, strict=True)):
        found.append(f"direction {_show(geometry.direction, 3)}, the scan "
                     f"{_show(scan.direction, 3)}")
    return found


def _show(values: Sequence[float], digits: int = 5) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _check_geometry(geometry: _Geometry, scan: Scan, path: Path, name: str) -> None:
    """Refuse a map whose voxels lie elsewhere than the scan's, even with the same shape."""
    differences = _geometry_differences(geometry, scan)
    if differences:
        raise InputFileError(
            f"{name} {path} lies on another grid than the scan: {'; '.join(differences)}. "
            "The labels would be applied to the wrong voxels. Use the label map made for this "
            "scan (or resample it onto the scan's grid first, e.g. in 3D Slicer).")


def _check_values(labels: np.ndarray, max_label: int, path: Path, hint: str) -> None:
    if not labels.size:
        return
    wrong = bool(labels.min() < 0 or labels.max() > max_label)
    if not wrong and not np.issubdtype(labels.dtype, np.integer):
        wrong = not np.all(np.equal(np.mod(labels, 1), 0))
    if wrong:
        raise InputFileError(f"{path} does not hold integer labels 0..{max_label}"
                             + (f": {hint}" if hint else ""))
