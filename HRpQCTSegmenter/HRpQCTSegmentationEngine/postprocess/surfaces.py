"""Refine the skin surface and the periosteal surfaces to the scan's own HU edges.

The network sees each slice at half resolution (800 x 800), so its boundaries are only as
exact as that grid and carry its biases (a Dice loss favours the small bone classes at their
edges). Both refinements below move a boundary, within a narrow band around the predicted one,
to where the local mean HU crosses the level half-way between the two tissues it separates:
the half-maximum edge of a blurred step, which is where the true boundary of a partial-volume
image lies.

1. **skin surface** (air | leg): attachments thinner than ``2 * leg_opening_mm`` are cut off
   the leg (per-slice morphological opening, largest part kept): the carbon-fibre holder shell
   where it touches the skin, a strap, a fold of the blanket. Then, within
   ``skin_surface_band_mm`` of the leg surface, a pixel is leg where its local mean HU is above
   ``skin_surface_hu`` (air -1000 HU, skin about 0 HU). Only background and soft-tissue
   pixels change; holes are filled and the largest part kept.
2. **periosteal surfaces** (bone | soft tissue): within ``periosteal_band_mm`` of each bone's
   outer surface, cortical and soft-tissue pixels swap where the local mean HU is on the
   other side of the level half-way between that slice's outer cortex and the soft tissue
   around it (both medians measured in the slice, so the level follows the scan's
   calibration and the bone's density). Cortical pixels near the marrow never change, so a
   closed ring stays closed.
3. **the gap between the bones** (tibia | fibula), before step 2: where the fibula lies within
   a millimetre of the tibia, the network (never trained on gaps that narrow) takes the
   fibula's cortex for the tibia's and calls the soft tissue between them tibial marrow: a
   wedge of "trabecular bone" from the tibia to the fibula. Within ``bone_gap_band_mm`` of
   the fibula, tibial trabecular pixels darker than the level half-way between the tibia's
   cortex and the soft tissue (as in step 2) that connect, through such pixels, to soft
   tissue or to the fibula become soft tissue. Marrow enclosed by a bright cortex does not
   connect, so it stays.

Each step is skipped on a slice that does not show its edge (no air outside the leg, no
contrast between cortex and soft tissue): the prediction then stands as it is.

All settings are in :class:`.config.PostprocessConfig`; zero bands switch a step off (the
``PAPER`` preset). The work is per slice, in the leg's bounding box, in threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi

from HRpQCTCore.progress import CancelToken, check
from HRpQCTSegmentationEngine.postprocess.bone import (
    BONES,
    SOFT,
    dilate_cross,
    fill_holes,
    keep_largest_in_plane,
)
from HRpQCTSegmentationEngine.postprocess.config import PostprocessConfig
from HRpQCTSegmentationEngine.postprocess.soft_tissue import _window_voxels, _within_of_outside

__all__ = ["refine_surfaces", "refine_skin_surface", "refine_periosteum",
           "separate_bones"]

#: Below this difference between the slice's cortex and soft tissue (HU) the periosteal surface
#: is left as predicted: there is no edge to follow.
MIN_PERIOSTEAL_CONTRAST_HU = 300.0


def _near(mask: np.ndarray, width_mm: float, spacing_yx_mm: tuple[float, float]) -> np.ndarray:
    """Pixels within ``width_mm`` of a pixel of ``mask`` (nothing beyond the array counts)."""
    pad = int(np.ceil(width_mm / min(spacing_yx_mm))) + 1
    outside = np.pad(~mask, pad, constant_values=True)
    return _within_of_outside(outside, width_mm, spacing_yx_mm)[pad:-pad, pad:-pad]


def _local_mean(hu: np.ndarray, window_px: tuple[int, int]) -> np.ndarray:
    return ndi.uniform_filter(np.asarray(hu, dtype=np.float32), window_px, mode="nearest")


def refine_skin_surface(plane: np.ndarray, hu: np.ndarray, spacing_yx_mm: tuple[float, float],
                        config: PostprocessConfig) -> None:
    """Refine the leg's outline of one 5-class slice in place (step 1 of the module).

    Parameters
    ----------
    plane:
        Cleaned 5-class labels ``[y, x]`` (uint8), modified in place. It should have a margin
        of background wider than the band around the leg (the caller crops with one).
    hu:
        The slice in HU, same shape.
    spacing_yx_mm:
        Pixel size in mm.
    config:
        ``leg_opening_mm``, ``skin_surface_band_mm``, ``skin_surface_hu`` and
        ``skin_surface_window_mm`` are used.
    """
    leg = plane > 0
    if not leg.any():
        return
    new_leg = leg
    if config.leg_opening_mm > 0:
        core = leg & ~_within_of_outside(leg, config.leg_opening_mm, spacing_yx_mm)
        if core.any():
            keep_largest_in_plane(core)
            # dilating the core back by the same radius: within reach of a core pixel
            new_leg = leg & _near(core, config.leg_opening_mm, spacing_yx_mm)
    if config.skin_surface_band_mm > 0:
        band = (_within_of_outside(new_leg, config.skin_surface_band_mm, spacing_yx_mm)
                & _near(new_leg, config.skin_surface_band_mm, spacing_yx_mm))
        band &= (plane == 0) | (plane == SOFT)
        window = _window_voxels(config.skin_surface_window_mm, spacing_yx_mm)
        local = _local_mean(hu, window)
        values = local[band]
        # Only where the band shows the edge, with both air and tissue in it (not, e.g., an
        # image of zeros, or a leg that fills the field of view).
        if values.size and (np.percentile(values, 10) < config.skin_surface_hu
                            < np.percentile(values, 90)):
            new_leg = np.where(band, local > config.skin_surface_hu, new_leg)
            new_leg = fill_holes(keep_largest_in_plane(new_leg))
    plane[new_leg & (plane == 0)] = SOFT
    plane[~new_leg] = 0


def refine_periosteum(plane: np.ndarray, hu: np.ndarray, spacing_yx_mm: tuple[float, float],
                      config: PostprocessConfig) -> None:
    """Refine the outer surface of each bone of one 5-class slice in place (step 2).

    Parameters are those of :func:`refine_skin_surface`; ``periosteal_band_mm`` and
    ``periosteal_window_mm`` are used. A bone whose slice has too little cortex or
    surrounding soft tissue to measure both levels is left as it is.
    """
    band_mm = config.periosteal_band_mm
    if band_mm <= 0:
        return
    window = _window_voxels(config.periosteal_window_mm, spacing_yx_mm)
    # Reference zones: the cortex beyond the band (from the surface), and soft tissue just
    # beyond the band outside; each about as wide again as the band.
    ref_near, ref_far = band_mm + min(spacing_yx_mm), 2.5 * band_mm + 2 * min(spacing_yx_mm)
    for bone in BONES:
        bone_mask = (plane == bone.cortical) | (plane == bone.trabecular)
        if not bone_mask.any():
            continue
        ys, xs = np.nonzero(bone_mask)
        pad = int(np.ceil(ref_far / min(spacing_yx_mm))) + 1
        box = (slice(max(0, ys.min() - pad), ys.max() + pad + 1),
               slice(max(0, xs.min() - pad), xs.max() + pad + 1))
        sub, inside = plane[box], bone_mask[box]
        cortex, soft = sub == bone.cortical, sub == SOFT
        in_band = _within_of_outside(inside, band_mm, spacing_yx_mm) & inside
        in_ref = _within_of_outside(inside, ref_far, spacing_yx_mm) & inside & ~in_band
        out_band = _near(inside, band_mm, spacing_yx_mm) & ~inside
        out_ref = _near(inside, ref_far, spacing_yx_mm) & ~_near(inside, ref_near, spacing_yx_mm)
        cortex_ref, soft_ref = cortex & in_ref, soft & out_ref
        if cortex_ref.sum() < 20 or soft_ref.sum() < 20:
            continue
        sub_local = _local_mean(hu[box], window)
        cortex_hu = float(np.median(sub_local[cortex_ref]))
        soft_hu = float(np.median(sub_local[soft_ref]))
        if cortex_hu - soft_hu < MIN_PERIOSTEAL_CONTRAST_HU:
            continue  # no edge to follow (an image of zeros, a bone as dense as muscle)
        level = 0.5 * (cortex_hu + soft_hu)
        # Keep at least the band's width of cortex next to the marrow: the ring stays closed.
        marrow = sub == bone.trabecular
        near_marrow = _near(marrow, 2 * band_mm, spacing_yx_mm)
        to_soft = cortex & in_band & ~near_marrow & (sub_local < level)
        to_cortex = soft & out_band & (sub_local >= level)
        sub[to_soft] = SOFT
        sub[to_cortex] = bone.cortical


def _box_around(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of ``mask`` (not empty) widened by ``pad`` pixels, within the array."""
    ys, xs = np.nonzero(mask)
    return (slice(max(0, ys.min() - pad), ys.max() + pad + 1),
            slice(max(0, xs.min() - pad), xs.max() + pad + 1))


