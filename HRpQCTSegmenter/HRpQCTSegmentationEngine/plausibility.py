"""Is this a distal tibia/fibula HR-pQCT scan? A cheap check before the network sees it.

The network labels whatever it is given: a metal foam becomes tibial trabecular bone with a
per-slice confidence of 0.97, a binary mask is segmented as if it were HU. Its softmax
confidence does not notice, so the scan itself is checked first, on a few evenly spaced
slices (well under a second for a full 168 x 1600 x 1600 stack):

========================  =====================================================================
rule (code)               refused when (why)
========================  =====================================================================
``too_few_slices``        fewer than 2 slices (a stack is 168; one slice is an image, not a scan)
``voxel_size``            in-plane voxel outside 0.02-0.25 mm or slice spacing outside
                          0.02-0.5 mm (HR-pQCT: 0.061 or 0.082 mm; 0.25 mm is 4x the scanner's,
                          already a coarse resampling; clinical CT is 0.3-1 mm)
``field_of_view``         either in-plane side below 45 mm or above 160 mm (the leg is 60-75 mm
                          across; the scanner's field is at most 140 mm)
``mask_like``             at most 16 distinct grey values in the sample (0/1, 0/127, 0/255
                          masks and label maps; a real scan has thousands)
``no_structure``          less than 20 % of the grey-value variance survives a 1 mm smoothing
                          (pure noise; a leg in air keeps ~80 %)
``almost_empty``          tissue (above -500 HU) in less than 5 % of the field
``no_bone``               bone-like voxels (above 500 HU) under 1 % of the tissue (no bone, or
                          not HU)
``too_much_bone``         bone-like voxels over 45 % of the tissue (a distal leg is mostly soft
                          tissue: ~10 % of its voxels are above 500 HU)
``metal_like``            over 0.5 % of the tissue above 4500 HU (mineralised bone is 2600-2900
                          HU; with 200 HU noise it stays below ~3900)
``air_inside``            over 25 % of the object's interior (3 mm inside its outline) is air
                          (pores of a foam, a hollow object; a leg has none, a leg in the
                          carbon-fibre holder ~10 %: the gap between shell and skin)
========================  =====================================================================

The thresholds are wide on purpose: every phantom the project makes (noise 0-300 HU, motion
grades 1-5, left and right legs, off-centre) passes with a margin, and the refused examples
(metal foam, masks, CT of other body parts, noise, single slices) fail by a factor. They
were set on synthetic data and public figures (``shared/hrpqct-facts.md``), not on a cohort of
real scans: a real scan that is refused can be run with ``accept_unusual=True``
(``--accept-unusual-scan``), and its results then carry an ``unusual_scan`` warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from HRpQCTCore.errors import InvalidScanError
from HRpQCTCore.hu_volume import as_hu_volume

__all__ = [
    "PlausibilityLimits",
    "PlausibilityProblem",
    "PlausibilityReport",
    "UnusualScanError",
    "check_scan_plausibility",
    "require_plausible_scan",
    "OVERRIDE_OPTION",
]

log = logging.getLogger(__name__)

#: The command-line option that accepts a scan this check refuses.
OVERRIDE_OPTION = "--accept-unusual-scan"
AIR_HU = -500.0
BONE_HU = 500.0


class UnusualScanError(InvalidScanError):
    """The scan does not look like a distal tibia/fibula HR-pQCT scan (exit code 4)."""


@dataclass(frozen=True)
class PlausibilityLimits:
    """Limits of :func:`check_scan_plausibility` (see the module's table for the reasons)."""

    min_slices: int = 2
    voxel_mm: tuple[float, float] = (0.02, 0.25)
    slice_mm: tuple[float, float] = (0.02, 0.5)
    field_mm: tuple[float, float] = (45.0, 160.0)
    max_distinct_values: int = 16
    min_structure_fraction: float = 0.2
    min_tissue_fraction: float = 0.05
    bone_fraction_of_tissue: tuple[float, float] = (0.01, 0.45)
    metal_hu: float = 4500.0
    max_metal_fraction: float = 0.005
    max_air_inside_fraction: float = 0.25
    sample_slices: int = 6


@dataclass
class PlausibilityProblem:
    """One reason a scan looks wrong: a stable code, what was seen, what to do."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"code": self.code, "message": self.message}


@dataclass
class PlausibilityReport:
    """What :func:`check_scan_plausibility` measured and found.

    Attributes
    ----------
    measurements:
        Plain numbers (field of view in mm, voxel size, HU fractions, ...), for the QC record.
    problems:
        Empty when the scan looks like a distal tibia/fibula HR-pQCT scan.
    accepted_anyway:
        True when problems were found and the caller accepted the scan regardless.
    """

    measurements: dict[str, Any]
    problems: list[PlausibilityProblem] = field(default_factory=list)
    accepted_anyway: bool = False

    @property
    def plausible(self) -> bool:
        """Whether no rule fired."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for ``segmentation_qc.json``)."""
        return {"plausible": self.plausible, "accepted_anyway": self.accepted_anyway,
                "measurements": self.measurements,
                "problems": [p.to_dict() for p in self.problems]}

    def message(self) -> str:
        """The user's message: what looks wrong and what to do."""
        lines = "; ".join(p.message for p in self.problems)
        return (f"This does not look like a distal tibia/fibula HR-pQCT scan: {lines}. The "
                "segmentation model only knows such scans and would label anything else "
                "confidently and wrongly. Check that the file is the grey-value scan (not a "
                "mask or another series) in HU or with its calibration (--units), and that it "
                f"is the distal tibia. If you are sure it is, run again with {OVERRIDE_OPTION} "
                "(the results then carry an 'unusual_scan' warning and no probability).")


# --- measurements -----------------------------------------------------------------------------

def _sample_slices(n_slices: int, count: int) -> list[int]:
    """Evenly spaced slice indices (the check must stay cheap on a full stack)."""
    return sorted({int(v) for v in np.rint(np.linspace(0, n_slices - 1, min(count, n_slices)))})


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (speed: work at ~0.25 mm pixels)."""
    if factor <= 1:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if h == 0 or w == 0:
        return image
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _structure_and_air_inside(image: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """Share of the variance kept by a 1 mm smoothing, and the air inside the object.

    ``image`` is one slice in HU at ``pixel_mm`` pixels. The object is where a 2 mm smoothing
    is above -800 HU (a foam's pores and struts together), taken 3 mm inside its outline so
    the blurred rim of air around a leg does not count; "air" there is a 0.25 mm smoothing
    below -500 HU (fat with 200 HU noise is not air).
    """
    from scipy import ndimage

    raw_var = float(image.var())
    fine = ndimage.gaussian_filter(image, 0.25 / pixel_mm, mode="nearest")
    coarse = ndimage.gaussian_filter(image, 1.0 / pixel_mm, mode="nearest")
    structure = float(coarse.var()) / raw_var if raw_var > 0 else 0.0
    blob = ndimage.gaussian_filter(image, 2.0 / pixel_mm, mode="nearest") > -800.0
    interior = ndimage.distance_transform_edt(blob, sampling=pixel_mm) > 3.0
    inside = float((fine[interior] < AIR_HU).mean()) if interior.any() else 0.0
    return structure, inside


def _measure(volume: np.ndarray, spacing_mm: tuple[float, float, float],
             limits: PlausibilityLimits) -> dict[str, Any]:
    """The numbers the rules judge, from a few slices."""
    nz, ny, nx = volume.shape
    dz, dy, dx = (float(s) for s in spacing_mm)
    picks = _sample_slices(nz, limits.sample_slices)
    sample = np.asarray(volume[picks], dtype=np.float32)
    strided = sample[:, ::3, ::3]  # a stride keeps np.unique and the percentiles cheap
    distinct = np.unique(strided).size
    tissue = sample > AIR_HU
    n_tissue = int(tissue.sum())
    bone = int((sample > BONE_HU).sum())
    metal = int((sample > limits.metal_hu).sum())
    pixel_mm = min(dy, dx)
    factor = max(1, round(0.24 / pixel_mm)) if pixel_mm > 0 else 1
    structures, insides = [], []
    for plane in sample:
        coarse = _block_mean(plane, factor)
        s, a = _structure_and_air_inside(coarse, pixel_mm * factor)
        structures.append(s)
        insides.append(a)
    return {
        "n_slices": nz, "voxel_mm": [dz, dy, dx],
        "field_of_view_mm": [round(ny * dy, 2), round(nx * dx, 2)],
        "slices_sampled": picks, "distinct_values": int(distinct),
        "air_fraction": round(1.0 - n_tissue / sample.size, 4),
        "soft_tissue_fraction": round((n_tissue - bone) / sample.size, 4),
        "bone_fraction": round(bone / sample.size, 4),
        "bone_fraction_of_tissue": round(bone / n_tissue, 4) if n_tissue else 0.0,
        "metal_fraction_of_tissue": round(metal / n_tissue, 5) if n_tissue else 0.0,
        "structure_fraction": round(float(np.median(structures)), 4),
        "air_inside_fraction": round(float(np.median(insides)), 4),
        "hu_percentiles": {str(q): round(float(v), 1) for q, v in
                           zip((1, 50, 99), np.percentile(strided, (1, 50, 99)), strict=True)},
    }


# --- rules ------------------------------------------------------------------------------------

def _geometry_problems(m: dict[str, Any], lim: PlausibilityLimits) -> list[PlausibilityProblem]:
    out = []
    if m["n_slices"] < lim.min_slices:
        out.append(PlausibilityProblem(
            "too_few_slices", f"it has {m['n_slices']} slice(s) (an HR-pQCT stack has 168; at "
            f"least {lim.min_slices} are needed)"))
    dz, dy, dx = m["voxel_mm"]
    lo, hi = lim.voxel_mm
    zlo, zhi = lim.slice_mm
    if not (lo <= dy <= hi and lo <= dx <= hi) or not zlo <= dz <= zhi:
        out.append(PlausibilityProblem(
            "voxel_size", f"its voxels are {dx:.3g} x {dy:.3g} x {dz:.3g} mm (HR-pQCT: 0.061 or "
            f"0.082 mm; accepted {lo}-{hi} mm in-plane, {zlo}-{zhi} mm between slices)"))
    fov_small, fov_large = min(m["field_of_view_mm"]), max(m["field_of_view_mm"])
    if fov_small < lim.field_mm[0] or fov_large > lim.field_mm[1]:
        fy, fx = m["field_of_view_mm"]
        out.append(PlausibilityProblem(
            "field_of_view", f"its field of view is {fx:.0f} x {fy:.0f} mm (a distal leg is "
            f"60-75 mm across, the scanner's field at most 140 mm; accepted "
            f"{lim.field_mm[0]:.0f}-{lim.field_mm[1]:.0f} mm)"))
    return out


def _value_problems(m: dict[str, Any], lim: PlausibilityLimits) -> list[PlausibilityProblem]:
    if m["distinct_values"] <= lim.max_distinct_values:
        return [PlausibilityProblem(
            "mask_like", f"it holds only {m['distinct_values']} distinct grey values: it looks "
            "like a mask or label map, not a grey-value scan")]
    out = []
    if m["structure_fraction"] < lim.min_structure_fraction:
        out.append(PlausibilityProblem(
            "no_structure", f"it looks like noise: only {m['structure_fraction']:.0%} of its "
            "grey-value variance survives a 1 mm smoothing (a leg in air keeps ~80 %)"))
    tissue = 1.0 - m["air_fraction"]
    if tissue < lim.min_tissue_fraction:
        out.append(PlausibilityProblem(
            "almost_empty", f"only {tissue:.1%} of the field is above {AIR_HU:.0f} HU (nearly "
            "all air; is it in HU?)"))
        return out
    bone = m["bone_fraction_of_tissue"]
    b_lo, b_hi = lim.bone_fraction_of_tissue
    if bone < b_lo:
        out.append(PlausibilityProblem(
            "no_bone", f"only {bone:.1%} of its tissue is above {BONE_HU:.0f} HU (no bone, or "
            "not in HU)"))
    elif bone > b_hi:
        out.append(PlausibilityProblem(
            "too_much_bone", f"{bone:.0%} of its tissue is above {BONE_HU:.0f} HU (a distal leg "
            f"is mostly soft tissue, ~10 % above {BONE_HU:.0f} HU; accepted up to {b_hi:.0%})"))
    if m["metal_fraction_of_tissue"] > lim.max_metal_fraction:
        out.append(PlausibilityProblem(
            "metal_like", f"{m['metal_fraction_of_tissue']:.1%} of its tissue is above "
            f"{lim.metal_hu:.0f} HU, denser than any bone (metal?)"))
    if m["air_inside_fraction"] > lim.max_air_inside_fraction:
        out.append(PlausibilityProblem(
            "air_inside", f"{m['air_inside_fraction']:.0%} of the object's interior is air "
            "(a foam or hollow object; a leg has no air inside)"))
    return out


def check_scan_plausibility(hu_volume: Any, spacing_mm: tuple[float, float, float],
                            limits: PlausibilityLimits | None = None) -> PlausibilityReport:
    """Measure a scan and list what makes it unlike a distal tibia/fibula HR-pQCT scan.

    Parameters
    ----------
    hu_volume:
        ``[z, y, x]`` array in HU (or a :class:`~HRpQCTCore.scan.Scan`).
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    limits:
        The rules' limits (default :class:`PlausibilityLimits`).

    Returns
    -------
    PlausibilityReport
        ``report.plausible`` is False when any rule fired; never raises for a 3D array.
    """
    lim = limits or PlausibilityLimits()
    volume = as_hu_volume(getattr(hu_volume, "hu", hu_volume))  # only a few slices are read
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    m = _measure(volume, spacing_mm, lim)
    problems = _geometry_problems(m, lim)
    if math.isfinite(m["structure_fraction"]):
        problems += _value_problems(m, lim)
    return PlausibilityReport(measurements=m, problems=problems)


def require_plausible_scan(hu_volume: Any, spacing_mm: tuple[float, float, float], *,
                           accept_unusual: bool = False,
                           limits: PlausibilityLimits | None = None) -> PlausibilityReport:
    """:func:`check_scan_plausibility`, refusing an implausible scan unless told to accept it.

    Parameters
    ----------
    accept_unusual:
        Accept a scan the rules refuse (``--accept-unusual-scan``): a warning is logged and
        ``report.accepted_anyway`` is set, so the QC can flag the results.

    Raises
    ------
    UnusualScanError
        (exit code 4) naming what looks wrong and what to do.
    """
    report = check_scan_plausibility(hu_volume, spacing_mm, limits)
    if report.plausible:
        return report
    if not accept_unusual:
        raise UnusualScanError(report.message())
    report.accepted_anyway = True
    log.warning("Unusual scan accepted on request (%s): %s",
                ", ".join(p.code for p in report.problems),
                "; ".join(p.message for p in report.problems))
    return report
