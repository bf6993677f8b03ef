"""The soft-tissue subdivision written into its classes gives the same regions in less memory.

``subdivide_soft_tissue(..., overwrite_input=True)`` (what ``postprocess(...,
overwrite_input=True)`` and so ``hrpqct run`` use) writes the seven regions slab by slab into
the classes it reads, keeping a copy of only the classes of the smoothing's halo slices that
the next slab still reads. Here its regions are compared with the copying call's on the same
input, for every preset, with slabs thinner than the volume and than the halo, legs cut by the
field's edge and a scan without a leg; and its memory with the copying call's, by
``tracemalloc`` (which traces numpy's allocations).
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

import HRpQCTSegmentationEngine.postprocess as postprocess_module
from HRpQCTCore.regions import class_by_name
from HRpQCTSegmentationEngine.postprocess import (
    PAPER,
    PostprocessConfig,
    postprocess,
    subdivide_soft_tissue,
)
from HRpQCTSegmentationEngine.postprocess.soft_tissue import _leg_box, _window_voxels

SOFT = class_by_name("soft_tissue").label
DEFAULT = PostprocessConfig()
#: Each preset, and the default's smoothing off and wider than one slice each side (halo 2
#: at the small phantom's 0.24 mm slices, so that 1-slice slabs keep halos of two slabs).
CONFIGS = {
    "default": DEFAULT,
    "fixed split": DEFAULT.with_fixed_split(),
    "paper": PAPER,
    "no smoothing": replace(DEFAULT, smoothing_window_mm=0.0),
    "wide smoothing": replace(DEFAULT, smoothing_window_mm=1.2),
}


@pytest.fixture(scope="module")
def scan(small_phantom):
    """The small phantom's classes (uint8), HU (float32) and voxel size."""
    return (np.array(small_phantom.classes, dtype=np.uint8),
            np.asarray(small_phantom.scan.hu, dtype=np.float32), small_phantom.scan.spacing_mm)


def _both(classes: np.ndarray, hu: np.ndarray, spacing, config: PostprocessConfig,
          **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The copying call's regions, the in-place call's, and the array it was given."""
    expected = subdivide_soft_tissue(classes, hu, spacing, config, **kwargs)
    work = classes.copy()
    regions = subdivide_soft_tissue(work, hu, spacing, config, overwrite_input=True, **kwargs)
    return expected, regions, work


def test_the_wide_smoothing_has_a_halo_wider_than_a_slab(scan):
    assert _window_voxels(CONFIGS["wide smoothing"].smoothing_window_mm, scan[2])[0] // 2 == 2


@pytest.mark.parametrize("slab_slices", [1, 3, 32])
@pytest.mark.parametrize("name", CONFIGS)
def test_in_place_regions_equal_the_copying_call(scan, name, slab_slices):
    classes, hu, spacing = scan
    expected, regions, work = _both(classes, hu, spacing, CONFIGS[name],
                                    slab_slices=slab_slices)
    assert regions is work  # written into the classes it was given
    np.testing.assert_array_equal(regions, expected)
    assert set(np.unique(expected)) == set(range(8))  # every region was there to get wrong


@pytest.mark.parametrize("name", ["default", "paper", "wide smoothing"])
@pytest.mark.parametrize("crop", [(slice(None), slice(120, None), slice(None, 230)),
                                  (slice(None), slice(None, 200), slice(150, None))],
                         ids=["top-right", "bottom-left"])
def test_legs_cut_by_the_field_edge(scan, name, crop):
    """The leg's box reaches the field's edge, where beyond counts as outside the leg."""
    classes, hu = (np.ascontiguousarray(a[crop]) for a in scan[:2])
    spacing = scan[2]
    rows, cols = (0, -1) if crop[1].start else (-1, 0)  # the two edges the crop cuts
    assert (classes[:, rows] == SOFT).any(axis=1).all()  # in every slice
    assert (classes[:, :, cols] == SOFT).any(axis=1).all()
    expected, regions, work = _both(classes, hu, spacing, CONFIGS[name], slab_slices=2)
    assert regions is work
    np.testing.assert_array_equal(regions, expected)


@pytest.mark.parametrize("name", ["default", "paper"])
def test_a_scan_without_a_leg(scan, name):
    _, hu, spacing = scan
    classes = np.zeros(hu.shape, np.uint8)
    expected, regions, work = _both(classes, hu, spacing, CONFIGS[name], slab_slices=3)
    assert regions is work and not regions.any()
    np.testing.assert_array_equal(regions, expected)


def test_a_leg_in_some_slices_only(scan):
    """Slabs and halos of empty slices next to labelled ones."""
    classes, hu, spacing = scan
    classes = classes.copy()
    classes[:3] = 0
    classes[7:9] = 0
    expected, regions, _ = _both(classes, hu, spacing, CONFIGS["wide smoothing"],
                                 slab_slices=2)
    np.testing.assert_array_equal(regions, expected)


def test_inputs_that_cannot_be_overwritten_are_left_alone(scan):
    classes, hu, spacing = scan
    expected = subdivide_soft_tissue(classes, hu, spacing, DEFAULT, slab_slices=3)
    read_only = classes.copy()
    read_only.flags.writeable = False
    for given in (read_only, classes.astype(np.int16)):
        before = given.copy()
        regions = subdivide_soft_tissue(given, hu, spacing, DEFAULT, slab_slices=3,
                                        overwrite_input=True)
        assert regions is not given and regions.dtype == np.uint8
        np.testing.assert_array_equal(regions, expected)
        np.testing.assert_array_equal(given, before)


class _StagePeak:
    """Wraps :func:`subdivide_soft_tissue` to record the peak of what it allocates (bytes).

    Traced from the call's start only, so the rest of the post-processing runs at full speed
    and the peak is the subdivision's own.
    """

    def __init__(self) -> None:
        self.peaks: list[int] = []

    def __call__(self, *args, **kwargs) -> np.ndarray:
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        try:
            return subdivide_soft_tissue(*args, **kwargs)
        finally:
            self.peaks.append(tracemalloc.get_traced_memory()[1] - start)
            if not was_tracing:
                tracemalloc.stop()


def test_postprocess_in_place_saves_the_box_region_array(scan, monkeypatch):
    """The pipeline's path: the subdivision's peak drops by the box's uint8 region array.

    Three phantoms stacked (36 slices, two slabs of the default 32) so that the halo is kept
    across a slab boundary. One worker: the peak of per-slice temporaries in threads would
    depend on how they overlap.
    """
    classes, hu = (np.concatenate([a] * 3) for a in scan[:2])
    spacing = scan[2]
    stage = _StagePeak()
    monkeypatch.setattr(postprocess_module, "subdivide_soft_tissue", stage)
    copied = postprocess(classes, hu, spacing, DEFAULT, workers=1)
    work = classes.copy()
    in_place = postprocess(work, hu, spacing, DEFAULT, workers=1, overwrite_input=True)
    assert in_place.regions is work
    np.testing.assert_array_equal(in_place.regions, copied.regions)

    box = _leg_box(copied.classes)
    box_bytes = int(np.prod(copied.classes[box].shape))  # the copying call's uint8 regions
    halo = _window_voxels(DEFAULT.smoothing_window_mm, spacing)[0] // 2
    kept_bytes = halo * box_bytes // classes.shape[0]  # the halo slices' classes, in place
    copy_peak, in_place_peak = stage.peaks
    # At most the old and the new kept halo copy live at once beside everything both share.
    assert copy_peak - in_place_peak >= box_bytes - 2 * kept_bytes
    assert in_place_peak < copy_peak - box_bytes // 2
