"""Write scans (HU) and label images with their geometry; every write is atomic.

Files go to a temporary name beside the target (keeping the extension, since SimpleITK picks
the format from it) and are renamed over the target only when complete: read back
(:mod:`.verify`) and flushed to the disk. A failed write raises
:class:`~HRpQCTCore.errors.OutputError` and leaves nothing under the name. Only geometry and
voxels are written: no metadata from an input header is ever copied into an output. Label maps
in either form (Slicer ``.seg.nrrd`` or an image) go through :mod:`.labelmaps`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from HRpQCTCore.atomic import atomic_path
from HRpQCTCore.errors import InvalidScanError, UnsupportedFormatError
from HRpQCTCore.io.suffixes import compound_suffix
from HRpQCTCore.io.verify import check_image_file
from HRpQCTCore.scan import DEFAULT_CALIBRATION, Calibration, Scan, Units

__all__ = ["write_scan", "write_label_image", "write_scan_aim", "write_sitk_image",
           "WRITE_EXTENSIONS", "output_format"]

log = logging.getLogger(__name__)

#: Extensions :func:`write_scan` and :func:`write_label_image` write.
WRITE_EXTENSIONS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage"}
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def output_format(path: str | Path) -> str:
    """The format :func:`write_scan` would write for ``path``.

    Raises
    ------
    UnsupportedFormatError
        For ``.seg.nrrd`` (label maps only: :func:`~.labelmaps.write_label_map`) and unknown
        extensions.
    """
    suffix = compound_suffix(path).lower()
    if suffix == ".seg.nrrd":
        raise UnsupportedFormatError(
            f"{path}: Slicer segmentation files hold labels and are written by write_label_map "
            "(HRpQCTCore.io, through write_seg_nrrd); use .nii.gz or .nrrd for a plain image.")
    if suffix in WRITE_EXTENSIONS:
        return WRITE_EXTENSIONS[suffix]
    raise UnsupportedFormatError(
        f"Cannot write {path}: choose an output ending in {', '.join(WRITE_EXTENSIONS)} "
        "(NIfTI, NRRD or MetaImage).")


def write_sitk_image(image, path: str | Path, *, compress: bool = True,
                     level: int | None = 1) -> Path:
    """Write a SimpleITK image atomically, checked by reading it back before the rename.

    Parameters
    ----------
    image:
        The image; its extension-chosen format is that of ``path``.
    path:
        The final file.
    compress, level:
        Compression, and its level (None: SimpleITK's default). Level 1 deflate is several
        times faster than the default for ~10 % larger files.

    Raises
    ------
    OutputError
        If the file cannot be written completely (nothing is left under ``path``).
    """
    import SimpleITK as sitk

    path = Path(path)
    with atomic_path(path, check=check_image_file) as tmp:
        try:
            if level is None:
                sitk.WriteImage(image, str(tmp), compress)
            else:
                sitk.WriteImage(image, str(tmp), compress, level)
        except RuntimeError as exc:
            # ITK reports a failed write (full disk, size limit) as a RuntimeError with its
            # C++ context; the OSError says what happened, atomic_path what to do.
            raise OSError(0, f"the image writer failed ({_first_line(exc)})") from None
    return path


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _write_image(image, path: Path) -> None:
    write_sitk_image(image, path)


def _hu_to_int16(hu: np.ndarray) -> np.ndarray:
    """Round HU to int16, clipping (with a warning) what does not fit."""
    rounded = np.rint(np.asarray(hu, dtype=np.float32))
    info = np.iinfo(np.int16)
    n_out = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
    if n_out:
        log.warning("%d voxels outside the int16 range were clipped to [%d, %d]; write float32 "
                    "to keep them.", n_out, info.min, info.max)
        np.clip(rounded, info.min, info.max, out=rounded)
    return rounded.astype(np.int16)


def write_scan(scan: Scan, path: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``scan.hu`` with its geometry to NIfTI, NRRD or MetaImage (by extension).

    Parameters
    ----------
    scan:
        The scan (HU).
    path:
        Output file: ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha``.
    dtype:
        ``"float32"`` (exact) or ``"int16"`` (HU rounded to whole numbers; half the size).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    output_format(path)
    if dtype == "float32":
        array = np.asarray(scan.hu, dtype=np.float32)
    elif dtype == "int16":
        array = _hu_to_int16(scan.hu)
    else:
        raise ValueError(f"dtype must be 'float32' or 'int16', not {dtype!r}")
    _write_image(scan.to_sitk(array), path)
    return path


def write_label_image(labels: np.ndarray, reference_scan: Scan, path: str | Path) -> Path:
    """Write a label map as a uint8 image (NIfTI, NRRD, MHA) with ``reference_scan``'s geometry.

    Raises
    ------
    InvalidScanError
        If the shape differs from the reference or values do not fit uint8 (0..255 integers).
    """
    path = Path(path)
    output_format(path)
    labels = np.asarray(labels)
    if labels.shape != reference_scan.hu.shape:
        raise InvalidScanError(
            f"Label map shape {labels.shape} differs from the reference scan's "
            f"{reference_scan.hu.shape}; labels must share the scan's grid.")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255
                            or (np.issubdtype(labels.dtype, np.floating)
                                and not np.array_equal(labels, np.rint(labels)))):
            raise InvalidScanError("Label values must be whole numbers in 0..255 to be stored "
                                   "as uint8.")
        labels = labels.astype(np.uint8)
    _write_image(reference_scan.to_sitk(labels), path)
    return path


def write_scan_aim(scan: Scan, path: str | Path, units: Units | str = "native",
                   calibration: Calibration | None = None) -> Path:
    """Write a scan as a Scanco AIM, the way scanners export processed images.

    Parameters
    ----------
    scan:
        The scan (HU).
    path:
        Output ``.aim`` file.
    units:
        ``"native"`` (default, like real AIMs): int16 native values, with the calibration's
        ``Mu_Scaling``, ``HU: mu water`` and density slope/intercept in the processing log, so
        :func:`~.readers.read_scan` converts back to HU (to within native rounding,
        ``1000 / (mu_water * mu_scaling)`` ~ 0.5 HU). ``"hu"``: int16 HU values and no
        calibration in the log (read back with ``units="hu"``).
    calibration:
        Constants for native values; defaults to ``scan.calibration``, else the XtremeCT II
        defaults (:data:`~HRpQCTCore.scan.DEFAULT_CALIBRATION`).

    Notes
    -----
    AIM stores the origin as a whole number of voxels (rounded here) and no direction: a
    non-identity direction is dropped with a warning. Nothing from the scan's metadata is
    written; the processing log holds only the calibration.
    """
    from HRpQCTCore.io import scanco

    path = Path(path)
    unit = Units.parse(units)
    if unit is Units.DENSITY:
        raise ValueError("AIM output supports units 'native' or 'hu'")
    if not np.allclose(scan.direction, _IDENTITY, atol=1e-6):
        log.warning("AIM files have no orientation; the scan's direction %s is not written.",
                    scan.direction)
    grid = [o / sp for o, sp in zip(scan.origin_mm, reversed(scan.spacing_mm), strict=True)]
    if any(abs(g - round(g)) > 1e-3 for g in grid):
        log.info("AIM stores the origin in whole voxels: origin %s mm is rounded to the grid.",
                 scan.origin_mm)
    if unit is Units.NATIVE:
        cal = calibration or scan.calibration or DEFAULT_CALIBRATION
        array = _hu_to_int16(cal.hu_to_native(scan.hu))
    else:
        cal = None
        array = _hu_to_int16(scan.hu)
    with atomic_path(path, check=_at_least(array.nbytes)) as tmp:
        try:
            scanco.write_aim(tmp, array, scan.spacing_mm, scan.origin_mm, cal)
        except RuntimeError as exc:  # the AimIO C++ writer's failures (disk full, ...)
            raise OSError(0, f"the AIM writer failed ({_first_line(exc)})") from None
    return path


def _at_least(size: int):
    """A check that a written (uncompressed) file holds at least ``size`` bytes."""
    def check(path: Path) -> None:
        written = path.stat().st_size
        if written < size:
            raise OSError(0, f"the written file is incomplete ({written} bytes, at least "
                             f"{size} expected; was the disk full?)")
    return check
