"""Soft tissue -> skin, myotendinous tissue and adipose tissue; distance rings around the tibia.

The paper's rules, in physical units (all settings in :class:`.config.PostprocessConfig`):

1. **skin**: soft tissue within ``skin_width_mm`` (2 mm) of the leg surface, measured in-plane
   with the real pixel spacing (exact Euclidean distance, per slice);
2. **seeds**: in the remaining soft tissue, voxels in the tendon window (100..600 HU) seed
   myotendinous tissue and voxels in the fat window (-600..-200 HU) seed adipose tissue;
3. **growth**: seeds grow competitively (one voxel ring per step, both kinds at once; ties go
   by the split threshold) through unassigned soft tissue for ``seed_growth_mm``;
4. **split**: voxels still unassigned are myotendinous above ``split_hu`` (-50 HU) and adipose
   at or below.

This project's default adds, before rules 2-4 (see :mod:`.soft_tissue_levels`): motion
streaks scaled back in each slice's spectrum; HU replaced by their mean over a cube of
``smoothing_window_mm`` restricted to soft tissue (normalised convolution, so bone and air do
not bleed in); the split (and the seed windows) placed between the scan's own fat and muscle
levels; and the slow drift against those levels removed. The work is done slab by slab and
slice by slice in threads: memory stays bounded by a slab (two float32 arrays), not the scan.
After rules 2-4 (and the opening of the myotendinous region), the default lets a learned model
(:mod:`.soft_tissue_model`) decide the inner soft tissue's split from each slice's context:
ghost arcs of the moved cortex and streak residue, which no per-voxel rule separates.
With ``overwrite_input`` the regions are written into the classes array itself, which then
needs no region array beside it (see :func:`subdivide_soft_tissue`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import BONE_REGIONS, class_by_name, classes_to_regions, region_by_name
from HRpQCTSegmentationEngine.postprocess.bone import dilate_cross, fill_holes
from HRpQCTSegmentationEngine.postprocess.config import PostprocessConfig
from HRpQCTSegmentationEngine.postprocess.soft_tissue_levels import (
    SoftTissueLevels,
    correct_drift,
    estimate_levels,
    fixed_levels,
    suppress_streaks,
)
from HRpQCTSegmentationEngine.postprocess.soft_tissue_model import (
    SoftTissueModel,
    bundled_model,
    load_model,
)

log = logging.getLogger(__name__)

__all__ = ["subdivide_soft_tissue", "soft_tissue_levels", "distance_rings", "smooth_within"]

SOFT = class_by_name("soft_tissue").label
SKIN = region_by_name("skin").label
MYOTENDINOUS = region_by_name("myotendinous").label
ADIPOSE = region_by_name("adipose").label
TIBIA_CLASSES = (class_by_name("tibial_cortical").label, class_by_name("tibial_trabecular").label)

_CROSS_2D = ndi.generate_binary_structure(2, 1)


def _slab_bounds(n: int, slab: int, halo: int):
    for z0 in range(0, n, slab):
        z1 = min(n, z0 + slab)
        yield z0, z1, max(0, z0 - halo), min(n, z1 + halo)


def _window_voxels(window_mm: float, spacing_mm) -> tuple[int, ...]:
    """Odd window sizes (in voxels) closest to ``window_mm`` along each axis."""
    return tuple(max(1, 2 * round(window_mm / float(s) / 2) + 1) for s in spacing_mm)


def _box_sums(hu: np.ndarray, mask: np.ndarray, window_vox: tuple[int, int, int],
              num: np.ndarray, den: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
    """Box means of ``hu * mask`` into ``num`` and of ``mask`` into ``den`` (float32, in place).

    The two filters run side by side when a ``pool`` is given. In-place filtering gives the
    same bits as scipy's out-of-place call (scipy filters axes 1 and 2 in place itself).
    """
    np.copyto(num, hu, casting="unsafe")
    np.copyto(num, 0, where=~mask)
    np.copyto(den, mask)

    def run(a: np.ndarray) -> None:
        ndi.uniform_filter(a, window_vox, mode="nearest", output=a)

    if pool is None:
        run(num)
        run(den)
    else:
        list(pool.map(run, (num, den)))


def smooth_within(hu: np.ndarray, mask: np.ndarray, window_vox: tuple[int, int, int]
                  ) -> np.ndarray:
    """Mean of ``hu`` over a box window using only voxels inside ``mask``.

    Normalised convolution: ``box(hu * mask) / box(mask)``. Returns float32 with the local mean
    inside ``mask`` and the raw value outside.
    """
    num = np.empty(hu.shape, dtype=np.float32)
    den = np.empty(hu.shape, dtype=np.float32)
    _box_sums(hu, mask, window_vox, num, den)
    out = np.asarray(hu, dtype=np.float32).copy()
    inside = mask & (den > _MIN_WEIGHT)
    np.divide(num, den, out=out, where=inside)
    return out


#: Below this fraction of soft tissue in the window the local mean is not used (raw HU).
_MIN_WEIGHT = 1e-3


def _tie_at(width_mm: float, spacing_yx) -> bool:
    """Whether some pixel offset lies (numerically) exactly ``width_mm`` away.

    Only then can the rounding of a distance decide ``distance <= width``; otherwise every
    exact method gives the same band as scipy's Euclidean distance transform.
    """
    sy, sx = spacing_yx
    dy = np.arange(int(width_mm / sy) + 2, dtype=np.float64)[:, None] * sy
    dx = np.arange(int(width_mm / sx) + 2, dtype=np.float64)[None, :] * sx
    gap = np.abs(dy * dy + dx * dx - width_mm * width_mm)
    return bool((gap <= 1e-9 * max(width_mm * width_mm, 1e-12)).any())


def _half_widths(width_mm: float, spacing_yx) -> np.ndarray:
    """For a row offset ``g`` (pixels), the largest column offset still within ``width_mm``.

    Entry ``g`` for small ``g``; ``-big`` where no column offset is (the last entry stands for
    every larger ``g``).
    """
    sy, sx = spacing_yx
    rows = int(width_mm / sy) + 1
    out = np.full(rows + 2, -(2**30), dtype=np.int64)
    for g in range(rows + 1):
        rest = width_mm * width_mm - (g * sy) ** 2
        if rest < 0:
            continue
        k = int(np.sqrt(rest) / sx)
        while k > 0 and (k * sx) ** 2 > rest:
            k -= 1
        while ((k + 1) * sx) ** 2 <= rest:
            k += 1
        out[g] = k
    return out


#: Up to this cap the row distance is counted by shifted ANDs (about twice as fast for the
#: narrow bands of the surface step); beyond it by running extrema, whose cost does not grow.
_SHIFTED_ROW_DISTANCE_MAX = 24


def _row_distance(inside: np.ndarray, cap: int, itype) -> np.ndarray:
    """Per pixel, the row distance to the nearest pixel of its column not in ``inside``
    (rows beyond the array count as outside), capped at ``cap``; 0 outside."""
    h = inside.shape[0]
    if cap <= _SHIFTED_ROW_DISTANCE_MAX:
        # the distance is the number of k in 0..cap-1 with rows i-k..i+k all inside
        g = inside.astype(np.uint8)
        run = inside.copy()
        for k in range(1, min(cap, h)):
            run[:h - k] &= inside[k:]
            run[h - k:] = False
            run[k:] &= inside[:h - k]
            run[:k] = False
            np.add(g, run, out=g, casting="unsafe")
        return g
    rows = np.arange(h, dtype=itype)[:, None]
    above = np.where(inside, itype(-1), rows)
    np.maximum.accumulate(above, axis=0, out=above)
    below = np.where(inside, itype(h), rows)
    np.minimum.accumulate(below[::-1], axis=0, out=below[::-1])
    np.subtract(rows, above, out=above)
    np.subtract(below, rows, out=below)
    g = np.minimum(above, below, out=above)
    return np.minimum(g, cap, out=g)


def _within_of_outside(inside: np.ndarray, width_mm: float, spacing_yx) -> np.ndarray:
    """Pixels within ``width_mm`` (in-plane Euclidean) of a pixel not in ``inside``.

    Everything beyond the array counts as outside. Exact: a column pass finds, per pixel, the
    row distance ``g`` to the nearest outside pixel of its column; a pixel is then within reach
    iff some pixel of its row at column distance ``d`` has ``(sy g)^2 + (sx d)^2 <= width^2``,
    a union of intervals found with a running maximum and minimum along the rows. About four
    times faster than a distance transform, and no float64 distance image.
    """
    h, w = inside.shape
    half = _half_widths(width_mm, spacing_yx)
    # int16 where it holds every index: the running extrema are 2-3x faster than on int32
    itype = np.int16 if max(h, w) < 2**14 else np.int32
    half = np.maximum(half, -(w + 1)).astype(itype)  # "none" still reaches no column
    reach = np.take(half, _row_distance(inside, half.size - 1, itype))  # columns reached
    cols = np.arange(w, dtype=itype)
    right = reach + cols
    np.maximum.accumulate(right, axis=1, out=right)
    within = right >= cols
    left = np.subtract(cols, reach, out=reach)
    np.minimum.accumulate(left[:, ::-1], axis=1, out=left[:, ::-1])
    within |= left <= cols
    # the outside beyond the left and right edges (row offset 0)
    within[:, :max(0, min(w, int(half[0])))] = True
    within[:, max(0, w - int(half[0])):] = True
    return within


def _skin_band(leg: np.ndarray, width_mm: float, spacing_yx, touches_edge: bool) -> np.ndarray:
    """Pixels of ``leg`` within ``width_mm`` of the outside (beyond the image counts as
    outside only if ``touches_edge``; otherwise ``leg`` has a margin of outside pixels)."""
    if _tie_at(width_mm, spacing_yx):
        # A pixel offset lies exactly at the width: keep scipy's distance transform and its
        # rounding, so results never depend on which method ran.
        if touches_edge:
            distance_mm = ndi.distance_transform_edt(np.pad(leg, 1),
                                                     sampling=spacing_yx)[1:-1, 1:-1]
        else:
            distance_mm = ndi.distance_transform_edt(leg, sampling=spacing_yx)
        return distance_mm <= width_mm
    # Beyond the array is outside either way: without touching, the margin is nearer.
    return _within_of_outside(leg, width_mm, spacing_yx)


@dataclass(frozen=True)
class _Rules:
    """The HU thresholds of rules 2-4 for one scan, and the drift window in pixels."""

    levels: SoftTissueLevels
    tendon_seed_hu: tuple[float, float]
    fat_seed_hu: tuple[float, float]
    growth_steps: int
    drift_window_px: tuple[int, int] | None
    opening_half_px: tuple[int, int] | None  # half-side (y, x) of the myotendinous opening
    model: SoftTissueModel | None = None  # the learned split, where the levels allow it

    @classmethod
    def of(cls, levels: SoftTissueLevels, config: PostprocessConfig, spacing_yx) -> _Rules:
        if levels.source != "histogram":
            tendon, fat = config.tendon_seed_hu, config.fat_seed_hu
        else:
            tendon = tuple(levels.to_scan_hu(v) for v in config.tendon_seed_hu)
            fat = tuple(levels.to_scan_hu(v) for v in config.fat_seed_hu)
        drift = opening = None
        if config.drift_window_mm > 0:
            drift = tuple(max(1, round(config.drift_window_mm / float(s))) for s in spacing_yx)
        if config.myotendinous_opening_mm > 0:
            opening = tuple(max(0, round((config.myotendinous_opening_mm / float(s) - 1) / 2))
                            for s in spacing_yx)
        return cls(levels, tendon, fat, round(config.seed_growth_mm / min(spacing_yx)), drift,
                   opening if opening and any(opening) else None,
                   _split_model(config, levels, float(np.mean(spacing_yx))))


def _split_model(config: PostprocessConfig, levels: SoftTissueLevels,
                 pixel_mm: float) -> SoftTissueModel | None:
    """The learned split of ``config``; None for the rules' split, where the scan's own fat
    and muscle levels are unknown (the model reads HU relative to them), or where the voxel
    size lies outside the model's range (then a log line says so)."""
    if config.soft_tissue_model == "none" or levels.source != "histogram":
        return None
    model = (bundled_model() if config.soft_tissue_model == "bundled"
             else load_model(config.soft_tissue_model))
    if not model.applies_to(pixel_mm):
        log.info("Soft tissue split by the rules: the learned split is made for voxels of "
                 "%.3f-%.3f mm, this scan's are %.3f mm.", *model.voxel_mm_range, pixel_mm)
        return None
    return model


