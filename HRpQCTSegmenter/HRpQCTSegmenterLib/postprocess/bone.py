"""Morphological clean-up of the network's five-class prediction.

Rules (the paper's, with 3D connectivity offered and the enclosure made explicit):

1. the leg is the largest connected component of all non-background voxels; anything outside
   it is background, and background holes inside it (per slice) become soft tissue;
2. each bone class keeps only its largest connected component; removed voxels become soft
   tissue;
3. per slice and per bone, a cortical ring with a gap (detected by trabecular voxels touching
   non-bone, or by the filled cortex covering much less than the bone's convex hull) is closed
   by morphological closing with a disk growing up to ``max_cortical_gap_mm``;
4. the trabecular compartment is everything the (closed) cortical ring encloses; trabecular
   voxels outside the ring become soft tissue. Where the ring cannot be closed, the network's
   trabecular voxels are kept (plus anything the bone encloses) and the slice is reported;
5. a bone whose mean cross-section is below ``min_bone_area_mm2`` is reported missing (a
   fibula outside the field of view is common) and removed, with a warning, not an error.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..regions import class_by_name
from .config import PostprocessConfig

log = logging.getLogger(__name__)

__all__ = ["BONES", "Bone", "largest_component", "clean_classes", "disk", "fill_holes"]

SOFT = class_by_name("soft_tissue").label


@dataclass(frozen=True)
class Bone:
    """A bone as a pair of network classes."""

    name: str
    cortical: int
    trabecular: int


BONES = (
    Bone("tibia", class_by_name("tibial_cortical").label,
         class_by_name("tibial_trabecular").label),
    Bone("fibula", class_by_name("fibular_cortical").label,
         class_by_name("fibular_trabecular").label),
)

_STRUCT_2D = np.ones((3, 3), dtype=bool)
_STRUCT_3D = np.ones((3, 3, 3), dtype=bool)
_CROSS_2D = ndi.generate_binary_structure(2, 1)


def disk(radius_mm: float, spacing_yx_mm: tuple[float, float]) -> np.ndarray:
    """Elliptical structuring element of physical radius ``radius_mm`` on a (y, x) grid."""
    ry = max(1, round(radius_mm / spacing_yx_mm[0]))
    rx = max(1, round(radius_mm / spacing_yx_mm[1]))
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    return (y / ry) ** 2 + (x / rx) ** 2 <= 1.0 + 1e-9


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` (with ``margin`` voxels in-plane), or None if empty."""
    if not mask.any():
        return None
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        pad = margin if axis >= mask.ndim - 2 else 0
        slices.append(slice(max(0, hit[0] - pad), min(mask.shape[axis], hit[-1] + 1 + pad)))
    return tuple(slices)


