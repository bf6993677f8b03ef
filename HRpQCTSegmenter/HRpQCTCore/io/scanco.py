"""Scanco AIM/ISQ access, kept behind this one module so the library can be swapped.

The engine uses ``aimio-py`` (module ``py_aimio``, bindings to Numerics88 AimIO); see
``docs/scanco-io.md`` for why. Nothing outside this module imports ``py_aimio``.

What the rest of the engine sees is a :class:`ScancoVolume`: the voxel array exactly as stored
(int16 native values for grey AIMs and ISQs, int8 for char masks), the geometry in the
engine's conventions, the calibration found in the header (or ``None``) and an allow-listed set
of acquisition facts. Patient name, patient/measurement index, dates, scanner serial number and
the free-text processing log are never copied: headers are read through an allow-list, so a
field this module does not know cannot leak.

With ``lazy=True`` an uncompressed int16 volume (every ISQ, short AIMs) comes as
:class:`Int16Voxels` instead of an array: where its voxels lie in the file, read slab by slab,
so that a caller converting them (to HU, float32) never holds the whole int16 volume beside
its result (0.86 GB for a full 168 x 1600 x 1600 scan).

Notes on the formats (found while testing; see ``docs/scanco-io.md``):

* AIM stores the origin as an integer voxel ``position``; an origin that is not a whole number of
  voxels is rounded when written. AIM has no direction matrix (identity is assumed).
* ISQ voxel data are little-endian int16 right after ``(data_offset + 1) * 512`` header bytes.
  aimio-py 0.4.1 sizes the data from the header's ``nr_of_bytes`` field, which some writers
  (ITK's) fill differently, so the voxels are read here with numpy from the computed offset and
  only the header is taken from aimio-py.
* Header text (the AIM processing log, the ISQ patient name) is often Latin-1 (``ø``, ``µ``);
  aimio-py 0.4.1 decodes it as UTF-8 and fails. Such files are read from a temporary copy
  whose non-ASCII header text bytes are replaced by ``?`` (patient fields are never copied
  anyway; the calibration lines are ASCII). Header fields aimio-py does not check (negative
  data offset, negative or zero voxel size, data type) are checked here first.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.errors import CorruptFileError, InvalidScanError, UnsupportedFormatError
from HRpQCTCore.native_output import native_stdout_to_log
from HRpQCTCore.scan import DEFAULT_CALIBRATION, Calibration

__all__ = ["ScancoVolume", "Int16Voxels", "read_aim", "read_isq", "write_aim", "backend_name"]

_ISQ_MAGIC = b"CTDATA-HEADER_V1"
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_LOG_CALIBRATION = {
    "mu_scaling": re.compile(r"^Mu_Scaling\s+" + _NUMBER, re.MULTILINE),
    "mu_water": re.compile(r"^HU:\s*mu water\s+" + _NUMBER, re.MULTILINE),
    "density_slope": re.compile(r"^Density:\s*slope\s+" + _NUMBER, re.MULTILINE),
    "density_intercept": re.compile(r"^Density:\s*intercept\s+" + _NUMBER, re.MULTILINE),
}
# Processing-log keys that describe the acquisition without identifying anyone. Everything
# else (Patient Name, Index Patient, Index Measurement, dates, Scanner ID, free text) is dropped.
_LOG_FACT_KEYS = (
    "Site", "Scanner type", "Energy [V]", "Intensity [uA]", "Mu_Scaling", "Calibration Data",
    "HU: mu water", "Density: unit", "Density: slope", "Density: intercept",
    "Orig-ISQ-Dim-p", "Orig-ISQ-Dim-um", "No. samples", "No. projections per 180",
    "Integration time [us]", "Scan Distance [um]", "Reconstruction-Alg.",
)
# ISQ header fields (aimio-py names) that are acquisition facts, not identifiers.
_ISQ_FACT_KEYS = (
    "site", "scanner_type", "energy", "intensity", "mu_scaling", "nr_of_samples",
    "nr_of_projections", "scandist_um", "sampletime_us", "slice_thickness_um",
    "slice_increment_um", "recon_alg", "mu_water", "rescale_units",
)


def backend_name() -> str:
    """Name and version of the library doing the Scanco I/O (for provenance)."""
    try:
        from importlib.metadata import version

        return f"aimio-py {version('aimio-py')}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "aimio-py"


@dataclass(frozen=True)
class Int16Voxels:
    """Uncompressed little-endian int16 voxels ``[z, y, x]`` at byte ``offset`` of ``path``.

    :meth:`read` returns any run of slices, so a volume can be converted slab by slab into its
    final array. The file's size was checked against ``shape`` when this was made.
    """

    path: Path
    offset: int
    shape: tuple[int, int, int]
    #: The type :meth:`read` returns.
    dtype = np.dtype("<i2")

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` as stored (int16, little-endian), shape ``(z1 - z0, ny, nx)``.

        Raises
        ------
        CorruptFileError
            If the file became shorter than its header says since it was opened.
        """
        _, ny, nx = self.shape
        count = (z1 - z0) * ny * nx
        array = np.fromfile(self.path, dtype="<i2", count=count,
                            offset=self.offset + z0 * ny * nx * 2)
        if array.size != count:
            raise CorruptFileError(
                f"{self.path} is truncated: slices {z0}..{z1 - 1} lie beyond its end. Copy the "
                "file again from the scanner.")
        return array.reshape(z1 - z0, ny, nx)


@dataclass
class ScancoVolume:
    """An AIM or ISQ volume as stored, with geometry, calibration and safe facts.

    Attributes
    ----------
    array:
        Voxels ``[z, y, x]`` with the file's own dtype (int16 native, int8 mask, float32);
        ``None`` when ``voxels`` gives them instead (a lazy read).
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    origin_mm:
        Position ``(x, y, z)`` of voxel ``[0, 0, 0]`` in mm (AIM: ``position * element_size``).
    calibration:
        Calibration from the header, or ``None`` when the header has none.
    kind:
        ``"grey"`` (short/float data) or ``"mask"`` (char data).
    facts:
        Allow-listed, non-identifying header facts.
    voxels:
        Where the int16 voxels lie in the file (lazy reads only; else ``None``).
    """

    array: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    calibration: Calibration | None
    kind: str
    facts: dict[str, Any] = field(default_factory=dict)
    voxels: Int16Voxels | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The volume's shape ``(z, y, x)``, whether read or lazy."""
        return tuple(self.array.shape) if self.array is not None else self.voxels.shape


def _aimio():
    try:
        import py_aimio
    except ImportError:  # pragma: no cover - dependency missing
        raise UnsupportedFormatError(
            "Reading Scanco AIM/ISQ files needs the 'aimio-py' package; install it with "
            "'pip install aimio-py', or export the scan to NIfTI/DICOM first.") from None
    return py_aimio


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _calibration(mu_scaling: float | None, mu_water: float | None,
                 density_slope: float | None, density_intercept: float | None
                 ) -> Calibration | None:
    """A header calibration, or ``None`` if the HU constants are absent or unusable.

    Density constants missing from an otherwise calibrated header take the XtremeCT II defaults,
    and ``source`` says so.
    """
    if not (mu_scaling and mu_scaling > 1 and mu_water and mu_water > 0):
        return None
    source = "header"
    if not (density_slope and density_slope > 0) or density_intercept is None:
        density_slope = DEFAULT_CALIBRATION.density_slope
        density_intercept = DEFAULT_CALIBRATION.density_intercept
        source = "header (density constants: default)"
    return Calibration(mu_scaling=float(mu_scaling), mu_water=float(mu_water),
                       density_slope=float(density_slope),
                       density_intercept=float(density_intercept), source=source)


def _log_facts(log: str) -> dict[str, str]:
    facts = {}
    for line in log.splitlines():
        if line.startswith("!"):
            continue
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2 and parts[0] in _LOG_FACT_KEYS:
            facts[parts[0]] = parts[1].strip()
    return facts


_ISQ_INT16 = 3  # the only ISQ data type: signed 16-bit voxels
_REPLACEMENT = ord("?")


def _non_ascii(data: bytes) -> bool:
    return any(b >= 0x80 for b in data)


@contextlib.contextmanager
def _readable_copy(path: Path, text_spans: Sequence[tuple[int, int]], header_only: int | None
                   ) -> Iterator[Path]:
    """``path`` itself, or a copy whose non-ASCII bytes in ``text_spans`` are replaced.

    Parameters
    ----------
    text_spans:
        ``(start, stop)`` byte ranges of header text (processing log, patient name).
    header_only:
        Copy only the first ``header_only`` bytes (enough for an ISQ header read); None: all.
    """
    with open(path, "rb") as fh:
        spans = []
        for start, stop in text_spans:
            fh.seek(start)
            spans.append((start, fh.read(max(0, stop - start))))
    if not any(_non_ascii(text) for _, text in spans):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="hrpqct-scanco-") as tmp:
        copy = Path(tmp) / path.name.replace(";", "_")
        if header_only is None:
            shutil.copyfile(path, copy)
        else:
            with open(path, "rb") as fh:
                copy.write_bytes(fh.read(header_only))
        with open(copy, "r+b") as fh:
            for start, text in spans:
                fh.seek(start)
                fh.write(bytes(_REPLACEMENT if b >= 0x80 else b for b in text))
        yield copy