def _slice_masks(classes2d: np.ndarray, spacing_yx, config: PostprocessConfig):
    """The leg's box in one slice, and its soft tissue, skin band and inner soft tissue there.

    None when the slice holds no soft tissue. The box is the labelled voxels' bounding box
    plus a one-voxel margin of air, so that every array is as small as it can be.
    """
    soft_full = classes2d == SOFT
    if not soft_full.any():
        return None
    ys = np.flatnonzero(classes2d.any(axis=1))
    xs = np.flatnonzero(classes2d.any(axis=0))
    box = (slice(max(0, ys[0] - 1), ys[-1] + 2), slice(max(0, xs[0] - 1), xs[-1] + 2))
    height, width = soft_full.shape
    touches_edge = bool(ys[0] == 0 or xs[0] == 0 or ys[-1] == height - 1 or xs[-1] == width - 1)
    soft = soft_full[box]
    leg = fill_holes(classes2d[box] > 0)
    skin = _skin_band(leg, config.skin_width_mm, spacing_yx, touches_edge)
    skin &= soft
    return box, soft, skin, soft & ~skin


def _local_mean(hu2d: np.ndarray, num2d: np.ndarray | None, den2d: np.ndarray | None,
                box, soft: np.ndarray) -> np.ndarray:
    """The local mean in the box where the window holds enough soft tissue, raw HU elsewhere."""
    if num2d is None:
        return np.asarray(hu2d[box], dtype=np.float32)
    hu = np.array(hu2d[box], dtype=np.float32)
    den = den2d[box]
    np.divide(num2d[box], den, out=hu, where=soft & (den > _MIN_WEIGHT))
    return hu