def largest_component(mask: np.ndarray, connectivity: str = "3d") -> np.ndarray:
    """Keep the largest connected component of a 3D mask.

    ``"3d"`` uses the 26-neighbourhood over the whole volume; ``"2d"`` the 8-neighbourhood
    in each slice separately (the largest component of every slice is kept).
    """
    out = np.zeros_like(mask, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return out
    sub = mask[box]
    if connectivity == "3d":
        labels, n = ndi.label(sub, structure=_STRUCT_3D)
        if n:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out[box] = labels == int(sizes.argmax())
        return out
    kept = out[box]
    for z in range(sub.shape[0]):
        if not sub[z].any():
            continue
        labels, n = ndi.label(sub[z], structure=_STRUCT_2D)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        kept[z] = labels == int(sizes.argmax())
    return out


# 4-connected in-plane, no connection between slices: labelling a volume with it treats each
# slice on its own.
_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes of a 2D mask, or of every slice of a 3D mask (in-plane holes only).

    Equal to ``scipy.ndimage.binary_fill_holes`` per slice, but by labelling the background
    once and keeping what touches the border, which is ~10x faster on 1600 x 1600 slices.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = _CROSS_2D if mask.ndim == 2 else _IN_PLANE_CROSS
    labels, n = ndi.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for idx in ((..., 0, slice(None)), (..., -1, slice(None)),
                (..., slice(None), 0), (..., slice(None), -1)):
        outside[np.unique(labels[idx])] = True
    outside[0] = False
    return ~outside[labels]


def _close_ring(cortical: np.ndarray, trabecular: np.ndarray, spacing_yx_mm, max_gap_mm: float
                ) -> tuple[np.ndarray, bool]:
    """Close gaps of a 2D cortical ring. Returns (cortex, closed_ok)."""
    bone = cortical | trabecular
    filled = fill_holes(cortical)
    exposed = trabecular & ndi.binary_dilation(~bone, structure=_CROSS_2D)
    open_ring = exposed.any() or (trabecular & ~filled).sum() > 0.01 * max(1, trabecular.sum())
    if not open_ring:
        return cortical, True
    step_mm = max(spacing_yx_mm)
    radius_mm = step_mm
    pad = int(np.ceil(max_gap_mm / min(spacing_yx_mm))) + 2
    padded = np.pad(cortical, pad)
    while radius_mm <= max_gap_mm + 1e-9:
        closed = ndi.binary_closing(padded, structure=disk(radius_mm, spacing_yx_mm))
        closed = closed[pad:-pad, pad:-pad] | cortical
        inside = fill_holes(closed)
        if (trabecular & ~inside).sum() <= 0.01 * max(1, trabecular.sum()):
            return closed, True
        radius_mm += step_mm
    return cortical, False


def _clean_bone_slice(cort: np.ndarray, trab: np.ndarray, spacing_yx_mm, max_gap_mm: float
                      ) -> tuple[np.ndarray, np.ndarray, bool]:
    """One slice of one bone: close the ring; the enclosed area is trabecular."""
    if not cort.any():
        return cort, trab, not trab.any()
    # Cortical islands inside the marrow (thick trabeculae called cortical) are trabecular.
    labels, n = ndi.label(cort, structure=_STRUCT_2D)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        main = labels == int(sizes.argmax())
        inner = fill_holes(main) & ~main
        islands = cort & ~main & inner
        cort = cort & ~islands
        trab = trab | islands
    cort, ok = _close_ring(cort, trab, spacing_yx_mm, max_gap_mm)
    if not ok:
        # The ring stays open: never discard the network's trabecular bone because of it.
        # Keep it, and add what the bone as a whole encloses.
        return cort, (trab | fill_holes(cort | trab)) & ~cort, False
    enclosed = fill_holes(cort) & ~cort
    return cort, enclosed, ok


def clean_classes(classes: np.ndarray, spacing_mm: tuple[float, float, float],
                  config: PostprocessConfig, *, workers: int = 2
                  ) -> tuple[np.ndarray, list[str]]:
    """Apply the clean-up rules to a 5-class label volume ``[z, y, x]``.

    Returns the cleaned uint8 label volume (a new array) and a list of warnings for the user.
    """
    if classes.ndim != 3:
        raise ValueError(f"Expected a 3D label volume, got shape {classes.shape}")
    result = np.zeros(classes.shape, dtype=np.uint8)
    # Everything happens inside the bounding box of the labelled voxels (the leg); on a real
    # scan that is about half of the 1600 x 1600 field, so every pass below costs half.
    box = _bbox(np.asarray(classes) > 0)
    if box is None:
        return result, ["The segmentation is empty: no leg was found in the scan."]
    result[box] = classes[box]
    warnings = _clean_in_place(result[box], spacing_mm, config, workers)
    return result, warnings


def _clean_in_place(out: np.ndarray, spacing_mm, config: PostprocessConfig, workers: int
                    ) -> list[str]:
    warnings: list[str] = []
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    pixel_area_mm2 = spacing_yx[0] * spacing_yx[1]

    # 1. the leg
    leg = largest_component(out > 0, config.connectivity)
    out[~leg] = 0
    holes = fill_holes(leg) & ~leg
    out[holes] = SOFT
    del leg, holes

    for bone in BONES:
        # 2. largest component per class
        for label in (bone.cortical, bone.trabecular):
            mask = out == label
            keep = largest_component(mask, config.connectivity)
            out[mask & ~keep] = SOFT
        bone_mask = (out == bone.cortical) | (out == bone.trabecular)
        mean_area_mm2 = bone_mask.sum() * pixel_area_mm2 / max(1, out.shape[0])
        if mean_area_mm2 < config.min_bone_area_mm2:
            if bone_mask.any():
                out[bone_mask] = SOFT
            warnings.append(
                f"The {bone.name} was not found (mean cross-section {mean_area_mm2:.1f} mm2 < "
                f"{config.min_bone_area_mm2} mm2): it may be outside the field of view. Its "
                "regions are empty; check the scan.")
            continue

        # 3-4. per slice: close the cortical ring, enclose the trabecular compartment
        box = _bbox(bone_mask, margin=int(np.ceil(config.max_cortical_gap_mm /
                                                   min(spacing_yx))) + 2)
        sub = out[box]
        open_slices = []

        def work(z: int, sub=sub, bone=bone) -> tuple[int, np.ndarray, np.ndarray, bool]:
            cort = sub[z] == bone.cortical
            trab = sub[z] == bone.trabecular
            new_cort, new_trab, ok = _clean_bone_slice(cort, trab, spacing_yx,
                                                       config.max_cortical_gap_mm)
            return z, new_cort, new_trab, ok

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(work, range(sub.shape[0])))
        for z, new_cort, new_trab, ok in results:
            old_bone = (sub[z] == bone.cortical) | (sub[z] == bone.trabecular)
            plane = sub[z]
            plane[old_bone & ~(new_cort | new_trab)] = SOFT
            other_bone = (plane != 0) & (plane != SOFT) & ~old_bone
            plane[new_trab & ~other_bone] = bone.trabecular
            plane[new_cort & ~other_bone] = bone.cortical
            if not ok:
                open_slices.append(box[0].start + z)
        if open_slices:
            warnings.append(
                f"The {bone.name}'s cortex stays open in {len(open_slices)} slice(s) (first: "
                f"{open_slices[0]}) after closing gaps up to {config.max_cortical_gap_mm} mm; "
                "check those slices in the Segment Editor.")
    return warnings