def _aim_log_span(path: Path) -> tuple[int, int] | None:
    """Byte range of an AIM's processing log from its pre-header (None: not understood)."""
    sections = _aim_sections(path)
    return None if sections is None else sections[:2]


def _aim_sections(path: Path) -> tuple[int, int, int] | None:
    """Where an AIM's processing log starts and ends and how many bytes of voxel data follow.

    v030 files start with ``AIMDATA_V030`` and five int64 section sizes, v020 with
    ``AIMDATA_V020`` and five int32, v010 with the five int32 directly; the sections are
    pre-header, header struct, processing log, voxel data, associated data. None: not a
    layout this module understands.
    """
    with open(path, "rb") as fh:
        head = fh.read(56)
    if head.startswith(b"AIMDATA_V030") and len(head) >= 56:
        base, sizes = 16, struct.unpack_from("<5q", head, 16)
    elif head.startswith(b"AIMDATA_V020") and len(head) >= 36:
        base, sizes = 16, struct.unpack_from("<5i", head, 16)
    elif len(head) >= 20:
        base, sizes = 0, struct.unpack_from("<5i", head, 0)
    else:
        return None
    pre, header, log_size, data_size = sizes[:4]
    if pre not in (20, 40) or header <= 0 or log_size < 0:
        return None  # not a layout we know: aimio-py's own checks apply
    start = base + pre + header
    return start, start + log_size, data_size


def _check_voxel_size(path: Path, sizes_mm: Sequence[float], field_name: str) -> None:
    """Refuse a zero, negative or non-finite voxel size, saying which."""
    negative = [s for s in sizes_mm if math.isfinite(s) and s < 0]
    shown = " x ".join(f"{s:g}" for s in sizes_mm)
    if negative:
        raise InvalidScanError(
            f"{path}: the header gives a negative voxel size ({field_name} {shown} mm); the "
            "header is damaged or was written wrongly. Export the scan again from the scanner.")
    if not all(math.isfinite(s) and s > 0 for s in sizes_mm):
        raise InvalidScanError(
            f"{path} has no voxel size ({field_name} {shown} mm): every area, volume and "
            "distance needs it. Export the scan again from the scanner with its geometry.")


def _raise_read_error(path: Path, kind: str, exc: Exception) -> None:
    raise CorruptFileError(
        f"Cannot read {path} as a Scanco {kind} file ({exc}). The file is probably truncated "
        f"(an interrupted copy) or not really an {kind}: copy it again from the scanner, or "
        "export it to NIfTI/DICOM.") from exc


#: AimIO's type code of uncompressed 16-bit signed voxels (``D1Tshort``).
_AIM_SHORT = 0x00020002


def read_aim(path: str | Path, *, lazy: bool = False) -> ScancoVolume:
    """Read a Scanco AIM (v010/v020/v030; short, float, char and compressed char types).

    Parameters
    ----------
    lazy:
        For an uncompressed short AIM, read only the header and return the voxels' place in
        the file (``voxels``, ``array`` None); other types are read whole either way.

    Raises
    ------
    CorruptFileError
        If the file is truncated or not an AIM.
    """
    path = Path(path)
    if lazy:
        volume = _read_aim_lazily(path)
        if volume is not None:
            return volume
    pa = _aimio()
    log_span = _aim_log_span(path)
    try:
        # raw values + header; no unit conversion. AimIO prints to stdout before some errors.
        with _readable_copy(path, [log_span] if log_span else [], None) as readable, \
                native_stdout_to_log("AimIO"):
            array, meta = pa._aimio.read_aim(str(readable))
    except Exception as exc:  # AimIO raises RuntimeError for any I/O or format problem
        _raise_read_error(path, "AIM", exc)
    return _aim_volume(path, meta, array=array)


