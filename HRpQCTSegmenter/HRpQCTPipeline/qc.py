"""Quality control of one segmented scan: region sizes, confidence, motion-like artefacts.

Everything here is cheap (numpy/scipy on the label map and a few slices of the scan) and
produces plain numbers and :class:`QCWarning` messages that a reader must see in the report.
The thresholds (:class:`QCThresholds`) are deliberately coarse: they flag scans to look at,
they do not grade them. Region-size floors are a quarter or less of the typical distal-tibia
values (tibial total area ~750 mm2, cortical ~140 mm2, fibula 90-150 mm2). The motion index
was tuned on this project's synthetic phantoms only (streaks of a simulated patient movement);
on real scans treat it as a hint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from HRpQCTCore.regions import REGIONS

__all__ = [
    "QCThresholds",
    "QCWarning",
    "RegionStats",
    "region_stats",
    "labelled_box",
    "motion_index",
    "confidence_summary",
    "quality_warnings",
    "SCAN_WIDE_CODES",
    "classification_blockers",
    "uncertainty_summary",
    "plausibility_warning",
    "withheld_reason",
]

#: Warnings that make every region suspect: without a tibia (or fibula) the scan may not be a
#: distal leg at the model's voxel size, and the soft-tissue regions are built around the
#: bones; a low network confidence means the model was unsure of the whole segmentation; an
#: unusual scan (accepted with --accept-unusual-scan) is one the model does not know.
SCAN_WIDE_CODES = ("tibia_missing", "fibula_missing", "low_confidence", "unusual_scan")


@dataclass(frozen=True)
class QCThresholds:
    """Limits below (or above) which the report shows a warning.

    Attributes
    ----------
    min_mean_area_mm2:
        Region key -> smallest plausible mean cross-section (mm2) over the slices where the
        scan has tissue.
    max_missing_slice_fraction:
        A region absent from more than this fraction of the leg's slices is reported.
    min_mean_confidence:
        Mean (over slices) of the network's foreground confidence below this is "low".
    min_slice_confidence:
        Slices whose foreground confidence is below this are listed.
    max_streak_hu:
        Motion index (structured signal in the air around the leg, HU) above this is reported
        as motion-like artefacts.
    max_slice_uncertainty:
        Uncertainty signal -> per-slice value above which a slice is "uncertain" (see
        :mod:`HRpQCTSegmentationEngine.uncertainty`; set on phantoms with induced failures,
        ``benchmarks/RESULTS.md``, section *Uncertainty*).
    max_uncertain_slice_fraction:
        With more than this share of the leg's slices uncertain, the warning concerns the bone
        regions (so a probability from them is withheld); below it, it only lists the slices.
    min_slice_area_fraction:
        Bone -> a leg slice whose cross-section of that bone (cortical + trabecular) is below
        this fraction of the bone's median over the leg's slices is listed
        (``bone_slice_small``): a slice that lost half the tibia barely moves the mean area
        or the scan's confidence. Over ``max_missing_slice_fraction`` of the slices, the
        warning concerns the bone's regions.
    """

    min_mean_area_mm2: dict[str, float] = field(default_factory=lambda: {
        "tibial_cortical": 35.0, "tibial_trabecular": 150.0, "fibular_cortical": 15.0,
        "fibular_trabecular": 5.0, "skin": 20.0, "myotendinous": 20.0, "adipose": 10.0})
    max_missing_slice_fraction: float = 0.1
    min_mean_confidence: float = 0.8
    min_slice_confidence: float = 0.6
    max_streak_hu: float = 5.0
    max_slice_uncertainty: dict[str, float] = field(default_factory=lambda: {
        "flip_change": 0.2, "margin": 0.04})
    max_uncertain_slice_fraction: float = 0.25
    min_slice_area_fraction: dict[str, float] = field(default_factory=lambda: {
        "tibia": 0.6, "fibula": 0.5})


@dataclass
class QCWarning:
    """One message for the reader, with a stable code for tables and tests.

    Attributes
    ----------
    code, message:
        Stable code and text.
    regions:
        Keys of the regions the warning concerns (empty: none in particular).
    """

    code: str
    message: str
    regions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``regions`` only when the warning names some)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.regions:
            out["regions"] = list(self.regions)
        return out


@dataclass
class RegionStats:
    """Size and intensity of one region over the scan.

    Attributes
    ----------
    key, name:
        Region key and display name (:data:`regions.REGIONS`).
    voxels:
        Voxel count in the whole scan.
    volume_mm3:
        Volume.
    mean_area_mm2:
        Mean cross-section over the slices that contain any tissue (leg slices).
    slices_present:
        Leg slices in which the region has at least one voxel.
    leg_slices:
        Slices with any labelled voxel.
    mean_hu:
        Mean grey value in HU (NaN if the region is empty or no scan was given).
    area_mm2_per_slice:
        Cross-section per slice (all slices).
    """

    key: str
    name: str
    voxels: int
    volume_mm3: float
    mean_area_mm2: float
    slices_present: int
    leg_slices: int
    mean_hu: float
    area_mm2_per_slice: list[float]

    def to_dict(self, per_slice: bool = True) -> dict[str, Any]:
        """JSON form (``per_slice=False`` drops the per-slice areas)."""
        out = asdict(self)
        if not per_slice:
            out.pop("area_mm2_per_slice")
        out["mean_hu"] = None if math.isnan(self.mean_hu) else self.mean_hu
        return out


def region_stats(regions: np.ndarray, spacing_mm: tuple[float, float, float],
                 hu: np.ndarray | None = None) -> list[RegionStats]:
    """Volume, mean area and mean HU of each of the seven regions.

    Parameters
    ----------
    regions:
        7-region label map ``[z, y, x]``.
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    hu:
        The scan in HU (optional; for the mean HU per region).
    """
    regions = np.asarray(regions)
    pixel_mm2 = float(spacing_mm[1] * spacing_mm[2])
    voxel_mm3 = pixel_mm2 * float(spacing_mm[0])
    n_slices = regions.shape[0]
    counts = np.zeros((n_slices, len(REGIONS) + 1), dtype=np.int64)
    sums = np.zeros(len(REGIONS) + 1, dtype=np.float64)
    # Outside the labelled voxels' box all is background (not counted): the box alone is read,
    # in the same order, so every count and sum is the whole slice's, bit for bit.
    rows, cols = labelled_box(regions)
    for z in range(n_slices):
        plane = regions[z, rows, cols].ravel()
        counts[z] = np.bincount(plane, minlength=len(REGIONS) + 1)[: len(REGIONS) + 1]
        if hu is not None:
            sums += np.bincount(plane, weights=np.asarray(hu[z, rows, cols],
                                                          dtype=np.float64).ravel(),
                                minlength=len(REGIONS) + 1)[: len(REGIONS) + 1]
    leg = counts[:, 1:].sum(axis=1) > 0
    n_leg = int(leg.sum())
    out = []
    for d in REGIONS:
        per_slice = counts[:, d.label]
        total = int(per_slice.sum())
        out.append(RegionStats(
            key=d.key, name=d.name, voxels=total, volume_mm3=total * voxel_mm3,
            mean_area_mm2=float(per_slice[leg].mean() * pixel_mm2) if n_leg else 0.0,
            slices_present=int((per_slice[leg] > 0).sum()), leg_slices=n_leg,
            mean_hu=float(sums[d.label] / total) if (hu is not None and total) else math.nan,
            area_mm2_per_slice=[float(c * pixel_mm2) for c in per_slice]))
    return out


def labelled_box(regions: np.ndarray, margin_px: int = 0) -> tuple[slice, slice]:
    """Rows and columns holding every labelled voxel of a ``[z, y, x]`` label map.

    Widened by ``margin_px`` on each side (within the slice); the whole slice when nothing is
    labelled. Read slice by slice: no whole-volume temporary.
    """
    any_yx = np.zeros(regions.shape[1:], dtype=bool)
    for plane in regions:
        any_yx |= plane > 0
    if not any_yx.any():
        return slice(None), slice(None)
    ys, xs = np.nonzero(any_yx)
    return (slice(max(0, int(ys.min()) - margin_px), int(ys.max()) + 1 + margin_px),
            slice(max(0, int(xs.min()) - margin_px), int(xs.max()) + 1 + margin_px))


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h = (image.shape[0] // factor) * factor
    w = (image.shape[1] // factor) * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def motion_index(hu: np.ndarray, regions: np.ndarray, spacing_mm: tuple[float, float, float],
                 max_slices: int = 12, smoothing_mm: float = 1.0, air_margin_mm: float = 3.0,
                 min_air_pixels: int = 500) -> dict[str, Any]:
    """Structured signal in the air around the leg, a sign of motion streaks (HU).

    Patient movement during the scan leaves streaks and a ghost of the cortex; in the air
    around the leg (more than ``air_margin_mm`` from any labelled tissue) those survive a
    Gaussian smoothing of ``smoothing_mm`` that removes most of the (white) noise. The index
    of a slice is the standard deviation of the smoothed air with the part expected from white
    noise of the measured SD removed: ~0 for a still scan, several HU with streaks.

    Parameters
    ----------
    max_slices:
        Evenly spaced slices measured (the index is the median over them; ``max`` is reported
        too).

    Returns
    -------
    dict
        ``{"median_hu", "max_hu", "slices": [...], "values_hu": [...]}``; NaN/None where the
        scan has too little air around the leg to measure (a tight crop).
    """
    from scipy import ndimage

    n = hu.shape[0]
    picks = sorted({int(v) for v in np.rint(np.linspace(0, n - 1, min(max_slices, n)))})
    pixel_mm = float(min(spacing_mm[1], spacing_mm[2]))
    factor = max(1, round(0.24 / pixel_mm))  # work at ~0.24 mm pixels
    coarse_mm = pixel_mm * factor
    sigma_px = smoothing_mm / coarse_mm
    values = []
    for z in picks:
        image = _block_mean(np.asarray(hu[z], dtype=np.float32), factor)
        tissue = _block_mean((np.asarray(regions[z]) > 0).astype(np.float32), factor) > 0
        if not tissue.any():
            values.append(math.nan)
            continue
        air = ndimage.distance_transform_edt(~tissue, sampling=coarse_mm) > air_margin_mm
        # keep away from the array border, where smoothing sees padding
        border = math.ceil(3 * sigma_px)
        air[:border], air[-border:], air[:, :border], air[:, -border:] = False, False, False, False
        if air.sum() < min_air_pixels:
            values.append(math.nan)
            continue
        smooth = ndimage.gaussian_filter(image, sigma_px, mode="nearest")
        raw_sd = float(image[air].std())
        white = raw_sd / (2.0 * math.sqrt(math.pi) * sigma_px)  # 2D Gaussian noise reduction
        sd = float(smooth[air].std())
        values.append(math.sqrt(max(0.0, sd * sd - white * white)))
    finite = [v for v in values if not math.isnan(v)]
    return {
        "median_hu": float(np.median(finite)) if finite else math.nan,
        "max_hu": float(np.max(finite)) if finite else math.nan,
        "slices": picks,
        "values_hu": values,
    }


def confidence_summary(slice_confidence, slice_foreground_confidence) -> dict[str, Any]:
    """Mean and lowest per-slice confidence of the segmentation network."""
    fg = np.asarray(slice_foreground_confidence, dtype=np.float64)
    overall = np.asarray(slice_confidence, dtype=np.float64)
    finite = fg[np.isfinite(fg)]
    return {
        "mean_foreground": float(finite.mean()) if finite.size else math.nan,
        "min_foreground": float(finite.min()) if finite.size else math.nan,
        "lowest_slice": int(np.nanargmin(fg)) if finite.size else None,
        "mean_overall": float(np.nanmean(overall)) if np.isfinite(overall).any() else math.nan,
        "per_slice_foreground": [None if not np.isfinite(v) else float(v) for v in fg],
    }


def uncertainty_summary(method: str, per_slice, signal: str,
                        thresholds: QCThresholds | None = None) -> dict[str, Any] | None:
    """The segmentation's per-slice uncertainty and the slices above the warning threshold.

    Parameters
    ----------
    method, signal:
        How it was measured (``flip``: ``flip_change``; ``margin``: ``margin``).
    per_slice:
        One value per slice (None/NaN: no bone in the slice).

    Returns
    -------
    dict or None
        ``{"method", "signal", "threshold", "per_slice", "mean", "max", "uncertain_slices"}``;
        None when nothing was measured.
    """
    if method in (None, "none") or per_slice is None:
        return None
    t = thresholds or QCThresholds()
    values = np.array([np.nan if v is None else float(v) for v in per_slice], dtype=np.float64)
    finite = values[np.isfinite(values)]
    threshold = t.max_slice_uncertainty.get(signal, math.inf)
    return {
        "method": method, "signal": signal, "threshold": threshold,
        "per_slice": [None if not np.isfinite(v) else float(v) for v in values],
        "mean": float(finite.mean()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
        "uncertain_slices": [int(i) for i in np.flatnonzero(np.isfinite(values)
                                                             & (values > threshold))],
    }


def _uncertainty_warning(uncertainty: dict[str, Any], stats: list[RegionStats],
                         t: QCThresholds) -> QCWarning | None:
    slices = uncertainty.get("uncertain_slices") or []
    if not slices:
        return None
    n_leg = max((s.leg_slices for s in stats), default=0) or len(uncertainty["per_slice"])
    many = len(slices) > t.max_uncertain_slice_fraction * n_leg
    shown = ", ".join(str(z) for z in slices[:20]) + (" ..." if len(slices) > 20 else "")
    what = ("the bone regions' features (and a probability from them) are not trustworthy"
            if many else "check these slices; their features may be wrong")
    return QCWarning(
        "uncertain_slices",
        f"The model is uncertain in {len(slices)} slice(s): {shown} ({uncertainty['signal']} "
        f"above {uncertainty['threshold']:g}); {what}. Review the segmentation there.",
        tuple(k for keys in _BONE_REGIONS.values() for k in keys) if many else ())


def _slice_area_warnings(by_key: dict[str, RegionStats], missing_bones: set[str],
                         t: QCThresholds) -> list[QCWarning]:
    """``bone_slice_small``: leg slices where a bone's cross-section collapses."""
    if not by_key:
        return []
    per_region = np.array([s.area_mm2_per_slice for s in by_key.values()], dtype=np.float64)
    if per_region.ndim != 2 or per_region.shape[1] == 0:
        return []
    leg = per_region.sum(axis=0) > 0
    out = []
    for bone, keys in _BONE_REGIONS.items():
        fraction = t.min_slice_area_fraction.get(bone)
        if fraction is None or bone in missing_bones or leg.sum() < 3:
            continue
        area = np.sum([by_key[k].area_mm2_per_slice for k in keys], axis=0)[leg]
        median = float(np.median(area))
        if median <= 0:
            continue
        small = np.flatnonzero(leg)[area < fraction * median]
        if small.size == 0:
            continue
        many = small.size > t.max_missing_slice_fraction * leg.sum()
        shown = ", ".join(str(int(z)) for z in small[:20]) + (" ..." if small.size > 20 else "")
        smallest = float(area.min())
        out.append(QCWarning(
            "bone_slice_small",
            f"The {bone}'s cross-section collapses in {small.size} slice(s): {shown} (down to "
            f"{smallest:.0f} mm2, below {100 * fraction:.0f} % of its median {median:.0f} mm2 "
            f"over the scan). Part of the {bone} was probably missed there; review these "
            "slices" + (f": the {bone}'s features are not trustworthy." if many else
                        "; their features may be wrong."),
            keys if many else ()))
    return out


