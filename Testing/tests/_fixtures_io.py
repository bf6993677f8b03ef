"""Fixtures for the scan I/O tests: small scans and files in every format, made on the fly.

Nothing here is real patient data. ``PLANTED_NAME`` and friends are fake identifiers planted in
headers (AIM processing log, ISQ name field, DICOM patient tags) so the tests can prove they
never reach metadata or outputs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from HRpQCTCore.scan import Calibration, Scan

PLANTED_NAME = "ZZTESTPATIENT^SECRETNAME"
PLANTED_ID = "PID-93817264"
PLANTED_BIRTH = "19210317"
TEST_CALIBRATION = Calibration(mu_scaling=8192.0, mu_water=0.2409,
                               density_slope=1603.51904, density_intercept=-391.209015,
                               source="header")
SPACING_MM = (0.0607, 0.0607, 0.0607)


def make_hu_volume(shape=(8, 64, 64), seed: int = 0) -> np.ndarray:
    """Air around a leg-like disc with a bony ring: int-valued HU in float32."""
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(yy - ny / 2, xx - nx / 2)
    slice_hu = np.full((ny, nx), -1000.0, np.float32)
    slice_hu[r < 0.45 * min(ny, nx)] = 40.0  # soft tissue
    slice_hu[r < 0.25 * min(ny, nx)] = 2400.0  # cortex
    slice_hu[r < 0.18 * min(ny, nx)] = 350.0  # trabecular compartment
    rng = np.random.default_rng(seed)
    volume = np.repeat(slice_hu[None], nz, axis=0)
    volume += rng.normal(0, 100, volume.shape).astype(np.float32)
    return np.rint(volume).astype(np.float32)


@pytest.fixture
def hu_scan() -> Scan:
    """An 8 x 64 x 64 HU scan at 0.0607 mm with a non-trivial origin and direction."""
    theta = np.deg2rad(30)
    c, s = float(np.cos(theta)), float(np.sin(theta))
    return Scan(hu=make_hu_volume(), spacing_mm=SPACING_MM, origin_mm=(-3.5, 12.25, 40.0),
                direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


@pytest.fixture
def aim_scan() -> Scan:
    """An HU scan on the AIM grid: identity direction, origin a whole number of voxels."""
    return Scan(hu=make_hu_volume(seed=1), spacing_mm=SPACING_MM,
                origin_mm=(10 * 0.0607, 20 * 0.0607, 30 * 0.0607),
                calibration=TEST_CALIBRATION)


def aim_log_with_identifiers(calibration: Calibration | None) -> str:
    """A processing log like a scanner export's: identifiers first, then the calibration."""
    lines = [
        "! Processing Log", "!", "!" + "-" * 79,
        f"{'Created by':<30}ISQ_TO_AIM (IPL)",
        f"{'Time':<30}17-MAR-2021 10:11:12.00",
        f"{'Original Creation-Date':<30}17-MAR-2021 10:00:00.00",
        f"{'Patient Name':<30}{PLANTED_NAME}",
        f"{'Index Patient':<30}{'93817264':>23}",
        f"{'Index Measurement':<30}{'11111':>23}",
        f"{'Site':<30}{'4':>23}",
        f"{'Scanner ID':<30}{'3401':>23}",
        f"{'Scanner type':<30}{'10':>23}",
        f"{'Energy [V]':<30}{'68000':>23}",
    ]
    if calibration is not None:
        lines += [
            f"{'Mu_Scaling':<30}{round(calibration.mu_scaling):>23d}",
            f"{'Calibration Data':<30}68 kVp, BH: 1200 mg HA/ccm, Scaling 8192, 0.2 mm",
            f"{'HU: mu water':<30}{calibration.mu_water:>23.5f}",
            f"{'Density: unit':<30}mg HA/ccm",
            f"{'Density: slope':<30}{calibration.density_slope:>23.6f}",
            f"{'Density: intercept':<30}{calibration.density_intercept:>23.6f}",
        ]
    return "\n".join(lines) + "\n"