def _label_slice(classes2d: np.ndarray, hu2d: np.ndarray, num2d: np.ndarray | None,
                 den2d: np.ndarray | None, view2d: np.ndarray, spacing_yx, config,
                 rules: _Rules) -> None:
    """Write the region labels of one slice into ``view2d``, which may be ``classes2d`` itself.

    ``num2d``/``den2d``: the slice of the box sums when smoothing (else None).
    """
    masks = _slice_masks(classes2d, spacing_yx, config)
    # Only now, with the masks taken: in place this overwrites the classes they are read from.
    _bone_regions(classes2d, view2d)
    if masks is None:
        return
    box, soft, skin, inner = masks
    view = view2d[box]
    view[skin] = SKIN
    hu = _local_mean(hu2d, num2d, den2d, box, soft)
    if rules.drift_window_px is not None:
        hu = correct_drift(hu, inner, rules.levels, rules.drift_window_px)
    split = rules.levels.split_hu
    above = hu > split
    if (rules.growth_steps == 0 and rules.tendon_seed_hu[0] > split
            and rules.fat_seed_hu[1] <= split):
        # Without growth, and with the tendon window above the split and the fat window at or
        # below it, the seeds change nothing: the split alone decides.
        view[inner & above] = MYOTENDINOUS
        view[inner & ~above] = ADIPOSE
    else:
        _grow_seeds(view, inner, hu, above, rules)
    if rules.opening_half_px is not None:
        _open_myotendinous(view, rules.opening_half_px)
    if rules.model is not None:
        rules.model.relabel(view, inner, hu, rules.levels, float(np.mean(spacing_yx)))


def _grow_seeds(view: np.ndarray, inner: np.ndarray, hu: np.ndarray, above: np.ndarray,
                rules: _Rules) -> None:
    """Rules 2-4: tendon and fat seeds grow competitively; the split decides the rest."""
    tlo, thi = rules.tendon_seed_hu
    flo, fhi = rules.fat_seed_hu
    tendon = inner & (hu >= tlo) & (hu <= thi)
    fat = inner & (hu >= flo) & (hu <= fhi)
    free = inner & ~tendon & ~fat
    for _ in range(rules.growth_steps):
        t_new = dilate_cross(tendon) & free
        f_new = dilate_cross(fat) & free
        both = t_new & f_new
        t_new &= ~both | above
        f_new &= ~both | ~above
        if not (t_new.any() or f_new.any()):
            break
        tendon |= t_new
        fat |= f_new
        free &= ~(t_new | f_new)
    view[tendon | (free & above)] = MYOTENDINOUS
    view[fat | (free & ~above)] = ADIPOSE


def _open_myotendinous(view: np.ndarray, half_px: tuple[int, int]) -> None:
    """Myotendinous voxels outside every ``(2h + 1)``-voxel square that fits in the region
    become adipose (a binary opening; separable min/max filters, ~20 ms per slice)."""
    myotendinous = view == MYOTENDINOUS
    kept = myotendinous.view(np.uint8)
    for filter1d in (ndi.minimum_filter1d, ndi.maximum_filter1d):
        for axis, half in enumerate(half_px):
            if half > 0:  # outside the box is not myotendinous (cval 0)
                kept = filter1d(kept, 2 * half + 1, axis=axis, mode="constant", cval=0)
    view[myotendinous & (kept == 0)] = ADIPOSE