def separate_bones(plane: np.ndarray, hu: np.ndarray, spacing_yx_mm: tuple[float, float],
                   config: PostprocessConfig) -> None:
    """Give the soft tissue between a close fibula and the tibia back (step 3), in place.

    Parameters are those of :func:`refine_skin_surface`; ``bone_gap_band_mm`` and
    ``periosteal_window_mm`` are used. A slice without both bones, or whose gap shows too
    little tibial cortex or soft tissue to measure both levels, is left as it is.
    """
    band_mm = config.bone_gap_band_mm
    tibia, fibula = BONES
    fibula_mask = (plane == fibula.cortical) | (plane == fibula.trabecular)
    if band_mm <= 0 or not fibula_mask.any() or not (plane == tibia.trabecular).any():
        return
    near = _near(fibula_mask, band_mm, spacing_yx_mm) & (plane == tibia.trabecular)
    if not near.any():
        return
    box = _box_around(near, int(np.ceil(band_mm / min(spacing_yx_mm))) + 2)
    sub, near, fibula_mask = plane[box], near[box], fibula_mask[box]
    local = _local_mean(hu[box], _window_voxels(config.periosteal_window_mm, spacing_yx_mm))
    cortex, soft = sub == tibia.cortical, sub == SOFT
    if cortex.sum() < 20 or soft.sum() < 20:
        return
    cortex_hu, soft_hu = float(np.median(local[cortex])), float(np.median(local[soft]))
    if cortex_hu - soft_hu < MIN_PERIOSTEAL_CONTRAST_HU:
        return
    dark = near & (local < 0.5 * (cortex_hu + soft_hu))
    parts, _ = ndi.label(dark)
    reached = np.unique(parts[dark & dilate_cross(soft | fibula_mask)])
    sub[np.isin(parts, reached[reached > 0])] = SOFT


