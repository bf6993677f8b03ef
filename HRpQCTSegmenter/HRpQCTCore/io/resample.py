"""Resample a scan to a given voxel size (e.g. the 0.0607 mm the model expects)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from HRpQCTCore.memory import require_memory
from HRpQCTCore.scan import Scan

__all__ = ["resample_to_spacing", "AIR_HU"]

#: Value given to voxels that fall outside the input (air).
AIR_HU = -1000.0


def resample_to_spacing(scan: Scan, spacing_mm: float | Sequence[float]) -> Scan:
    """Return ``scan`` resampled to ``spacing_mm`` with linear interpolation (SimpleITK).

    Parameters
    ----------
    scan:
        The scan (HU).
    spacing_mm:
        New voxel size: one number (isotropic) or ``(z, y, x)`` in mm.

    Returns
    -------
    Scan
        float32 HU on a grid covering the same physical extent: same origin and direction,
        ``round(size * old / new)`` voxels per axis. Voxels beyond the input get -1000 HU (air).
        ``metadata["resampled_from_spacing_mm"]`` records the original spacing.

    Raises
    ------
    ValueError
        If ``spacing_mm`` is not positive.
    HRpQCTError
        If the resampled scan cannot fit in the memory available (estimated first).
    """
    import SimpleITK as sitk

    if isinstance(spacing_mm, (int, float)):
        new_zyx = (float(spacing_mm),) * 3
    else:
        new_zyx = tuple(float(s) for s in spacing_mm)
    if len(new_zyx) != 3 or any(not (s > 0 and math.isfinite(s)) for s in new_zyx):
        raise ValueError(f"spacing_mm must be positive (one value or three), got {spacing_mm!r}")
    size_zyx = tuple(max(1, round(n * old / new))
                     for n, old, new in zip(scan.shape, scan.spacing_mm, new_zyx, strict=True))
    _require_resample_memory(scan, size_zyx, new_zyx)
    image = scan.to_sitk(np.asarray(scan.hu, dtype=np.float32))
    resampled = sitk.Resample(
        image, [int(s) for s in reversed(size_zyx)], sitk.Transform(), sitk.sitkLinear,
        scan.origin_mm, tuple(reversed(new_zyx)), scan.direction, AIR_HU, sitk.sitkFloat32)
    metadata = dict(scan.metadata)
    metadata["resampled_from_spacing_mm"] = list(scan.spacing_mm)
    metadata["warnings"] = [w for w in metadata.get("warnings", [])
                            if not w.startswith("Voxel spacing")]
    return Scan(hu=sitk.GetArrayFromImage(resampled), spacing_mm=new_zyx,
                origin_mm=scan.origin_mm, direction=scan.direction,
                calibration=scan.calibration, metadata=metadata)


def _require_resample_memory(scan: Scan, size_zyx: tuple[int, ...],
                             new_zyx: tuple[float, ...]) -> None:
    """Refuse a resampling whose arrays cannot fit, before SimpleITK allocates them.

    SimpleITK holds the input as a float32 image and the output twice (its image, then the
    numpy copy): ``4 * n_in + 8 * n_out`` bytes.
    """
    n_out = math.prod(size_zyx)
    needed = 4 * math.prod(scan.shape) + 8 * n_out
    shown = " x ".join(str(n) for n in size_zyx)
    require_memory(
        needed, f"resampling to {' x '.join(f'{s:g}' for s in new_zyx)} mm ({shown} voxels, "
        f"{n_out:.3g} in all)",
        "Choose a coarser voxel size (HR-pQCT: 0.0607 mm), or check the scan's own voxel "
        f"size ({' x '.join(f'{s:g}' for s in scan.spacing_mm)} mm).")