def _read_aim_lazily(path: Path) -> ScancoVolume | None:
    """The AIM's header and the place of its voxels; None where only AimIO can read them.

    Taken only when AimIO's header reading and this module's reading of the pre-header agree
    on where the voxels start, and the data section holds exactly the uncompressed int16
    voxels of the header's dimensions, all of them in the file (else AimIO reads the file
    and reports what is wrong).
    """
    sections = _aim_sections(path)
    if sections is None:
        return None
    log_start, data_start, data_bytes = sections
    try:
        # the header only; a copy of it when its text must be made readable
        with _readable_copy(path, [(log_start, data_start)], data_start) as readable, \
                native_stdout_to_log("AimIO"):
            meta = _aimio()._aimio.aim_info(str(readable))
    except Exception:  # AimIO's own full read gives the error message
        return None
    nx, ny, nz = (int(v) for v in meta.get("dimensions", (0, 0, 0)))
    if (int(meta.get("aim_type", 0)) != _AIM_SHORT or int(meta.get("byte_offset", -1)) != data_start
            or min(nx, ny, nz) <= 0 or data_bytes != nx * ny * nz * 2
            or path.stat().st_size < data_start + data_bytes):
        return None
    return _aim_volume(path, meta, voxels=Int16Voxels(path, data_start, (nz, ny, nx)))


def _aim_volume(path: Path, meta: dict[str, Any], *, array: np.ndarray | None = None,
                voxels: Int16Voxels | None = None) -> ScancoVolume:
    """The :class:`ScancoVolume` of an AIM from AimIO's header fields and its voxels."""
    log = meta.get("processing_log") or ""
    if not isinstance(log, str):
        log = ""
    found = {name: _finite_or_none(m.group(1)) if (m := rx.search(log)) else None
             for name, rx in _LOG_CALIBRATION.items()}
    calibration = _calibration(found["mu_scaling"], found["mu_water"],
                               found["density_slope"], found["density_intercept"])
    element_size = [float(v) for v in meta.get("element_size", (0.0, 0.0, 0.0))]
    _check_voxel_size(path, element_size, "element size")
    position = [int(v) for v in meta.get("position", (0, 0, 0))]
    # float32 in the header: round to 0.1 µm so 0.0607 reads back as 0.0607.
    element_size = [round(s, 7) for s in element_size]
    kind = "mask" if array is not None and array.dtype.itemsize == 1 else "grey"
    facts: dict[str, Any] = {"aim_version": int(meta.get("version", 0)),
                             "aim_type": hex(int(meta.get("aim_type", 0))),
                             "processing_log": _log_facts(log)}
    return ScancoVolume(
        array=array,
        spacing_mm=(element_size[2], element_size[1], element_size[0]),
        origin_mm=tuple(p * s for p, s in zip(position, element_size, strict=True)),  # type: ignore[arg-type]
        calibration=calibration,
        kind=kind,
        facts=facts,
        voxels=voxels,
    )


def read_isq(path: str | Path, *, lazy: bool = False) -> ScancoVolume:
    """Read a Scanco ISQ reconstruction (int16 native values).

    The header (dimensions, physical size, mu_scaling and, when present, the calibration block
    with mu_water and the density rescale) comes from aimio-py; the voxels are read with numpy
    from ``(data_offset + 1) * 512`` (see the module notes). ``lazy``: return the voxels'
    place in the file (``voxels``) instead of reading them (``array`` None).

    Raises
    ------
    CorruptFileError
        If the header is not an ISQ header or the file is shorter than its header says.
    """
    path = Path(path)
    header_bytes = _check_isq_header(path)
    pa = _aimio()
    try:
        with _readable_copy(path, [_ISQ_NAME_SPAN], header_bytes) as readable, \
                native_stdout_to_log("AimIO"):
            meta = pa.isq_info(str(readable))
    except Exception as exc:
        _raise_read_error(path, "ISQ", exc)
    nx, ny, nz = (int(v) for v in meta["dimensions_p"])
    if min(nx, ny, nz) <= 0:
        raise CorruptFileError(f"ISQ header of {path} gives dimensions {nx}x{ny}x{nz}; the "
                               "header is damaged.")
    data_start = int(meta.get("data_offset", 512))  # aimio-py gives bytes: (blocks + 1) * 512
    expected = data_start + nx * ny * nz * 2
    size = path.stat().st_size
    if size < expected:
        raise CorruptFileError(
            f"{path} is truncated: its header announces {nx}x{ny}x{nz} int16 voxels "
            f"({expected} bytes with the header) but the file has {size} bytes. Copy the "
            "file again from the scanner.")
    voxels = Int16Voxels(path, data_start, (nz, ny, nx))
    dims_um = [float(v) for v in meta["dimensions_um"]]
    spacing_xyz = [um / n / 1000.0 for um, n in zip(dims_um, (nx, ny, nz), strict=True)]
    _check_voxel_size(path, spacing_xyz, "physical size / voxels (x, y, z)")
    slope = _finite_or_none(meta.get("rescale_slope"))
    mu_scaling = _finite_or_none(meta.get("mu_scaling"))
    # The ISQ rescale slope is per native unit (~0.2) in aimio-py's reading; a value in the
    # hundreds is already per mu (like the AIM log's ~1600). Accept both.
    density_slope = None
    if slope and slope > 0 and mu_scaling:
        density_slope = slope * mu_scaling if slope < 50 else slope
    calibration = _calibration(mu_scaling, _finite_or_none(meta.get("mu_water")), density_slope,
                               _finite_or_none(meta.get("rescale_intercept")))
    facts = {k: meta[k] for k in _ISQ_FACT_KEYS if k in meta and meta[k] not in ("", None)}
    return ScancoVolume(array=None if lazy else voxels.read(0, nz),
                        spacing_mm=(spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]),
                        origin_mm=(0.0, 0.0, 0.0), calibration=calibration, kind="grey",
                        facts=facts, voxels=voxels if lazy else None)