def write_aim_with_identifiers(path: Path, native: np.ndarray, spacing_mm=SPACING_MM,
                               position=(10, 20, 30),
                               calibration: Calibration | None = TEST_CALIBRATION) -> Path:
    """Write an AIM the way a scanner export looks (name in the log), with aimio-py directly.

    The engine's own writer never writes identifiers, so the test builds such a file itself.
    """
    import py_aimio

    meta = {"element_size": tuple(reversed(spacing_mm)), "position": position,
            "processing_log": aim_log_with_identifiers(calibration)}
    py_aimio._aimio.write_aim(str(path), np.ascontiguousarray(native), meta)
    return path


def write_minimal_isq(path: Path, native: np.ndarray, spacing_um: float = 60.7,
                      mu_scaling: int = 8192, calibration: Calibration | None = None,
                      name: str = PLANTED_NAME) -> Path:
    """Build an ISQ by hand from the documented 512-byte header layout.

    Neither SimpleITK nor aimio-py writes ISQ, so the header is packed here: ``CTDATA-HEADER_V1``,
    data type 3 (int16), ``nr_of_bytes``/``nr_of_blocks`` of the whole file (the convention
    aimio-py reads), dimensions in voxels and µm, ``mu_scaling`` at byte 88, the 40-byte patient
    name at 128 and ``data_offset`` (extra 512-byte header blocks) at 508. With
    ``calibration``, one extra block holds a calibration record laid out where aimio-py looks
    for it (title ``Calibration`` 8 bytes into the record; ``mu_water`` and the density
    rescale as Scanco VAX doubles at record offsets 1176/1184/1200). Voxels follow the header.
    """
    nz, ny, nx = native.shape
    extra_blocks = 3 if calibration is not None else 0
    header_bytes = 512 * (1 + extra_blocks)
    total = header_bytes + native.size * 2
    head = bytearray(header_bytes)
    head[0:16] = b"CTDATA-HEADER_V1"

    def put_int(offset: int, value: int) -> None:
        struct.pack_into("<i", head, offset, int(value))

    put_int(16, 3)
    put_int(20, total)
    put_int(24, (total + 511) // 512)
    put_int(28, 93817264)  # patient index: an identifier, must not be copied
    for i, (n, off) in enumerate(((nx, 44), (ny, 48), (nz, 52))):
        put_int(off, n)
        put_int(56 + 4 * i, round(n * spacing_um))
    put_int(88, mu_scaling)
    put_int(116, 4)  # site
    head[128:168] = name.encode("ascii")[:40].ljust(40)
    put_int(508, extra_blocks)
    if calibration is not None:
        record = 512 + 8  # where the record starts; the title is 8 bytes in
        head[record + 8:record + 8 + 11] = b"Calibration"
        head[record + 1160:record + 1176] = b"mg HA/ccm".ljust(16)
        for off, value in ((1176, calibration.density_slope / calibration.mu_scaling),
                           (1184, calibration.density_intercept),
                           (1200, calibration.mu_water)):
            head[record + off:record + off + 8] = encode_scanco_double(value)
    path.write_bytes(bytes(head) + np.ascontiguousarray(native, dtype="<i2").tobytes())
    return path


def encode_scanco_double(value: float) -> bytes:
    """Encode a float as the VAX-style double Scanco headers use (inverse of the decoder)."""
    bits = struct.unpack("<Q", struct.pack("<d", value * 4.0))[0]
    high, low = bits >> 32, bits & 0xFFFFFFFF

    def word(w: int) -> bytes:
        return bytes(((w >> 16) & 0xFF, (w >> 24) & 0xFF, w & 0xFF, (w >> 8) & 0xFF))

    return word(high) + word(low)


def write_dicom_series(folder: Path, hu: np.ndarray, spacing_mm=SPACING_MM,
                       origin_mm=(1.5, -2.0, 30.0), modality: str = "CT") -> Path:
    """Write an int16 DICOM series (one file per slice) with planted patient identifiers."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    volume.SetSpacing(tuple(reversed(spacing_mm)))
    volume.SetOrigin(origin_mm)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(volume.GetDepth()):
        sl = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality, "0008|0070": "TESTVENDOR", "0018|0060": "68",
            "0010|0010": PLANTED_NAME, "0010|0020": PLANTED_ID, "0010|0030": PLANTED_BIRTH,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4242", "0020|000e": series_uid,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
            "0018|0050": f"{spacing_mm[0]:.4f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder
