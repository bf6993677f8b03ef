"""Morphological clean-up of the network's five-class prediction.

Rules (the paper's, with 3D connectivity offered and the enclosure made explicit):

1. the leg is the largest connected component of all non-background voxels; anything outside
   it is background, and background holes inside it (per slice) become soft tissue;
2. each bone class keeps only its largest connected component; removed voxels become soft
   tissue, except cortical parts that touch the kept marrow in their slice (the smaller arc
   of a ring broken in two; this project's addition);
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from HRpQCTCore.regions import class_by_name
from HRpQCTSegmentationEngine.postprocess.config import PostprocessConfig

log = logging.getLogger(__name__)

__all__ = ["BONES", "Bone", "largest_component", "keep_largest", "keep_largest_in_plane",
           "clean_classes", "disk", "fill_holes", "holes", "dilate_cross"]

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
    """Bounding box of ``mask`` (with ``margin`` voxels in-plane), or None if empty.

    ``mask`` may be boolean or a label array (non-zero = inside). Two passes over a 3D array:
    one per slice and one projection onto the slice plane.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        along_z = mask.max(axis=(1, 2)) if mask.size else mask
        if not along_z.any():
            return None
        plane = mask.max(axis=0)
        hits = [np.flatnonzero(along_z), np.flatnonzero(plane.any(axis=1)),
                np.flatnonzero(plane.any(axis=0))]
    else:
        if not mask.any():
            return None
        hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                for axis in range(mask.ndim)]
    slices = []
    for axis, hit in enumerate(hits):
        pad = margin if axis >= mask.ndim - 2 else 0
        slices.append(slice(max(0, hit[0] - pad), min(mask.shape[axis], hit[-1] + 1 + pad)))
    return tuple(slices)


#: Slices labelled at once by the slab-wise 3D connected components: bounds the int32 label
#: array to a slab instead of the whole volume.
SLAB_SLICES = 16


def _compact(labels: np.ndarray, n: int) -> np.ndarray:
    """``labels`` in the narrowest unsigned type that holds ``n``."""
    dtype = np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.uint32
    return labels.astype(dtype, copy=False)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct pairs ``(a[i], b[i])`` of two non-negative integer arrays, shape (k, 2).

    Counting instead of sorting when the values present are few (the usual case: the pairs
    are the components meeting in one slice, millions of voxels but a handful of labels).
    """
    if a.size == 0:
        return np.empty((0, 2), np.int64)
    values, local = [], []
    for v in (a, b):
        present = np.bincount(v) > 0
        values.append(np.flatnonzero(present))
        local.append((np.cumsum(present) - 1)[v])
    na, nb = values[0].size, values[1].size
    codes = local[0].astype(np.int64) * nb + local[1]
    if na * nb <= 2**22:
        codes = np.flatnonzero(np.bincount(codes, minlength=na * nb))
    else:
        codes = np.unique(codes)
    return np.stack([values[0][codes // nb], values[1][codes % nb]], axis=1)


def _join(n_nodes: int, pairs: np.ndarray | None) -> np.ndarray:
    """Connected components of a graph given as node pairs.

    Returns, per node, the smallest node id of its component.
    """
    component = np.arange(n_nodes)
    if pairs is None or pairs.size == 0:
        return component
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(component[a], component[b])
        before = component.copy()
        np.minimum.at(component, a, low)
        np.minimum.at(component, b, low)
        while True:  # point every node at its root
            jumped = component[component]
            if np.array_equal(jumped, component):
                break
            component = jumped
        if np.array_equal(component, before):
            return component


def _in_order(pool: ThreadPoolExecutor | None, fn, items, ahead: int = 2):
    """``map(fn, items)`` in ``pool``, in order, with at most ``ahead + 1`` results pending.

    Unlike ``pool.map``, which submits everything at once, this bounds how many large results
    (slab label arrays) exist at the same time.
    """
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _keep_largest_3d(mask: np.ndarray, slab: int | None = None,
                     pool: ThreadPoolExecutor | None = None) -> None:
    """Reduce a 3D boolean mask, in place, to its largest 26-connected component.

    Labels ``slab`` slices at a time (plus the previous slab's last slice, shared) and joins
    the components that meet in a shared slice, so memory stays bounded by a few slabs' int32
    labels. The result equals labelling the whole mask at once and keeping ``argmax`` of the
    component sizes, ties included: scipy numbers components in raster order of their first
    voxel, and the node order here (slab by slab, label by label) keeps that order.
    """
    slab = slab or SLAB_SLICES
    n_slices = mask.shape[0]

    def label_slab(z0: int):
        start = max(0, z0 - 1)
        labels, n = ndi.label(mask[start:z0 + slab], structure=_STRUCT_3D)
        if n == 0:
            return z0, 0, None, None, None, None
        core = labels[z0 - start:]
        if n == 1:
            sizes = np.array([np.count_nonzero(core)], np.int64)
        else:  # slice by slice: bincount copies its input to int64
            sizes = sum(np.bincount(plane.ravel(), minlength=n + 1) for plane in core)[1:]
        shared = labels[0].copy() if start < z0 else None
        # a slab of one component needs no labels later: its voxels are the mask's
        return z0, n, sizes, shared, labels[-1].copy(), _compact(core, n) if n > 1 else None

    stored: list[tuple[int, int, int, np.ndarray | None]] = []  # (z0, offset, n, labels)
    sizes = [np.zeros(1, np.int64)]  # node 0: background
    edges = []
    total = 0
    previous_last = None  # global node ids in the previous slab's last slice
    for z0, n, slab_sizes, shared, last, labels in _in_order(
            pool, label_slab, range(0, n_slices, slab)):
        if n == 0:
            previous_last = None
            continue
        sizes.append(slab_sizes)
        if previous_last is not None:
            touching = shared > 0
            pairs = _unique_pairs(previous_last[touching], shared[touching])
            pairs[:, 1] += total
            edges.append(pairs)
        previous_last = last.astype(np.int64)
        previous_last[last > 0] += total
        stored.append((z0, total, n, labels))
        total += n
    if total == 0:
        return
    node_sizes = np.concatenate(sizes)
    component = _join(total + 1, np.concatenate(edges) if edges else None)
    # Sizes by component, indexed by its smallest node id: the first of equally large
    # components is the one seen first, which is the one scipy's argmax keeps.
    component_sizes = np.bincount(component[1:], weights=node_sizes[1:])
    keep_node = component == int(np.argmax(component_sizes))

    def apply(entry) -> None:
        z0, offset, n, labels = entry
        keep = keep_node[offset + 1:offset + 1 + n]
        view = mask[z0:z0 + slab]
        if keep.all():
            return
        if not keep.any():
            view[...] = False
        elif np.count_nonzero(keep) == 1:
            np.equal(labels, np.flatnonzero(keep)[0] + 1, out=view)
        else:
            view[...] = np.concatenate([[False], keep])[labels]

    list(_in_order(pool, apply, stored))


def keep_largest_in_plane(plane: np.ndarray) -> np.ndarray:
    """Reduce a 2D boolean mask, in place, to its largest 8-connected part; returns it."""
    if plane.any():
        labels, n = ndi.label(plane, structure=_STRUCT_2D)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            np.equal(labels, int(sizes.argmax()), out=plane)
    return plane


def _keep_largest_2d(mask: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
    """Reduce every slice of a 3D boolean mask, in place, to its largest 8-connected part."""
    list(_in_order(pool, lambda z: keep_largest_in_plane(mask[z]), range(mask.shape[0])))


def keep_largest(mask: np.ndarray, connectivity: str = "3d",
                 pool: ThreadPoolExecutor | None = None) -> None:
    """In-place :func:`largest_component` of a boolean 3D mask (no full-size copies).

    ``pool``: threads to label slabs (3D) or slices (2D) side by side.
    """
    if connectivity == "3d":
        _keep_largest_3d(mask, pool=pool)
    else:
        _keep_largest_2d(mask, pool=pool)


def largest_component(mask: np.ndarray, connectivity: str = "3d") -> np.ndarray:
    """Keep the largest connected component of a 3D mask.

    ``"3d"`` uses the 26-neighbourhood over the whole volume; ``"2d"`` the 8-neighbourhood
    in each slice separately (the largest component of every slice is kept).
    """
    out = np.zeros(mask.shape, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return out
    sub = np.array(mask[box], dtype=bool)
    keep_largest(sub, connectivity)
    out[box] = sub
    return out


# 4-connected in-plane, no connection between slices: labelling a volume with it treats each
# slice on its own.
_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)


def _inside_lut(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Background labelled in-plane, and per label whether it is enclosed (label 0: ``mask``).

    None if ``mask`` has no background at all.
    """
    structure = _CROSS_2D if mask.ndim == 2 else _IN_PLANE_CROSS
    labels, n = ndi.label(~mask, structure=structure)
    if n == 0:
        return None
    inside = np.ones(n + 1, dtype=bool)
    for idx in ((..., 0, slice(None)), (..., -1, slice(None)),
                (..., slice(None), 0), (..., slice(None), -1)):
        inside[labels[idx]] = False
    inside[0] = True
    return labels, inside


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes of a 2D mask, or of every slice of a 3D mask (in-plane holes only).

    Equal to ``scipy.ndimage.binary_fill_holes`` per slice, but by labelling the background
    once and keeping what touches the border, which is ~10x faster on 1600 x 1600 slices.
    """
    mask = np.asarray(mask, dtype=bool)
    found = _inside_lut(mask)
    if found is None:
        return mask.copy()
    labels, inside = found
    return inside[labels]


def holes(mask: np.ndarray) -> np.ndarray:
    """``fill_holes(mask) & ~mask`` in one pass: the in-plane holes of ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    found = _inside_lut(mask)
    if found is None:
        return np.zeros(mask.shape, dtype=bool)
    labels, inside = found
    inside[0] = False
    return inside[labels]


def dilate_cross(mask: np.ndarray) -> np.ndarray:
    """Dilation of a 2D mask by the 4-neighbourhood cross (``binary_dilation`` with the cross).

    Shifted ORs of views: several times faster than scipy's generic dilation on big slices.
    """
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _close_ring(cortical: np.ndarray, trabecular: np.ndarray, spacing_yx_mm, max_gap_mm: float
                ) -> tuple[np.ndarray, bool, np.ndarray | None]:
    """Close gaps of a 2D cortical ring.

    Returns (cortex, closed_ok, the cortex with its holes filled if closed_ok else None).
    """
    filled = fill_holes(cortical)
    exposed = trabecular & dilate_cross(~(cortical | trabecular))
    limit = 0.01 * max(1, np.count_nonzero(trabecular))
    if not (exposed.any() or np.count_nonzero(trabecular & ~filled) > limit):
        return cortical, True, filled
    step_mm = max(spacing_yx_mm)
    radius_mm = step_mm
    pad = int(np.ceil(max_gap_mm / min(spacing_yx_mm))) + 2
    padded = np.pad(cortical, pad)
    while radius_mm <= max_gap_mm + 1e-9:
        closed = ndi.binary_closing(padded, structure=disk(radius_mm, spacing_yx_mm))
        closed = closed[pad:-pad, pad:-pad] | cortical
        inside = fill_holes(closed)
        if np.count_nonzero(trabecular & ~inside) <= limit:
            return closed, True, inside
        radius_mm += step_mm
    return cortical, False, None


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
        islands = cort & holes(main)
        cort = cort & ~islands
        trab = trab | islands
    del labels
    cort, ok, filled = _close_ring(cort, trab, spacing_yx_mm, max_gap_mm)
    if not ok:
        # The ring stays open: never discard the network's trabecular bone because of it.
        # Keep it, and add what the bone as a whole encloses.
        return cort, (trab | fill_holes(cort | trab)) & ~cort, False
    return cort, filled & ~cort, ok


def clean_classes(classes: np.ndarray, spacing_mm: tuple[float, float, float],
                  config: PostprocessConfig, *, workers: int = 2,
                  overwrite_input: bool = False) -> tuple[np.ndarray, list[str]]:
    """Apply the clean-up rules to a 5-class label volume ``[z, y, x]``.

    Returns the cleaned uint8 label volume (a new array) and a list of warnings for the user.
    Besides the result, memory stays within boolean masks of the leg's bounding box and
    slab-sized label arrays. ``overwrite_input``: clean a writable uint8 ``classes`` in place
    and return it (the same labels, without a second label volume: 0.43 GB for a full scan);
    other arrays are copied as without it.
    """
    if classes.ndim != 3:
        raise ValueError(f"Expected a 3D label volume, got shape {classes.shape}")
    classes = np.asarray(classes)
    in_place = overwrite_input and classes.dtype == np.uint8 and classes.flags.writeable
    result = classes if in_place else np.zeros(classes.shape, dtype=np.uint8)
    # Everything happens inside the bounding box of the labelled voxels (the leg); on a real
    # scan that is about half of the 1600 x 1600 field, so every pass below costs half.
    box = _bbox(classes if classes.dtype.kind in "ub" else classes > 0)
    if box is None:
        return result, ["The segmentation is empty: no leg was found in the scan."]
    if not in_place:  # in place, the voxels outside the box are already 0
        result[box] = classes[box]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        warnings = _clean_in_place(result[box], spacing_mm, config,
                                   pool if workers > 1 else None)
    return result, warnings


def _parts_touching(parts_mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected parts of ``parts_mask`` (per slice, 8-neighbourhood) that touch
    ``other`` (4-neighbourhood) in their slice."""
    out = np.zeros(parts_mask.shape, dtype=bool)
    for z in np.flatnonzero(parts_mask.any(axis=(1, 2))):
        parts, _ = ndi.label(parts_mask[z], structure=_STRUCT_2D)
        touching = np.unique(parts[parts_mask[z] & dilate_cross(other[z])])
        out[z] = np.isin(parts, touching[touching > 0])
    return out


def _keep_largest_of_bone(out: np.ndarray, bone: Bone, class_boxes: list,
                          config: PostprocessConfig, pool: ThreadPoolExecutor | None
                          ) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """Rule 2 for one bone, in place: each class keeps its largest component, the rest
    becomes soft tissue. Returns the ``(box, kept mask)`` of each class.

    With ``keep_cortical_arcs`` a dropped cortical part that touches the kept marrow in its
    slice stays: a ring broken in two places is two arcs, and the smaller one is still the
    bone's cortex.
    """
    kept = []
    for label in (bone.trabecular, bone.cortical):  # the marrow first: the arcs touch it
        box = class_boxes[label - 1]
        if box is None:
            continue
        view = out[box]
        mask = view == label
        keep = mask.copy()
        keep_largest(keep, config.connectivity, pool)
        if label == bone.cortical and config.keep_cortical_arcs:
            keep |= _parts_touching(mask & ~keep, view == bone.trabecular)
        view[mask & ~keep] = SOFT
        del mask
        kept.append((box, keep))
    return kept


def _clean_in_place(out: np.ndarray, spacing_mm, config: PostprocessConfig,
                    pool: ThreadPoolExecutor | None) -> list[str]:
    warnings: list[str] = []
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    pixel_area_mm2 = spacing_yx[0] * spacing_yx[1]

    # 1. the leg: its largest component; background holes inside it become soft tissue
    leg = out > 0
    keep_largest(leg, config.connectivity, pool)

    def leg_only(z0: int, leg: np.ndarray = leg) -> None:
        slab, leg_slab = out[z0:z0 + SLAB_SLICES], leg[z0:z0 + SLAB_SLICES]
        slab *= leg_slab
        slab[holes(leg_slab)] = SOFT

    list(_in_order(pool, leg_only, range(0, out.shape[0], SLAB_SLICES)))
    del leg, leg_only

    # Boxes of the four bone classes, found in one pass. The bones never overwrite each
    # other's classes below, so each box stays valid until its bone's turn.
    class_boxes = _label_boxes(out, max(max(b.cortical, b.trabecular) for b in BONES), pool)
    for bone in BONES:
        # 2. the largest component of the bone (or of each of its classes)
        kept = _keep_largest_of_bone(out, bone, class_boxes, config, pool)
        voxels = sum(int(np.count_nonzero(keep)) for _, keep in kept)
        if voxels == 0 and config.min_bone_area_mm2 <= 0:
            continue  # nothing of this bone (and no minimum size to report against)
        mean_area_mm2 = voxels * pixel_area_mm2 / max(1, out.shape[0])
        if mean_area_mm2 < config.min_bone_area_mm2:
            for cbox, keep in kept:
                out[cbox][keep] = SOFT
            warnings.append(
                f"The {bone.name} was not found (mean cross-section {mean_area_mm2:.1f} mm2 < "
                f"{config.min_bone_area_mm2} mm2): it may be outside the field of view. Its "
                "regions are empty; check the scan.")
            continue

        # 3-4. per slice: close the cortical ring, enclose the trabecular compartment
        box = _union_box(kept, out.shape, int(np.ceil(config.max_cortical_gap_mm /
                                                      min(spacing_yx))) + 2)
        del kept
        sub = out[box]
        open_slices = []

        def work(z: int, sub=sub, bone=bone) -> bool:
            # Each task reads and writes its own slice only.
            plane = sub[z]
            cort = plane == bone.cortical
            trab = plane == bone.trabecular
            new_cort, new_trab, ok = _clean_bone_slice(cort, trab, spacing_yx,
                                                       config.max_cortical_gap_mm)
            old_bone = cort | trab
            plane[old_bone & ~(new_cort | new_trab)] = SOFT
            other_bone = (plane != 0) & (plane != SOFT) & ~old_bone
            plane[new_trab & ~other_bone] = bone.trabecular
            plane[new_cort & ~other_bone] = bone.cortical
            return ok

        for z, ok in enumerate(_in_order(pool, work, range(sub.shape[0]))):
            if not ok:
                open_slices.append(box[0].start + z)
        if open_slices:
            warnings.append(
                f"The {bone.name}'s cortex stays open in {len(open_slices)} slice(s) (first: "
                f"{open_slices[0]}) after closing gaps up to {config.max_cortical_gap_mm} mm; "
                "check those slices in the Segment Editor.")
    return warnings


def _union_box(parts: list[tuple[tuple[slice, ...], np.ndarray]], shape: tuple[int, ...],
               margin: int) -> tuple[slice, ...]:
    """Bounding box (``margin`` in-plane, clipped to ``shape``) of masks placed at boxes.

    Equal to :func:`_bbox` of the union of the masks drawn into an array of ``shape``.
    """
    lo = [None] * len(shape)
    hi = [None] * len(shape)
    for cbox, mask in parts:
        local = _bbox(mask)
        if local is None:
            continue
        for axis, (outer, inner) in enumerate(zip(cbox, local, strict=True)):
            a, b = outer.start + inner.start, outer.start + inner.stop
            lo[axis] = a if lo[axis] is None else min(lo[axis], a)
            hi[axis] = b if hi[axis] is None else max(hi[axis], b)
    slices = []
    for axis in range(len(shape)):
        pad = margin if axis >= len(shape) - 2 else 0
        slices.append(slice(max(0, lo[axis] - pad), min(shape[axis], hi[axis] + pad)))
    return tuple(slices)


def _label_boxes(labels: np.ndarray, max_label: int, pool: ThreadPoolExecutor | None
                 ) -> list[tuple[slice, ...] | None]:
    """``ndi.find_objects(labels, max_label)``, slab by slab in ``pool``."""
    step = 4 * SLAB_SLICES

    def find(z0: int) -> list:
        return ndi.find_objects(labels[z0:z0 + step], max_label=max_label)

    boxes: list = [None] * max_label
    for z0, found in zip(range(0, labels.shape[0], step),
                         _in_order(pool, find, range(0, labels.shape[0], step)), strict=True):
        for i, box in enumerate(found):
            if box is None:
                continue
            box = (slice(box[0].start + z0, box[0].stop + z0), *box[1:])
            if boxes[i] is None:
                boxes[i] = box
            else:
                boxes[i] = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                                 for a, b in zip(boxes[i], box, strict=True))
    return boxes