def refine_surfaces(classes: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float, float],
                    config: PostprocessConfig, *, workers: int = 2,
                    cancel: CancelToken | None = None) -> np.ndarray:
    """Refine the skin and periosteal surfaces of a cleaned 5-class volume, slice by slice.

    Parameters
    ----------
    classes:
        Output of :func:`.bone.clean_classes` ``[z, y, x]``; refined in place and returned.
    hu:
        The scan in HU on the same grid.
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    config:
        The ``leg_opening_mm``, ``skin_surface_*`` and ``periosteal_*`` settings.
    workers:
        Threads (the slices are independent).
    cancel:
        Checked between slices.
    """
    if classes.shape != hu.shape:
        raise ValueError(f"Labels {classes.shape} and image {hu.shape} differ in shape")
    skin = config.leg_opening_mm > 0 or config.skin_surface_band_mm > 0
    bones = config.periosteal_band_mm > 0 or config.bone_gap_band_mm > 0
    if not (skin or bones) or not classes.any():
        return classes
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    margin = int(np.ceil(max(config.leg_opening_mm, config.skin_surface_band_mm)
                         / min(spacing_yx))) + 2

    def one(z: int) -> None:
        check(cancel)
        plane = classes[z]
        ys = np.flatnonzero(plane.any(axis=1))
        if ys.size == 0:
            return
        xs = np.flatnonzero(plane.any(axis=0))
        box = (slice(max(0, ys[0] - margin), ys[-1] + margin + 1),
               slice(max(0, xs[0] - margin), xs[-1] + margin + 1))
        sub, sub_hu = plane[box], hu[z][box]
        if skin:
            refine_skin_surface(sub, sub_hu, spacing_yx, config)
        separate_bones(sub, sub_hu, spacing_yx, config)
        refine_periosteum(sub, sub_hu, spacing_yx, config)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(classes.shape[0])))
    return classes
