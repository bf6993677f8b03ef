"""Post-processing: clean the network's five classes and split soft tissue into seven regions.

Entry point: :func:`postprocess`. Settings: :class:`PostprocessConfig` (presets ``PAPER`` and
``DEFAULT``). Bone rules live in :mod:`.bone`, the refinement of the skin and periosteal
surfaces to the scan's HU edges in :mod:`.surfaces`, soft-tissue rules and distance rings in
:mod:`.soft_tissue`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTSegmentationEngine.postprocess.bone import clean_classes
from HRpQCTSegmentationEngine.postprocess.config import DEFAULT, PAPER, PostprocessConfig, preset
from HRpQCTSegmentationEngine.postprocess.soft_tissue import (
    _leg_box,
    distance_rings,
    soft_tissue_levels,
    subdivide_soft_tissue,
)
from HRpQCTSegmentationEngine.postprocess.soft_tissue_levels import SoftTissueLevels
from HRpQCTSegmentationEngine.postprocess.surfaces import refine_surfaces

log = logging.getLogger(__name__)

__all__ = ["DEFAULT", "PAPER", "PostprocessConfig", "PostprocessResult", "postprocess",
           "preset", "clean_classes", "refine_surfaces", "subdivide_soft_tissue",
           "distance_rings"]


@dataclass
class PostprocessResult:
    """What :func:`postprocess` returns.

    Attributes
    ----------
    regions:
        7-region label volume (uint8), the input's shape.
    classes:
        Cleaned 5-class label volume (uint8); None after ``overwrite_input`` (the regions
        took its place).
    rings:
        Soft-tissue distance-ring index volume (see :func:`distance_rings`) or None.
    warnings:
        Messages a reader must see (missing fibula, open cortex, ...).
    soft_tissue_levels:
        The scan's fat and muscle levels and the myotendinous/adipose split that was used.
    """

    regions: np.ndarray
    classes: np.ndarray | None
    rings: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    soft_tissue_levels: SoftTissueLevels | None = None


def postprocess(classes: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float, float],
                config: PostprocessConfig | None = None, *, with_rings: bool = False,
                workers: int = 2, overwrite_input: bool = False,
                progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> PostprocessResult:
    """Clean a 5-class prediction and subdivide soft tissue into the 7 regions.

    Parameters
    ----------
    classes:
        Network prediction ``[z, y, x]`` with values 0..5.
    hu:
        The scan in HU on the same grid.
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    config:
        Settings; default :data:`DEFAULT`.
    with_rings:
        Also compute the soft-tissue distance rings around the tibia.
    overwrite_input:
        Use ``classes`` (a writable uint8 array, which the caller no longer needs) as the
        work's memory: it is cleaned in place, then overwritten by the seven regions, which
        ``regions`` returns (``classes`` is then None). The same regions, without two more
        label volumes (0.86 GB for a full 168 x 1600 x 1600 scan) nor the leg box's region
        array during the soft-tissue subdivision (about 0.2 GB more).

    Raises
    ------
    ValueError
        Labels and image of different shapes, or labels beyond the five classes.
    InvalidScanError
        If the work cannot fit in memory (estimated first; usually a wrong voxel size).
    """
    config = config or DEFAULT
    classes = np.asarray(classes)
    if classes.ndim != 3 or hu.shape != classes.shape:
        raise ValueError(
            f"Expected 3D labels and image of one shape, got {classes.shape} and {hu.shape}")
    if classes.size and classes.max() > 5:
        raise ValueError(
            f"Label values up to {classes.max()} found: post-processing takes the network's "
            "5-class map (0..5), not a 7-region map")
    from HRpQCTSegmentationEngine.limits import require_segmentation_memory

    # before the first mm-sized structuring element: a wrong voxel size makes them huge
    require_segmentation_memory(classes.shape, spacing_mm, config, segment=False)
    report(progress, 0, 4, "post-processing")
    cleaned, warnings = clean_classes(classes, spacing_mm, config, workers=workers,
                                      overwrite_input=overwrite_input)
    del classes  # in place it is `cleaned`; else the caller's
    for message in warnings:
        log.warning(message)
    check(cancel)
    report(progress, 1, 4, "post-processing")
    refine_surfaces(cleaned, hu, spacing_mm, config, workers=workers, cancel=cancel)
    check(cancel)
    report(progress, 2, 4, "post-processing")
    levels = soft_tissue_levels(cleaned, hu, spacing_mm, config, workers=workers)
    log.info("%s", levels.describe())
    if levels.source == "one peak":
        warnings.append(levels.describe())
    rings = None
    if with_rings:  # before the subdivision: in place, it overwrites the classes rings read
        check(cancel)
        rings = distance_rings(cleaned, spacing_mm, config.ring_radii_mm, workers=workers)
    # `cleaned` is a writable uint8 array of ours after `overwrite_input` (the input or
    # clean_classes' copy of it), so the subdivision always writes into it then.
    box, regions = _soft_tissue_in_leg_box(cleaned, hu, spacing_mm, config, levels, workers,
                                           cancel, overwrite_input)
    report(progress, 3, 4, "post-processing")
    if overwrite_input:
        regions = cleaned  # the box's regions are in it; outside the box it is 0
    elif box is not None:
        # Outside the leg's box there are no labels: the box's regions complete the volume.
        inner, regions = regions, np.zeros(cleaned.shape, np.uint8)
        regions[box] = inner
        del inner
    report(progress, 4, 4, "post-processing")
    return PostprocessResult(regions=regions, classes=None if overwrite_input else cleaned,
                             rings=rings, warnings=warnings, soft_tissue_levels=levels)


def _soft_tissue_in_leg_box(cleaned: np.ndarray, hu: np.ndarray,
                            spacing_mm: tuple[float, float, float], config: PostprocessConfig,
                            levels: SoftTissueLevels, workers: int, cancel: CancelToken | None,
                            overwrite_input: bool = False
                            ) -> tuple[tuple[slice, ...] | None, np.ndarray]:
    """:func:`subdivide_soft_tissue` of the leg's box: ``(box, its regions)``.

    The subdivision itself works only inside this box (all slices, the in-plane bounding box
    of the labels with its margin), so giving it the box alone gives the same labels there,
    in an array of the box's size instead of the scan's (about a third of it), or, with
    ``overwrite_input``, in ``cleaned`` itself (the regions are then a view of its box).
    ``box`` is None when there are no labels: the regions are then the whole volume's.
    """
    box = _leg_box(cleaned)
    where = (slice(None),) * cleaned.ndim if box is None else box
    return box, subdivide_soft_tissue(cleaned[where], hu[where], spacing_mm, config,
                                      levels=levels, workers=workers,
                                      overwrite_input=overwrite_input, cancel=cancel)