def _leg_box(classes: np.ndarray) -> tuple[slice, slice, slice] | None:
    """All slices, and the in-plane bounding box of labelled voxels with a one-voxel margin."""
    if classes.size == 0:
        return None
    plane = classes.max(axis=0) if classes.dtype.kind in "ub" else (classes != 0).any(axis=0)
    rows = np.flatnonzero(plane.any(axis=1))
    cols = np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(None), slice(max(0, rows[0] - 1), rows[-1] + 2),
            slice(max(0, cols[0] - 1), cols[-1] + 2))


_BONE_LABELS = sorted(d.label for d in BONE_REGIONS)
_BONE_LABELS_FROM_ONE = list(range(1, len(_BONE_LABELS) + 1)) == _BONE_LABELS


def _bone_regions(classes: np.ndarray, out: np.ndarray) -> None:
    """:func:`classes_to_regions` into ``out``, without a lookup per voxel (labels 1..4)."""
    if classes.dtype != np.uint8 or not _BONE_LABELS_FROM_ONE:
        out[...] = classes_to_regions(classes)
        return
    np.copyto(out, classes)
    out[out > len(_BONE_LABELS)] = 0


def _suppress_slab(classes: Sequence[np.ndarray], hu: np.ndarray, voxel_mm: float,
                   out: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """Streak-suppressed HU of a slab into ``out`` (float32), slice by slice in ``pool``.

    ``classes``: the slab's class slices (a 3D array or a list of 2D ones).
    """

    def work(k: int) -> None:
        out[k] = suppress_streaks(hu[k], classes[k] == SOFT, voxel_mm)

    list(pool.map(work, range(hu.shape[0])))
    return out


class _SlabPass:
    """The per-slab inputs of rules 2-4: streak-suppressed HU and the local-mean box sums.

    Holds the float32 slab buffers, so that a pass over the scan allocates them once. With
    ``keep_halo`` the caller overwrites each slab's classes with its regions once the slab is
    read (:meth:`keep` first): the pass then keeps a copy of the classes of the ``halo``
    slices before the next slab, the only overwritten ones that a later slab still reads
    (its smoothing and streak suppression need their soft tissue, which the regions no
    longer show: skin has the soft-tissue class's label, the rest of it other labels).
    """

    def __init__(self, classes: np.ndarray, hu: np.ndarray, spacing_mm, config: PostprocessConfig,
                 slab_slices: int, pool: ThreadPoolExecutor, workers: int, *,
                 keep_halo: bool = False) -> None:
        self.classes, self.hu, self.config, self.pool = classes, hu, config, pool
        self.workers = workers
        self.window_vox = _window_voxels(config.smoothing_window_mm, spacing_mm)
        self.smoothing = config.smoothing_window_mm > 0
        self.halo = self.window_vox[0] // 2 if self.smoothing else 0
        self.voxel_mm = float(np.mean(spacing_mm[1:]))
        shape = (min(classes.shape[0], slab_slices + 2 * self.halo), *classes.shape[1:])
        count = 2 if self.smoothing else int(config.streak_suppression)
        self.buffers = [np.empty(shape, np.float32) for _ in range(count)]
        self.keep_halo = keep_halo
        self.kept = classes[:0].copy()  # the classes of slices kept_from:kept_from + len(kept)
        self.kept_from = 0

    def _classes(self, z: int) -> np.ndarray:
        """The classes of slice ``z``: the kept copy where the slice holds regions already."""
        k = z - self.kept_from
        return self.kept[k] if 0 <= k < len(self.kept) else self.classes[z]

    def keep(self, z0: int, z1: int) -> None:
        """Before slices ``z0:z1`` are overwritten: keep the classes the next slab reads.

        Those are the ``halo`` slices up to ``z1`` (partly kept already when a slab is
        thinner than the halo); the slices after ``z1`` are not overwritten yet.
        """
        if not self.keep_halo or self.halo == 0:
            return
        start = max(0, z1 - self.halo)
        self.kept = np.stack([self._classes(z) for z in range(start, z1)])
        self.kept_from = start

    def slab(self, h0: int, h1: int):
        """HU, box-sum numerator and denominator of slices ``h0:h1`` (sums None if unused).

        When smoothing, the streak-suppressed HU are summed in place (the numerator takes
        their buffer): inside soft tissue only the local mean is used, as every soft-tissue
        voxel lies in its own window, so the returned "HU" are the numerator there and
        meaningless elsewhere. One float32 slab less.
        """
        hu = self.hu[h0:h1]
        # views, slice by slice: the kept copies stand in for slices already overwritten
        classes = [self._classes(z) for z in range(h0, h1)]
        if self.config.streak_suppression:
            hu = _suppress_slab(classes, hu, self.voxel_mm, self.buffers[0][:h1 - h0],
                                self.pool)
        num = den = None
        if self.smoothing:
            soft = np.empty(hu.shape, bool)
            for k, plane in enumerate(classes):
                np.equal(plane, SOFT, out=soft[k])
            if soft.any():
                num, den = (b[:h1 - h0] for b in self.buffers)
                _box_sums(hu, soft, self.window_vox, num, den,
                          self.pool if self.workers > 1 else None)
        return hu, num, den


#: Slices sampled (evenly) to estimate a scan's fat and muscle levels, and the most voxels
#: taken from each.
_LEVEL_SLICES = 8
_LEVEL_VOXELS_PER_SLICE = 200_000


def _levels_in_box(classes: np.ndarray, hu: np.ndarray, spacing_mm, config: PostprocessConfig,
                   pool: ThreadPoolExecutor, workers: int) -> SoftTissueLevels:
    n = classes.shape[0]
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    slab_pass = _SlabPass(classes, hu, spacing_mm, config, 1, pool, workers)
    halo = slab_pass.halo
    samples = []
    for z in np.unique(np.linspace(0, n - 1, min(n, _LEVEL_SLICES)).round().astype(int)):
        masks = _slice_masks(classes[z], spacing_yx, config)
        if masks is None or not masks[3].any():
            continue
        h0, h1 = max(0, z - halo), min(n, z + halo + 1)
        hu_slab, num, den = slab_pass.slab(h0, h1)
        k = z - h0
        box, soft, _, inner = masks
        local = _local_mean(hu_slab[k], None if num is None else num[k],
                            None if den is None else den[k], box, soft)
        values = local[inner]
        samples.append(values[:: max(1, values.size // _LEVEL_VOXELS_PER_SLICE)])
    if not samples or sum(s.size for s in samples) < 100:
        return fixed_levels(config.split_hu)  # (almost) no inner soft tissue: nothing to split
    return estimate_levels(np.concatenate(samples), config.split_fraction, config.split_hu)


def soft_tissue_levels(classes: np.ndarray, hu: np.ndarray,
                       spacing_mm: tuple[float, float, float], config: PostprocessConfig,
                       *, workers: int = 2) -> SoftTissueLevels:
    """The fat and muscle levels and the split that :func:`subdivide_soft_tissue` will use.

    With ``config.split_levels == "fixed"`` the configured ``split_hu``; otherwise estimated
    from the local-mean HU (after streak suppression, as the rules see them) of the inner soft
    tissue (outside the skin band) of up to 8 evenly spaced slices.
    """
    if config.split_levels == "fixed":
        return fixed_levels(config.split_hu)
    box = _leg_box(classes)
    if box is None:
        return fixed_levels(config.split_hu)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return _levels_in_box(classes[box], hu[box], spacing_mm, config, pool, workers)


def subdivide_soft_tissue(classes: np.ndarray, hu: np.ndarray,
                          spacing_mm: tuple[float, float, float], config: PostprocessConfig,
                          *, levels: SoftTissueLevels | None = None, slab_slices: int = 32,
                          workers: int = 2, overwrite_input: bool = False,
                          progress: ProgressCallback | None = None,
                          cancel: CancelToken | None = None) -> np.ndarray:
    """Turn a cleaned 5-class volume and its HU into the 7-region label volume.

    Parameters
    ----------
    classes:
        Cleaned network classes ``[z, y, x]`` (uint8).
    hu:
        The scan in HU, same shape.
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    levels:
        The scan's soft-tissue levels, if already known (from :func:`soft_tissue_levels`);
        estimated here otherwise.
    overwrite_input:
        Write the regions into ``classes`` (if it is a writable uint8 array, which the caller
        no longer needs) and return it; otherwise, as without the option, into a new array.
        The same regions without a second label array of the input's size (0.40 GiB for a
        full 168 x 1600 x 1600 scan). If cancelled, ``classes`` is left part overwritten.

    Memory beyond the result: two float32 slabs of ``slab_slices`` (plus the window's
    halo) over the leg's bounding box, and per-slice arrays; in place, a copy of the classes
    of the halo's slices. ``slab_slices`` sets where the smoothing restarts along z, which
    can move a local mean by rounding: keep it.
    """
    if classes.shape != hu.shape:
        raise ValueError(f"Label shape {classes.shape} differs from image shape {hu.shape}")
    in_place = (overwrite_input and isinstance(classes, np.ndarray)
                and classes.dtype == np.uint8 and classes.flags.writeable)
    box = _leg_box(classes)
    if box is None:  # no labels at all: every voxel is background, which in place it is
        return classes if in_place else classes_to_regions(classes)
    # Outside the box there are no labels: only the box needs converting and subdividing.
    regions = classes if in_place else np.zeros(classes.shape, dtype=np.uint8)
    classes, hu, regions_view = classes[box], hu[box], regions[box]
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    n = classes.shape[0]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if levels is None:  # before the first slab, so from the classes as they came
            levels = (fixed_levels(config.split_hu) if config.split_levels == "fixed" else
                      _levels_in_box(classes, hu, spacing_mm, config, pool, workers))
        rules = _Rules.of(levels, config, spacing_yx)
        slab_pass = _SlabPass(classes, hu, spacing_mm, config, slab_slices, pool, workers,
                              keep_halo=in_place)
        for z0, z1, h0, h1 in _slab_bounds(n, slab_slices, slab_pass.halo):
            check(cancel)
            hu_slab, num, den = slab_pass.slab(h0, h1)
            slab_pass.keep(z0, z1)  # in place, the work below overwrites slices z0:z1
            offset = z0 - h0

            def work(k: int, z0=z0, offset=offset, hu_slab=hu_slab, num=num, den=den) -> None:
                j = offset + k  # the slice's index in the slab
                _label_slice(classes[z0 + k], hu_slab[j], None if num is None else num[j],
                             None if den is None else den[j], regions_view[z0 + k],
                             spacing_yx, config, rules)

            # each slice reads and writes its own plane only (in place: one and the same)
            list(pool.map(work, range(z1 - z0)))
            report(progress, z1, n, "soft-tissue subdivision")
    return regions


def distance_rings(classes: np.ndarray, spacing_mm: tuple[float, float, float],
                   radii_mm: tuple[float, ...], *, workers: int = 2) -> np.ndarray:
    """Soft tissue by distance from the tibia's outer surface, for the paper's ablation.

    Returns a uint8 volume where soft-tissue voxels hold the 1-based index ``k`` of the smallest
    radius in ``radii_mm`` (sorted ascending) within which they lie, and 0 elsewhere. The ring
    mask for radius ``radii_mm[k-1]`` (all soft tissue within that distance) is
    ``(rings > 0) & (rings <= k)``. Distances are in-plane, with the real pixel spacing.
    """
    radii = np.sort(np.asarray(radii_mm, dtype=np.float64))
    if radii.size == 0 or radii[0] <= 0:
        raise ValueError("Ring radii must be positive")
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    rings = np.zeros(classes.shape, dtype=np.uint8)
    leg = _leg_box(classes)
    if leg is None:
        return rings
    height, width = classes.shape[1:]
    my = int(np.ceil(radii[-1] / spacing_yx[0])) + 1
    mx = int(np.ceil(radii[-1] / spacing_yx[1])) + 1

    def work(z: int) -> None:
        plane = classes[z]
        near = plane[leg[1:]]
        tibia = (near == TIBIA_CLASSES[0]) | (near == TIBIA_CLASSES[1])
        ys = np.flatnonzero(tibia.any(axis=1))
        if ys.size == 0:
            return
        xs = np.flatnonzero(tibia.any(axis=0))
        y0, y1 = ys[0] + leg[1].start, ys[-1] + leg[1].start
        x0, x1 = xs[0] + leg[2].start, xs[-1] + leg[2].start
        # Only a box of the largest radius around the tibia can hold ring voxels.
        box = (slice(max(0, y0 - my), min(height, y1 + my + 1)),
               slice(max(0, x0 - mx), min(width, x1 + mx + 1)))
        labels = plane[box]
        tibia = (labels == TIBIA_CLASSES[0]) | (labels == TIBIA_CLASSES[1])
        nearest = ndi.distance_transform_edt(~fill_holes(tibia), sampling=spacing_yx,
                                             return_distances=False, return_indices=True)
        # Distances of soft-tissue pixels only, computed as scipy computes them for all.
        soft = labels == SOFT
        ys, xs = np.nonzero(soft)
        dy = (nearest[0][soft] - ys).astype(np.float64) * spacing_yx[0]
        dx = (nearest[1][soft] - xs).astype(np.float64) * spacing_yx[1]
        del nearest
        distance_mm = np.sqrt(dy * dy + dx * dx)
        k = np.searchsorted(radii, distance_mm, side="left") + 1  # d <= r_k -> index k
        k[k > radii.size] = 0
        rings[z][box][soft] = k

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(work, range(classes.shape[0])))
    return rings
