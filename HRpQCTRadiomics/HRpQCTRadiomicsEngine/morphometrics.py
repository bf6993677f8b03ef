"""Standard HR-pQCT morphometrics of a segmented slice: areas, densities, cortical thickness.

The non-radiomics reference of the paper's patient-level comparison: what a scanner's
standard evaluation reports, measured here from the 7-region map and the HU image of each
slice (2D, so they are available for every slice the radiomics are).

Per bone (``tibia``, ``fibula``), with ``Ct`` the cortical and ``Tb`` the trabecular region
and ``Tt`` their union:

* ``Tt.Ar``, ``Ct.Ar``, ``Tb.Ar`` -- areas in mm2 (pixel count x pixel area);
* ``Tt.vBMD``, ``Ct.vBMD``, ``Tb.vBMD`` -- mean density in mg HA/cm3, from the mean HU
  through the scan's calibration (the density map is affine in HU, so the mean commutes);
* ``Ct.Pm`` -- periosteal perimeter in mm (of ``Tt``; scikit-image's 4-connected perimeter
  estimate, which treats pixels as squares of the row spacing: HR-pQCT pixels are square);
* ``Ct.Th`` -- cortical thickness in mm by the annulus formula
  ``Ct.Ar / ((Ct.Pm + Ec.Pm) / 2)``, ``Ec.Pm`` the endosteal (``Tb``) perimeter: exact for a
  circular ring, the usual "direct" estimate of scanner software differs by a few percent.

These are simplified: no Tb.N/Tb.Th/Tb.Sp (they need the trabecular microstructure
segmentation, which this pipeline does not make) and no cortical porosity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from HRpQCTCore.regions import region_by_name
from HRpQCTCore.scan import DEFAULT_CALIBRATION, Calibration

__all__ = ["MORPHOMETRIC_NAMES", "slice_morphometrics", "scan_morphometrics"]

#: bone name in the output -> prefix of its region keys
_BONES = {"tibia": "tibial", "fibula": "fibular"}
_MEASURES = ("Tt.Ar", "Ct.Ar", "Tb.Ar", "Tt.vBMD", "Ct.vBMD", "Tb.vBMD", "Ct.Pm", "Ct.Th")
#: Names of the measures, ``<bone>:<measure>``, in output order.
MORPHOMETRIC_NAMES: tuple[str, ...] = tuple(f"{b}:{m}" for b in _BONES for m in _MEASURES)


def _perimeter_mm(mask: np.ndarray, pixel_mm: float) -> float:
    from skimage.measure import perimeter

    return float(perimeter(mask, neighborhood=4)) * pixel_mm if mask.any() else 0.0


def slice_morphometrics(hu2d: np.ndarray, regions2d: np.ndarray,
                        pixel_spacing_mm: tuple[float, float],
                        calibration: Calibration | None = None) -> dict[str, float]:
    """Morphometrics of one slice; NaN for a bone absent from the slice.

    Parameters
    ----------
    hu2d:
        The slice in HU, ``[y, x]``.
    regions2d:
        The 7-region label map of the slice (values of :data:`~HRpQCTCore.regions.REGIONS`).
    pixel_spacing_mm:
        ``(row, column)`` spacing in mm.
    calibration:
        HU -> mg HA/cm3 conversion (default: the XtremeCT II defaults).

    Returns
    -------
    dict
        ``{"<bone>:<measure>": value}`` for every name in :data:`MORPHOMETRIC_NAMES`.
    """
    if hu2d.shape != regions2d.shape or hu2d.ndim != 2:
        raise ValueError(f"Need one 2D slice and its label map; got {hu2d.shape} and "
                         f"{regions2d.shape}")
    calibration = calibration or DEFAULT_CALIBRATION
    pixel_mm2 = float(pixel_spacing_mm[0] * pixel_spacing_mm[1])
    out: dict[str, float] = {}
    for bone, prefix in _BONES.items():
        ct = regions2d == region_by_name(f"{prefix}_cortical").label
        tb = regions2d == region_by_name(f"{prefix}_trabecular").label
        tt = ct | tb
        values = dict.fromkeys(_MEASURES, float("nan"))
        if tt.any():
            for name, mask in (("Tt", tt), ("Ct", ct), ("Tb", tb)):
                n = int(mask.sum())
                values[f"{name}.Ar"] = n * pixel_mm2
                if n:
                    mean_hu = float(hu2d[mask].mean(dtype=np.float64))
                    values[f"{name}.vBMD"] = float(calibration.hu_to_density(
                        np.array([mean_hu], dtype=np.float64))[0])
            periosteal = _perimeter_mm(tt, float(pixel_spacing_mm[0]))
            endosteal = _perimeter_mm(tb, float(pixel_spacing_mm[0]))
            values["Ct.Pm"] = periosteal
            mean_perimeter = (periosteal + endosteal) / 2.0
            if ct.any() and mean_perimeter > 0:
                values["Ct.Th"] = values["Ct.Ar"] / mean_perimeter
        out.update({f"{bone}:{m}": v for m, v in values.items()})
    return out


def scan_morphometrics(hu: np.ndarray, regions: np.ndarray, spacing_mm: Sequence[float],
                       slices: Sequence[int] | None = None,
                       calibration: Calibration | None = None) -> list[dict[str, float]]:
    """:func:`slice_morphometrics` of each requested slice (default all), in order.

    ``spacing_mm`` is ``(z, y, x)``; each result also holds its ``slice`` index.
    """
    if hu.shape != regions.shape or hu.ndim != 3:
        raise ValueError(f"Need a 3D scan and its label map on the same grid; got {hu.shape} "
                         f"and {regions.shape}")
    indices = range(hu.shape[0]) if slices is None else slices
    rows = []
    for z in indices:
        row = {"slice": float(z)}
        row.update(slice_morphometrics(np.asarray(hu[z]), np.asarray(regions[z]),
                                       (float(spacing_mm[1]), float(spacing_mm[2])),
                                       calibration))
        rows.append(row)
    return rows