def plausibility_warning(plausibility: dict[str, Any] | None) -> QCWarning | None:
    """``unusual_scan`` for a scan the plausibility check refused but the user accepted."""
    if not plausibility or not plausibility.get("accepted_anyway"):
        return None
    found = "; ".join(p["message"] for p in plausibility.get("problems", []))
    return QCWarning(
        "unusual_scan",
        f"Unusual scan, accepted with --accept-unusual-scan: {found}. The model was trained on "
        "distal tibia/fibula HR-pQCT scans only; its segmentation here is unverified.")


def quality_warnings(stats: list[RegionStats], *, confidence: dict[str, Any] | None = None,
                     motion: dict[str, Any] | None = None,
                     postprocess_warnings: list[str] | None = None,
                     thresholds: QCThresholds | None = None,
                     uncertainty: dict[str, Any] | None = None,
                     plausibility: dict[str, Any] | None = None) -> list[QCWarning]:
    """The warnings a reader of the report must see, most serious first.

    Codes: ``unusual_scan``, ``fibula_missing``, ``tibia_missing``, ``region_small``,
    ``region_missing_slices``, ``bone_slice_small``, ``low_confidence``,
    ``uncertain_slices``, ``motion``,
    ``postprocess`` (post-processing's own messages).
    """
    t = thresholds or QCThresholds()
    by_key = {s.key: s for s in stats}
    out: list[QCWarning] = [w for w in (plausibility_warning(plausibility),) if w]
    missing_bones = set()
    for bone, keys in _BONE_REGIONS.items():
        if all(by_key[k].voxels == 0 for k in keys):
            missing_bones.add(bone)
            out.append(QCWarning(
                f"{bone}_missing",
                f"The {bone} is missing: no {bone} voxels in the segmentation. It may be outside "
                "the field of view or the scan may not be a distal tibia; its features are "
                "absent.", keys))
    for s in stats:
        bone = "tibia" if s.key.startswith("tibial") else (
            "fibula" if s.key.startswith("fibular") else None)
        if bone in missing_bones or s.leg_slices == 0:
            continue
        floor = t.min_mean_area_mm2.get(s.key)
        if floor is not None and s.mean_area_mm2 < floor:
            out.append(QCWarning(
                "region_small",
                f"{s.name} is unusually small: mean cross-section {s.mean_area_mm2:.1f} mm2 "
                f"(expected at least {floor:.0f} mm2). Check the segmentation.", (s.key,)))
        missing = s.leg_slices - s.slices_present
        if s.voxels and missing > t.max_missing_slice_fraction * s.leg_slices:
            out.append(QCWarning(
                "region_missing_slices",
                f"{s.name} is absent from {missing} of {s.leg_slices} slices.", (s.key,)))
    out += _slice_area_warnings(by_key, missing_bones, t)
    if confidence is not None:
        mean = confidence.get("mean_foreground", math.nan)
        per_slice = [v for v in confidence.get("per_slice_foreground", []) if v is not None]
        low = [i for i, v in enumerate(confidence.get("per_slice_foreground", []))
               if v is not None and v < t.min_slice_confidence]
        if per_slice and (mean < t.min_mean_confidence or low):
            first = f"; lowest in slice {confidence.get('lowest_slice')}" if low else ""
            out.append(QCWarning(
                "low_confidence",
                f"Low model confidence: mean {mean:.2f} (warning below "
                f"{t.min_mean_confidence:.2f}); {len(low)} slice(s) below "
                f"{t.min_slice_confidence:.2f}{first}. Review the segmentation before using "
                "its features."))
    if uncertainty is not None:
        out += [w for w in (_uncertainty_warning(uncertainty, stats, t),) if w]
    if motion is not None:
        index = motion.get("median_hu", math.nan)
        if index is not None and not math.isnan(index) and index > t.max_streak_hu:
            out.append(QCWarning(
                "motion",
                f"Motion-like artefacts: streaks in the air around the leg (index "
                f"{index:.1f} HU, warning above {t.max_streak_hu:.0f} HU). Check the scan's "
                "motion grade; features of moved scans are biased."))
    for message in postprocess_warnings or []:
        if any(f"{bone} was not found" in message for bone in missing_bones):
            continue  # already said above
        out.append(QCWarning("postprocess", message, _regions_named(message)))
    return out


