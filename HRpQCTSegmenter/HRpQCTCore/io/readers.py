"""Read any scan a user brings into a :class:`~HRpQCTCore.scan.Scan` in HU.

Formats: Scanco AIM and ISQ (through :mod:`.scanco`), NIfTI (``.nii``, ``.nii.gz``), NRRD
(``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder, or any one
file of the series). Every reader returns the same :class:`Scan`: ``hu`` is **always float32**
(integer files convert exactly: float32 holds every int16 value), ``spacing_mm`` ``(z, y, x)``,
``origin_mm`` and ``direction`` in ITK's LPS convention. Files stored as 16-bit integers keep
them: ``hu`` is then a :class:`~HRpQCTCore.hu_volume.StoredHUVolume`, which converts what is
read (the same float32 values, half the memory).

Units (``units="auto"``)
------------------------
* AIM/ISQ grey data are native values; the header calibration (``Mu_Scaling``, ``HU: mu
  water``, density slope/intercept) converts them to HU. No calibration in the header and none
  given -> :class:`~HRpQCTCore.errors.CalibrationError`.
* AIM char data are masks/labels: values are returned as stored (``units_on_disk = "label"``).
* DICOM with modality CT (or Rescale Type HU) is HU after the rescale SimpleITK applies.
* Other files carry no calibration. They are taken as HU only when their histogram has the
  landmarks of an HU scan of a leg (:func:`hu_plausibility`): an air peak in [-1150, -850] HU
  and a soft-tissue peak (fat to muscle) in [-250, 400] HU, with the 99.9th percentile at most
  4500 HU. Peaks of a smoothed histogram do not move with noise, unlike tail percentiles: a
  valid HU scan with 250 HU of noise has its 0.5th percentile near -1700 HU but its air peak
  still at -1000. Native data (air ~0) and density data (air ~ -390 mg HA/cm3) have no air
  peak there, and the reader raises CalibrationError asking for ``--units`` (and the
  calibration).

``units="hu" | "native" | "density"`` overrides the guess; an explicit ``calibration`` overrides
the header's. Metadata never holds patient identifiers: headers are read through allow-lists.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from HRpQCTCore.errors import (
    CalibrationError,
    CorruptFileError,
    InputFileError,
    InvalidScanError,
    UnsupportedFormatError,
)
from HRpQCTCore.hu_volume import StoredHUVolume, keeps_stored
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.scan import XTREMECT1_VOXEL_MM, XTREMECT2_VOXEL_MM, Calibration, Scan, Units

__all__ = [
    "read_scan",
    "detect_format",
    "format_from_name",
    "hu_plausibility",
    "spacing_warning",
    "SCAN_EXTENSIONS",
    "HU_AIR_RANGE",
    "HU_SOFT_TISSUE_RANGE",
    "HU_MAX_PLAUSIBLE",
    "HUPlausibility",
    "SPACING_TOLERANCE",
]

log = logging.getLogger(__name__)

#: File name endings the reader knows, and the format each stands for.
SCAN_EXTENSIONS: dict[str, str] = {
    ".aim": "aim", ".isq": "isq",
    ".nii.gz": "nifti", ".nii": "nifti",
    ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".mha": "metaimage", ".mhd": "metaimage",
    ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom",
}
_SITK_IO = {"nifti": "NiftiImageIO", "nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}

#: The air peak of HU data lies here (air is -1000 HU; calibration drift moves it a little).
HU_AIR_RANGE = (-1150.0, -850.0)
#: The soft-tissue peak of HU data (fat ~ -100 to muscle ~ +60; trabecular bone up to ~400).
HU_SOFT_TISSUE_RANGE = (-250.0, 400.0)
#: The 99.9th percentile of HU data stays below this (cortex ~2900 HU plus noise).
HU_MAX_PLAUSIBLE = 4500.0
#: Relative distance from 0.0607/0.082 mm beyond which the spacing is reported as unusual.
SPACING_TOLERANCE = 0.2

# DICOM tags that describe the acquisition, not the person. Nothing else is ever copied.
_DICOM_FACT_TAGS = {
    "0008|0060": "modality", "0008|0070": "manufacturer", "0008|1090": "model",
    "0018|0060": "kvp", "0018|1151": "tube_current_ma", "0018|0050": "slice_thickness_mm",
    "0018|0015": "body_part", "0028|1054": "rescale_type",
}


@dataclass
class _RawVolume:
    """What a format reader found, before unit conversion.

    ``array`` holds the voxels, or is None when ``voxels`` (an object with ``shape`` and
    ``read(z0, z1)``, e.g. :class:`.scanco.Int16Voxels`) says where to read them slab by slab.
    """

    array: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    calibration: Calibration | None = None
    units_on_disk: str | None = None  # "native", "hu", "label" or None (unknown)
    facts: dict[str, Any] = field(default_factory=dict)
    reader: str = ""
    warnings: list[str] = field(default_factory=list)
    voxels: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The volume's shape, read or not."""
        return tuple(self.array.shape) if self.array is not None else tuple(self.voxels.shape)