_ISQ_NAME_SPAN = (128, 168)  # the 40-byte patient name: free text, often Latin-1


def _check_isq_header(path: Path) -> int:
    """Check the ISQ header fields aimio-py takes on trust; return the header's byte count.

    Raises
    ------
    CorruptFileError
        No ISQ signature, a header shorter than 512 bytes, a data type other than int16, a
        negative data offset (which would read header bytes as voxels) or one beyond the
        file's end.
    """
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:16] != _ISQ_MAGIC:
        raise CorruptFileError(
            f"{path} does not start with the ISQ signature {_ISQ_MAGIC.decode()}; it is not a "
            "Scanco ISQ file (or its header is damaged). Export it again from the scanner.")
    if len(head) < 512:
        raise CorruptFileError(f"{path} is truncated: its ISQ header is incomplete "
                               f"({len(head)} of 512 bytes). Copy the file again.")
    data_type = struct.unpack_from("<i", head, 16)[0]
    if data_type != _ISQ_INT16:
        raise CorruptFileError(
            f"{path}: the ISQ header gives data type {data_type}; ISQ reconstructions hold "
            f"int16 voxels (type {_ISQ_INT16}). The header is damaged: export the scan again.")
    blocks = struct.unpack_from("<i", head, 508)[0]
    if blocks < 0:
        raise CorruptFileError(
            f"{path}: the ISQ header gives a negative data offset ({blocks} blocks of 512 "
            "bytes), so its voxels cannot be found. The header is damaged: copy or export the "
            "scan again.")
    header_bytes = (blocks + 1) * 512
    size = path.stat().st_size
    if header_bytes > size:
        raise CorruptFileError(
            f"{path} is truncated or damaged: its header says the voxels start at byte "
            f"{header_bytes}, but the file has {size} bytes. Copy the file again.")
    return header_bytes


def _processing_log(calibration: Calibration | None, creator: str) -> str:
    """A minimal IPL-style processing log carrying only the calibration."""
    lines = ["! Processing Log", "!",
             "!" + "-" * 79,
             f"{'Created by':<30}{creator}"]
    if calibration is not None:
        lines += [
            f"{'Mu_Scaling':<30}{round(calibration.mu_scaling):>23d}",
            f"{'HU: mu water':<30}{calibration.mu_water:>23.6f}",
            f"{'Density: unit':<30}mg HA/ccm",
            f"{'Density: slope':<30}{calibration.density_slope:>23.6f}",
            f"{'Density: intercept':<30}{calibration.density_intercept:>23.6f}",
        ]
    return "\n".join(lines) + "\n"


def write_aim(path: str | Path, array: np.ndarray, spacing_mm: tuple[float, float, float],
              origin_mm: tuple[float, float, float], calibration: Calibration | None,
              creator: str = "HRpQCTSegmenter") -> None:
    """Write ``array`` (int16, int8 or float32, ``[z, y, x]``) as an AIM v3 file.

    The header carries element size, the origin as an integer voxel position (rounded), and a
    processing log with only the calibration constants. int8 data are written compressed by
    AimIO (binary or run-length char types). Not atomic: callers write to a temporary name.
    """
    dtype = np.dtype(array.dtype)
    if dtype not in (np.dtype(np.int16), np.dtype(np.int8), np.dtype(np.float32)):
        raise TypeError(f"AIM holds int16, int8 or float32 voxels, not {dtype}")
    pa = _aimio()
    sz, sy, sx = (float(s) for s in spacing_mm)
    position = tuple(round(o / s) for o, s in zip(origin_mm, (sx, sy, sz), strict=True))
    meta = {"element_size": (sx, sy, sz), "position": position,
            "processing_log": _processing_log(calibration, creator)}
    with native_stdout_to_log("AimIO"):
        pa._aimio.write_aim(str(path), np.ascontiguousarray(array), meta)