_BONE_REGIONS = {"tibia": ("tibial_cortical", "tibial_trabecular"),
                 "fibula": ("fibular_cortical", "fibular_trabecular")}


def _regions_named(message: str) -> tuple[str, ...]:
    """The bone regions a post-processing message is about (it names the bone)."""
    return tuple(k for bone, keys in _BONE_REGIONS.items() if bone in message.lower()
                 for k in keys)


def _as_warning(warning: QCWarning | dict[str, Any]) -> QCWarning:
    if isinstance(warning, QCWarning):
        return warning
    return QCWarning(str(warning.get("code", "")), str(warning.get("message", "")),
                     tuple(warning.get("regions") or ()))


def classification_blockers(warnings, classifier_regions) -> list[QCWarning]:
    """The warnings that make a probability from ``classifier_regions`` untrustworthy.

    A probability is only as good as the regions its features come from: it is withheld when
    a warning concerns the whole scan (:data:`SCAN_WIDE_CODES`) or one of the regions the
    classifier uses. Motion warnings are shown but do not withhold it (the features are
    biased, not meaningless).

    Parameters
    ----------
    warnings:
        :class:`QCWarning` objects or their dicts (as in ``qc.json``).
    classifier_regions:
        Region names or keys the classifier's features come from.
    """
    from HRpQCTCore.regions import region_by_name

    used = {region_by_name(r).key for r in classifier_regions}
    found = []
    for warning in map(_as_warning, warnings):
        if warning.code in SCAN_WIDE_CODES or used & set(warning.regions):
            found.append(warning)
    return found


def withheld_reason(blockers: list[QCWarning]) -> str:
    """One sentence saying why a probability is withheld (for reports and tables)."""
    codes = ", ".join(dict.fromkeys(w.code for w in blockers))
    return (f"withheld: quality control failed for the regions the classifier uses ({codes}); "
            "review or correct the segmentation (e.g. in 3D Slicer) and run again with "
            "--regions")