# ------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------
def _strip_version(name: str) -> str:
    """Drop an OpenVMS version suffix (``SCAN.AIM;1``) that Scanco exports carry."""
    stem, sep, version = name.rpartition(";")
    return stem if sep and version.isdigit() else name


def _magic(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head.startswith(b"CTDATA-HEADER_V1"):
        return "isq"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def format_from_name(path: str | Path) -> str | None:
    """The format :data:`SCAN_EXTENSIONS` gives the file name's ending (None: not known)."""
    name = _strip_version(Path(path).name).lower()
    for ending, fmt in SCAN_EXTENSIONS.items():
        if name.endswith(ending):
            return fmt
    return None


def detect_format(path: str | Path) -> str:
    """Return ``"aim"``, ``"isq"``, ``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"``.

    Raises
    ------
    InputFileError
        If the path does not exist or the file is empty.
    UnsupportedFormatError
        If the extension (or, without one, the content) is not a known scan format.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(
            f"Input not found: {path}. Check the path (and that the drive is mounted).")
    if path.is_dir():
        return "dicom"
    if path.stat().st_size == 0:
        raise InputFileError(
            f"Input file {path} is empty (0 bytes): the copy or export probably failed. "
            "Copy or export the scan again.")
    fmt = format_from_name(path)
    if fmt is not None:
        return fmt
    magic = _magic(path)
    if magic is not None:
        return magic
    known = ", ".join(SCAN_EXTENSIONS)
    raise UnsupportedFormatError(
        f"Cannot tell the format of {path}: the engine reads Scanco AIM/ISQ, NIfTI, NRRD, "
        f"MetaImage and DICOM ({known}, or a DICOM folder). Convert the scan to one of these "
        "(e.g. NIfTI), or give it the right extension.")


# ------------------------------------------------------------------------------------------
# format readers
# ------------------------------------------------------------------------------------------
def _read_scanco(path: Path, fmt: str) -> _RawVolume:
    from HRpQCTCore.io import scanco

    # lazy: int16 voxels are converted slab by slab, never held whole beside the HU volume
    read = scanco.read_aim if fmt == "aim" else scanco.read_isq
    volume = read(path, lazy=True)
    warnings: list[str] = []
    if len(volume.shape) != 3 or min(volume.shape) < 1:
        raise InvalidScanError(f"{path} holds an empty volume of shape {volume.shape}.")
    facts = dict(volume.facts)
    if volume.voxels is not None:
        facts["dtype_on_disk"] = "int16"
    return _RawVolume(
        array=volume.array, spacing_mm=volume.spacing_mm, origin_mm=volume.origin_mm,
        calibration=volume.calibration,
        units_on_disk="label" if volume.kind == "mask" else "native",
        facts=facts, reader=scanco.backend_name(), warnings=warnings, voxels=volume.voxels)


def _check_image_shape(path: Path, dimension: int, size: tuple[int, ...], components: int
                       ) -> None:
    if components != 1:
        raise InvalidScanError(
            f"{path} has {components} values per voxel (a colour, vector or multi-channel "
            "image); a scan has one grey value per voxel. Export a single-channel greyscale "
            "volume.")
    if dimension == 2:
        raise InvalidScanError(
            f"{path} is a 2D image of size {size[0]} x {size[1]}; an HR-pQCT scan is a 3D stack "
            "of slices. Load the whole series or volume, not a single slice.")
    if dimension > 3 and any(s != 1 for s in size[3:]):
        raise InvalidScanError(
            f"{path} is a {dimension}D image of size {size} (a time series or several volumes); "
            "the engine needs one 3D volume. Extract a single 3D volume first (e.g. the first "
            "time point).")
    if dimension < 2:
        raise InvalidScanError(f"{path} is a {dimension}D image; a scan must be 3D.")
    if any(s < 1 for s in size[:3]):
        raise InvalidScanError(f"{path} holds an empty image of size {size}.")


def _sitk_to_raw(image, path: Path, reader_name: str) -> _RawVolume:
    import SimpleITK as sitk

    if image.GetDimension() > 3:  # a 4D image whose extra axes have length 1
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0] * (len(size) - 3),
                             [0] * len(size), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    array = sitk.GetArrayViewFromImage(image)
    # One copy: 16-bit integers as they are (the scan keeps them: :func:`_convert_voxels`),
    # anything else into float32 straight away; integer files convert exactly.
    voxels = np.array(array) if keeps_stored(array.dtype) else np.array(array, dtype=np.float32)
    return _RawVolume(
        array=voxels, spacing_mm=tuple(reversed(image.GetSpacing())),  # type: ignore[arg-type]
        origin_mm=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()),  # type: ignore[arg-type]
        reader=reader_name, facts={"dtype_on_disk": str(array.dtype)})


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64
_CHUNK_BYTES = 1 << 26


def _nifti_check_data(path: Path) -> None:
    """Check a NIfTI-1 file's voxel data: complete, and finite for float data.

    ITK's NIfTI reader neither reports a truncated file (it returns what it got) nor keeps NaN
    or Inf (they come back as 0), so both are checked here on the raw bytes. Integer ``.nii.gz``
    files take a fast path: the gzip trailer's size field matches a complete file.
    """
    import gzip
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            header = fh.read(348)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFileError(f"Cannot read {path}: {exc}. The file is damaged or truncated; "
                               "export it again.") from None
    if len(header) < 348:
        raise CorruptFileError(f"{path} is truncated (its NIfTI header is incomplete). Export "
                               "the scan again.")
    endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)
    if endian is None:
        return  # NIfTI-2 or unusual: SimpleITK's own checks apply
    dims = struct.unpack(endian + "8h", header[40:56])
    _nifti_check_voxel_size(path, dims, struct.unpack(endian + "8f", header[76:108]))
    datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
    vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
    n_voxels = int(np.prod([max(1, d) for d in dims[1:1 + max(0, min(dims[0], 7))]]))
    data_bytes = n_voxels * bitpix // 8
    float_code = _NIFTI_FLOAT_TYPES.get(datatype)
    truncated = CorruptFileError(
        f"{path} is truncated: its header announces {n_voxels} voxels ({data_bytes} bytes) but "
        "the file holds fewer. Copy or export the scan again.")
    if not compressed:
        if path.stat().st_size < vox_offset + data_bytes:
            raise truncated
        if float_code:
            data = np.memmap(path, dtype=endian + float_code, mode="r", offset=vox_offset,
                             shape=(n_voxels,))
            step = _CHUNK_BYTES // data.itemsize
            bad = sum(int(np.count_nonzero(~np.isfinite(data[i:i + step])))
                      for i in range(0, n_voxels, step))
            _raise_if_non_finite(path, bad)
        return
    if not float_code:
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            if struct.unpack("<I", fh.read(4))[0] == (vox_offset + data_bytes) % 2**32:
                return
    bad, remaining, carry = 0, data_bytes, b""
    try:
        with gzip.open(path, "rb") as fh:
            fh.seek(vox_offset)
            while remaining > 0:
                chunk = fh.read(min(_CHUNK_BYTES, remaining))
                if not chunk:
                    raise truncated
                remaining -= len(chunk)
                if float_code:
                    chunk = carry + chunk
                    usable = len(chunk) - len(chunk) % (bitpix // 8)
                    values = np.frombuffer(chunk[:usable], dtype=endian + float_code)
                    bad += int(np.count_nonzero(~np.isfinite(values)))
                    carry = chunk[usable:]
    except (EOFError, zlib.error, OSError):
        raise truncated from None
    _raise_if_non_finite(path, bad)


def _nifti_check_voxel_size(path: Path, dims: tuple[int, ...], pixdim: tuple[float, ...]
                            ) -> None:
    """Refuse a NIfTI header without a voxel size (pixdim 0 or not a number).

    ITK replaces such a pixdim by 1 mm without a word, which makes every area, volume and
    mm-sized post-processing step wrong by a factor of ~16 (0.0607 mm voxels read as 1 mm).
    """
    n_axes = max(0, min(int(dims[0]), 3))
    bad = [(axis, value) for axis, value in zip("xyz", pixdim[1:1 + n_axes], strict=False)
           if not (math.isfinite(value) and value != 0.0)]
    if bad:
        shown = ", ".join(f"{axis} = {value:g}" for axis, value in bad)
        raise InvalidScanError(
            f"{path} has no voxel size: its NIfTI header gives pixdim {shown} mm, and a scan "
            "needs its voxel size for every area, volume and distance. Export the scan again "
            "with its spacing (e.g. from the scanner software or 3D Slicer), or convert it "
            "from the original AIM/ISQ/DICOM file.")


def _raise_if_non_finite(path: Path, bad: int) -> None:
    if bad:
        raise InvalidScanError(
            f"{path} contains {bad} NaN or infinite voxel values; a scan must hold finite grey "
            "values. Re-export it, or replace the invalid voxels (e.g. with -1000 HU) first.")


def _read_sitk_file(path: Path, fmt: str) -> _RawVolume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_SITK_IO[fmt])
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CorruptFileError(
            f"Cannot read the header of {path} as {fmt.upper()}: the file is damaged, truncated "
            f"or not really {fmt.upper()} ({_first_line(exc)}). Export the scan again.") from None
    _check_image_shape(path, reader.GetDimension(), reader.GetSize(),
                       reader.GetNumberOfComponents())
    if fmt == "nifti":
        _nifti_check_data(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CorruptFileError(
            f"Cannot read the voxel data of {path}: the file is truncated or damaged "
            f"({_first_line(exc)}). Copy or export the scan again.") from None
    return _sitk_to_raw(image, path, f"SimpleITK {sitk.Version.VersionString()}")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines
    return useful[-1][:200] if useful else type(exc).__name__


def _dicom_files(path: Path) -> tuple[list[str], list[str]]:
    """The file names of the series at ``path`` (a folder or one file), and warnings."""
    import SimpleITK as sitk

    warnings: list[str] = []
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputFileError(
                f"No DICOM series found in folder {path}. Point to the folder that holds the "
                "scan's DICOM files (or to one of them), or convert the scan to NIfTI.")
        files_by_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)
                           for uid in series}
        chosen = max(files_by_series, key=lambda uid: len(files_by_series[uid]))
        if len(series) > 1:
            warnings.append(
                f"Folder {path.name} holds {len(series)} DICOM series; the largest "
                f"({len(files_by_series[chosen])} files) was read. Point to one file of "
                "another series to read that one.")
        return list(files_by_series[chosen]), warnings
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CorruptFileError(
            f"Cannot read {path} as DICOM ({_first_line(exc)}); the file is damaged or not "
            "DICOM.") from None
    uid = reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""
    files = (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid)
             if uid else ())
    return (list(files) if files else [str(path)]), warnings


def _read_dicom(path: Path) -> _RawVolume:
    import SimpleITK as sitk

    files, warnings = _dicom_files(path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CorruptFileError(
            f"Cannot read the DICOM series at {path} ({_first_line(exc)}); a file is damaged "
            "or the series is incomplete. Export the series again.") from None
    size = image.GetSize()
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and size[2] == 1):
        raise InvalidScanError(
            f"The DICOM series at {path} has a single slice; an HR-pQCT scan is a 3D stack. "
            "Point to the folder (or a file) of the complete series.")
    _check_image_shape(path, image.GetDimension(), size, image.GetNumberOfComponentsPerPixel())
    raw = _sitk_to_raw(image, path, f"SimpleITK {sitk.Version.VersionString()} (GDCM)")
    facts = {}
    for tag, name in _DICOM_FACT_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            value = reader.GetMetaData(0, tag).strip()
            if value:
                facts[name] = value
    raw.facts.update(facts)
    raw.facts["n_files"] = len(files)
    if facts.get("modality", "").upper() == "CT" or facts.get("rescale_type", "").upper() == "HU":
        raw.units_on_disk = "hu"
    raw.warnings.extend(warnings)
    return raw


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------
def _sample(array: np.ndarray, max_samples: int = 2_000_000) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // max_samples)
    return flat[::step]


class HUPlausibility(NamedTuple):
    """What :func:`hu_plausibility` found; ``None`` where a landmark is absent."""

    plausible: bool
    air_peak: float | None
    soft_tissue_peak: float | None
    p99_9: float

    def describe(self) -> str:
        """The landmarks in words, for messages."""
        def peak(value: float | None) -> str:
            return "none" if value is None else f"{value:.0f}"

        return (f"lowest histogram peak (air, in HU data) {peak(self.air_peak)}, "
                f"soft-tissue peak {peak(self.soft_tissue_peak)}, 99.9th percentile "
                f"{self.p99_9:.0f}")


_HISTOGRAM_RANGE = (-2000.0, 3000.0)
_HISTOGRAM_BIN = 10.0
_SMOOTHING_SD = 40.0  # smooths the sampling noise of the histogram, not the peaks away
_PEAK_HALF_WIDTH_BINS = 10  # a peak is the highest bin within +-100 units
_MAJOR_PEAK_FRACTION = 0.05  # of the tallest peak: smaller bumps are noise in the tails


def _smoothed_histogram(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and Gaussian-smoothed counts of ``sample`` on :data:`_HISTOGRAM_RANGE`."""
    edges = np.arange(_HISTOGRAM_RANGE[0], _HISTOGRAM_RANGE[1] + _HISTOGRAM_BIN, _HISTOGRAM_BIN)
    counts, _ = np.histogram(sample, bins=edges)
    sd_bins = _SMOOTHING_SD / _HISTOGRAM_BIN
    offsets = np.arange(-math.ceil(4 * sd_bins), math.ceil(4 * sd_bins) + 1)
    kernel = np.exp(-0.5 * (offsets / sd_bins) ** 2)
    smooth = np.convolve(counts.astype(np.float64), kernel / kernel.sum(), mode="same")
    return (edges[:-1] + edges[1:]) / 2, smooth


def _major_peaks(centres: np.ndarray, smooth: np.ndarray) -> list[tuple[float, float]]:
    """``(position, height)`` of the histogram's major peaks, lowest position first.

    A peak is the highest bin within :data:`_PEAK_HALF_WIDTH_BINS` (so the histogram's ends,
    where padding values pile up, never count); a major one is at least
    :data:`_MAJOR_PEAK_FRACTION` of the tallest.
    """
    k = _PEAK_HALF_WIDTH_BINS
    if smooth.size <= 2 * k or smooth.max() <= 0:
        return []
    floor = _MAJOR_PEAK_FRACTION * smooth.max()
    return [(float(centres[i]), float(smooth[i])) for i in range(k, smooth.size - k)
            if smooth[i] >= floor and smooth[i] >= smooth[i - k:i + k + 1].max()
            and smooth[i] > smooth[i - 1]]  # one position per flat top


def hu_plausibility(array: np.ndarray) -> HUPlausibility:
    """Whether values look like HU, judged from the air and soft-tissue peaks of a sample.

    HU data of a leg have their lowest major histogram peak at air, ~-1000
    (:data:`HU_AIR_RANGE`), a soft-tissue peak (:data:`HU_SOFT_TISSUE_RANGE`), and nothing
    real exceeds :data:`HU_MAX_PLAUSIBLE` at the 99.9th percentile. Peaks of a smoothed
    histogram stay put when noise widens them, unlike tail percentiles. The lowest peak of
    native values is air at ~0, of densities air at ~-390 mg HA/cm3: both fail.
    """
    sample = _sample(array).astype(np.float32, copy=False)
    high = float(np.percentile(sample, 99.9)) if sample.size else math.nan
    peaks = _major_peaks(*_smoothed_histogram(sample))
    air_peak = peaks[0][0] if peaks else None
    soft = [p for p in peaks[1:]
            if HU_SOFT_TISSUE_RANGE[0] <= p[0] <= HU_SOFT_TISSUE_RANGE[1]]
    soft_peak = max(soft, key=lambda p: p[1])[0] if soft else None
    plausible = (air_peak is not None and HU_AIR_RANGE[0] <= air_peak <= HU_AIR_RANGE[1]
                 and soft_peak is not None and high <= HU_MAX_PLAUSIBLE)
    return HUPlausibility(plausible, air_peak, soft_peak, high)


def _check_finite(array: np.ndarray, path: Path) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = 0
    for start in range(0, array.shape[0], 16):  # bounded memory: 16 slices of booleans at a time
        bad += int(np.count_nonzero(~np.isfinite(array[start:start + 16])))
    _raise_if_non_finite(path, bad)


def spacing_warning(spacing_mm: tuple[float, float, float]) -> str | None:
    """A warning text if the spacing is far from HR-pQCT's 0.0607 mm (or 0.082 mm), else None."""
    def near(s: float, ref: float) -> bool:
        return abs(s - ref) <= SPACING_TOLERANCE * ref

    if all(near(s, XTREMECT2_VOXEL_MM) or near(s, XTREMECT1_VOXEL_MM) for s in spacing_mm):
        return None
    shown = " x ".join(f"{s:.4g}" for s in spacing_mm)
    return (f"Voxel spacing (z, y, x) = {shown} mm is far from HR-pQCT's {XTREMECT2_VOXEL_MM} mm "
            f"(XtremeCT II) or {XTREMECT1_VOXEL_MM} mm (XtremeCT I). Check that the file's "
            "spacing is right; the segmentation model expects ~0.0607 mm voxels, so resample "
            f"first (`hrpqct convert IN OUT --resample-mm {XTREMECT2_VOXEL_MM}`, or "
            "HRpQCTCore.io.resample_to_spacing).")


# ------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------
def _needs_calibration(path: Path, what: str) -> CalibrationError:
    return CalibrationError(
        f"{path} is in {what} units and no calibration is available (none in the file, none "
        "given). Pass the scanner's calibration: --mu-scaling and --mu-water (and "
        "--density-slope/--density-intercept for density data), or the `calibration` argument; "
        "or declare the data as HU with --units hu if it already is.")


#: Slices converted at once when the voxels are read slab by slab (~40 MB of int16 voxels and
#: two float32 temporaries of a 1600 x 1600 scan): the conversion's memory beside the result.
_CONVERT_SLICES = 8


def _as_float32(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _convert_voxels(raw: _RawVolume, convert, keep_stored: bool = False
                    ) -> np.ndarray | StoredHUVolume:
    """``convert(voxels)`` as float32; voxels read slab by slab are converted slab by slab.

    ``convert`` works voxel by voxel (casts and affine maps), so converting slabs into the
    result gives the same bits as converting the whole volume, without the whole on-disk
    volume (or a float32 temporary of it) beside the result. With ``keep_stored``, voxels
    stored as integers of up to 16 bits are kept as they are and converted where read
    (:class:`~HRpQCTCore.hu_volume.StoredHUVolume`: the same values, half the memory).
    """
    if keep_stored and keeps_stored((raw.voxels if raw.voxels is not None else raw.array).dtype):
        return StoredHUVolume(np.ascontiguousarray(_whole(raw)), convert)
    if raw.voxels is None:
        return convert(raw.array)
    n_slices = raw.shape[0]
    out = np.empty(raw.shape, dtype=np.float32)
    for z0 in range(0, n_slices, _CONVERT_SLICES):
        z1 = min(n_slices, z0 + _CONVERT_SLICES)
        out[z0:z1] = convert(raw.voxels.read(z0, z1))
    return out


def _whole(raw: _RawVolume) -> np.ndarray:
    """The voxels as stored, read whole if they were not yet."""
    return raw.array if raw.array is not None else raw.voxels.read(0, raw.shape[0])


def _to_hu(raw: _RawVolume, path: Path, units: str, user_cal: Calibration | None,
           keep_stored: bool = False) -> tuple[np.ndarray, str, str, Calibration | None]:
    """Return ``(hu, units_on_disk, units_source, calibration_used)``."""
    calibration = user_cal or raw.calibration
    _converted = functools.partial(_convert_voxels, keep_stored=keep_stored)
    if units == "auto":
        on_disk = raw.units_on_disk
        if on_disk in ("hu", "label"):
            return _converted(raw, _as_float32), on_disk, "header", calibration
        if on_disk == "native":
            if calibration is None:
                raise _needs_calibration(path, "native (Scanco)")
            return _converted(raw, calibration.native_to_hu), "native", "header", calibration
        found = hu_plausibility(_whole(raw))
        if found.plausible:
            return (_converted(raw, _as_float32), "hu",
                    "assumed (value range plausible for HU)", calibration)
        raise CalibrationError(
            f"{path} does not say what units its values are in, and they do not look like HU "
            f"({found.describe()}; HU data of a leg have an air peak in "
            f"{HU_AIR_RANGE[0]:.0f}..{HU_AIR_RANGE[1]:.0f}, a soft-tissue peak in "
            f"{HU_SOFT_TISSUE_RANGE[0]:.0f}..{HU_SOFT_TISSUE_RANGE[1]:.0f} and stay below "
            f"{HU_MAX_PLAUSIBLE:.0f}). Say what they are with --units native or --units density "
            "plus the scanner's calibration (--mu-scaling, --mu-water, --density-slope, "
            "--density-intercept), or --units hu if they are HU.")
    unit = Units.parse(units)
    if unit is Units.HU:
        return _converted(raw, _as_float32), "hu", "user", calibration
    if calibration is None:
        raise _needs_calibration(path, unit.value)
    if unit is Units.NATIVE:
        return _converted(raw, calibration.native_to_hu), "native", "user", calibration
    return _converted(raw, calibration.density_to_hu), "density", "user", calibration


# ------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------
def read_scan(path: str | Path, units: Units | str = "auto",
              calibration: Calibration | None = None, *,
              progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None, keep_stored: bool = True) -> Scan:
    """Read a scan in any supported format and return it in HU (float32).

    Parameters
    ----------
    path:
        A file (``.aim``, ``.isq``, ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``,
        ``.mhd``, ``.dcm``) or a folder holding a DICOM series.
    units:
        ``"auto"`` (from the header, or HU if the value range is plausible -- see the module
        docstring), or ``"hu"``, ``"native"``, ``"density"`` to say what the file holds.
    calibration:
        Calibration to use instead of the header's (needed for native/density data that carry
        none).
    progress, cancel:
        Progress callback and cancel token (stages: read, convert).
    keep_stored:
        Keep voxels stored as integers of up to 16 bits (Scanco files, int16 NIfTI/NRRD/DICOM)
        as they are: ``hu`` is then a :class:`~HRpQCTCore.hu_volume.StoredHUVolume`, which
        gives float32 HU wherever it is read, bit-identical to converting the whole volume
        (False does that), in half the memory (0.8 instead of 1.6 GiB for a full scan).

    Returns
    -------
    Scan
        ``hu`` float32 ``[z, y, x]`` (an array, or a stored volume); ``metadata`` with
        ``source_format``, ``units_on_disk``, ``units_source``, ``calibration`` (dict or
        None), ``calibration_source``, ``dtype_on_disk``, ``reader``, ``scanner``
        (non-identifying facts) and ``warnings``.

    Raises
    ------
    InputFileError, UnsupportedFormatError, CorruptFileError
        Missing, empty, unknown, truncated or damaged files.
    InvalidScanError
        2D, 4D, multi-component, empty or non-finite data.
    CalibrationError
        Units that cannot be converted to HU with what is known.
    """
    path = Path(path)
    if units != "auto":
        try:
            Units.parse(units)
        except ValueError as exc:
            raise CalibrationError(f"{exc} (or 'auto').") from None
    fmt = detect_format(path)
    report(progress, 0, 2, "read")
    if fmt in ("aim", "isq"):
        raw = _read_scanco(path, fmt)
    elif fmt == "dicom":
        raw = _read_dicom(path)
    else:
        raw = _read_sitk_file(path, fmt)
    check(cancel)
    report(progress, 1, 2, "convert")
    dtype_on_disk = raw.facts.pop("dtype_on_disk", None) or str(raw.array.dtype)
    if len(raw.shape) != 3 or min(raw.shape) < 1:
        raise InvalidScanError(f"{path} holds data of shape {raw.shape}, not a 3D volume.")
    if raw.shape[0] < 2:
        raise InvalidScanError(
            f"{path} holds a single slice (shape {raw.shape}); an HR-pQCT scan is a 3D "
            "stack of slices. Load the complete volume.")
    if raw.array is not None:  # voxels read slab by slab are int16: finite by type
        _check_finite(raw.array, path)
    hu, on_disk, units_source, used = _to_hu(raw, path, str(getattr(units, "value", units)),
                                             calibration, keep_stored=keep_stored)
    raw.array, raw.voxels = hu, None  # drop the reference to the on-disk array early
    warnings = list(raw.warnings)
    spacing_text = spacing_warning(raw.spacing_mm)
    if spacing_text:
        warnings.append(spacing_text)
    for text in warnings:
        log.warning(text)
    metadata: dict[str, Any] = {
        "source_format": fmt,
        "units_on_disk": on_disk,
        "units_source": units_source,
        "calibration": used.to_dict() if used is not None else None,
        "calibration_source": used.source if used is not None else None,
        "dtype_on_disk": dtype_on_disk,
        "reader": raw.reader,
        "scanner": raw.facts,
        "warnings": warnings,
    }
    if not all(math.isfinite(v) for v in raw.origin_mm):
        raise InvalidScanError(f"{path} has a non-finite origin {raw.origin_mm}.")
    try:
        scan = Scan(hu=hu, spacing_mm=raw.spacing_mm, origin_mm=raw.origin_mm,
                    direction=raw.direction, calibration=used, metadata=metadata)
    except ValueError as exc:
        raise InvalidScanError(f"{path}: {exc}. Check the file's geometry.") from None
    report(progress, 2, 2, "convert")
    return scan
