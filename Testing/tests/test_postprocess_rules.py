"""Each post-processing rule, proved on constructed masks with known answers."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from HRpQCTCore.regions import class_by_name, region_by_name
from HRpQCTSegmentationEngine.postprocess import (
    PAPER,
    PostprocessConfig,
    clean_classes,
    distance_rings,
    postprocess,
    subdivide_soft_tissue,
)

TC, TT = class_by_name("tibial_cortical").label, class_by_name("tibial_trabecular").label
FC, FT = class_by_name("fibular_cortical").label, class_by_name("fibular_trabecular").label
SOFT = class_by_name("soft_tissue").label
SKIN, MYO, FAT = (region_by_name(k).label for k in ("skin", "myotendinous", "adipose"))

# The rules on fixed HU thresholds, as the paper states them (the scan-level split is tested
# in test_postprocess_soft_tissue_levels.py).
RAW = PostprocessConfig(smoothing_window_mm=0.0, seed_growth_mm=0.0).with_fixed_split()
GROWTH = PostprocessConfig(smoothing_window_mm=0.0, seed_growth_mm=0.3).with_fixed_split()


def _disk(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def leg_phantom(n_slices=4, size=200, fibula=True):
    """Soft-tissue disk with a tibia (cortical ring + trabecular core) and a small fibula."""
    plane = np.zeros((size, size), np.uint8)
    plane[_disk(plane.shape, (100, 100), 90)] = SOFT
    plane[_disk(plane.shape, (90, 85), 40)] = TC
    plane[_disk(plane.shape, (90, 85), 32)] = TT
    if fibula:
        plane[_disk(plane.shape, (140, 150), 14)] = FC
        plane[_disk(plane.shape, (140, 150), 9)] = FT
    return np.repeat(plane[None], n_slices, axis=0)


SPACING = (0.1, 0.1, 0.1)


def test_clean_phantom_is_left_unchanged():
    classes = leg_phantom()
    cleaned, warnings = clean_classes(classes, SPACING, PostprocessConfig())
    assert warnings == []
    np.testing.assert_array_equal(cleaned, classes)


@pytest.mark.parametrize("connectivity", ["2d", "3d"])
def test_small_components_are_removed(connectivity):
    classes = leg_phantom()
    classes[:, 170:174, 100:104] = TC  # a speck of "tibial cortex" in the soft tissue
    classes[:, 2:5, 2:5] = SOFT  # soft tissue floating in the air
    cleaned, _ = clean_classes(classes, SPACING, PostprocessConfig(connectivity=connectivity))
    assert (cleaned[:, 170:174, 100:104] == SOFT).all()
    assert (cleaned[:, 2:5, 2:5] == 0).all()
    np.testing.assert_array_equal(cleaned, leg_phantom())


def test_3d_connectivity_keeps_what_connects_through_neighbouring_slices_2d_does_not():
    classes = leg_phantom(n_slices=2)
    classes[0, 150:175, 150:160] = FC  # slice 0: fibular cortex runs down to a fragment
    classes[1, 165:175, 150:160] = FC  # slice 1: the fragment alone
    cleaned3d, _ = clean_classes(classes, SPACING, PostprocessConfig(connectivity="3d"))
    cleaned2d, _ = clean_classes(classes, SPACING, PostprocessConfig(connectivity="2d"))
    assert (cleaned3d[1, 165:175, 150:160] == FC).all()
    assert (cleaned2d[1, 165:175, 150:160] == SOFT).all()


def test_cortical_gap_is_closed_and_marrow_enclosed():
    classes = leg_phantom(n_slices=2)
    # A 4-voxel (0.4 mm) gap through the tibial cortex, predicted as trabecular/soft tissue.
    classes[:, 48:60, 83:87] = SOFT
    classes[:, 58:66, 83:87] = TT
    cleaned, warnings = clean_classes(classes, SPACING, PostprocessConfig(max_cortical_gap_mm=0.8))
    assert warnings == []
    plane = cleaned[0]
    # The ring is closed again: filling it encloses the whole original trabecular core.
    from scipy import ndimage as ndi

    ring = plane == TC
    assert ndi.binary_fill_holes(ring)[_disk(plane.shape, (90, 85), 32)].all()
    assert (plane[_disk(plane.shape, (90, 85), 30)] == TT).all()


def _ring_broken_in_two():
    """The phantom's tibial cortex cut at 9 and at 12 o'clock (the cuts called marrow): a
    quarter arc and a three-quarter arc."""
    classes = leg_phantom(n_slices=2)
    ring = np.isin(classes, (TC,))
    cuts = np.zeros(classes.shape, bool)
    cuts[:, 88:92, :85] = True  # 9 o'clock
    cuts[:, :90, 83:87] = True  # 12 o'clock
    classes[ring & cuts] = TT
    quarter = ring & ~cuts
    quarter[:, 88:, :] = False
    quarter[:, :, 83:] = False
    return classes, quarter


def test_the_smaller_arc_of_a_ring_broken_in_two_stays_cortex():
    classes, quarter = _ring_broken_in_two()
    cleaned, warnings = clean_classes(classes, SPACING, PostprocessConfig())
    assert quarter.sum() > 200
    assert (cleaned[quarter] == TC).all()
    assert warnings == []  # the cuts (0.4 mm) are closed: the ring is whole again
    for plane in cleaned:
        assert ndi.binary_fill_holes(plane == TC)[_disk(plane.shape, (90, 85), 32)].all()
        assert (plane[_disk(plane.shape, (90, 85), 30)] == TT).all()


def test_the_paper_rule_drops_the_smaller_arc_and_a_loose_cortical_speck_goes_either_way():
    classes, quarter = _ring_broken_in_two()
    classes[:, 170:174, 100:104] = TC  # cortex that touches no marrow
    paper_rule = replace(PostprocessConfig(), keep_cortical_arcs=False)
    dropped, _ = clean_classes(classes, SPACING, paper_rule)
    kept, _ = clean_classes(classes, SPACING, PostprocessConfig())
    assert not (dropped[quarter] == TC).any()
    assert not PAPER.keep_cortical_arcs
    assert any("open" in w for w in clean_classes(classes, SPACING, paper_rule)[1])
    for cleaned in (dropped, kept):
        assert (cleaned[:, 170:174, 100:104] == SOFT).all()


def test_unclosable_gap_gives_a_warning_not_an_error():
    classes = leg_phantom(n_slices=1)
    classes[:, 40:70, 70:100] = SOFT  # a 3 mm wide hole through the cortex
    _, warnings = clean_classes(classes, SPACING, PostprocessConfig(max_cortical_gap_mm=0.3))
    assert any("open" in w for w in warnings)


def test_soft_tissue_predicted_in_the_marrow_becomes_trabecular():
    classes = leg_phantom()
    classes[:, 85:95, 80:90] = SOFT
    cleaned, _ = clean_classes(classes, SPACING, PostprocessConfig())
    assert (cleaned[:, 85:95, 80:90] == TT).all()


def test_missing_fibula_is_a_warning_and_leaves_it_empty():
    classes = leg_phantom(fibula=False)
    classes[:, 140:141, 150:151] = FC  # a one-voxel speck is not a fibula
    cleaned, warnings = clean_classes(classes, SPACING, PostprocessConfig())
    assert any("fibula was not found" in w for w in warnings)
    assert not np.isin(cleaned, (FC, FT)).any()


@pytest.mark.parametrize("pixel_mm", [0.0607, 0.082])
def test_skin_band_is_two_mm_wide_whatever_the_spacing(pixel_mm):
    size = 400
    classes = np.zeros((1, size, size), np.uint8)
    radius_px = 150
    classes[0][_disk((size, size), (200, 200), radius_px)] = SOFT
    hu = np.full(classes.shape, 40.0, np.float32)
    regions = subdivide_soft_tissue(classes, hu, (pixel_mm, pixel_mm, pixel_mm), RAW)
    # Along a radius, the skin band spans from the surface inwards by 2 mm.
    profile = regions[0, 200, 200:]
    skin_px = np.count_nonzero(profile == SKIN)
    assert abs(skin_px * pixel_mm - 2.0) <= pixel_mm * 1.01
    # Everything else of the leg is myotendinous (40 HU > -50 HU, no seeds).
    assert set(np.unique(regions[0][classes[0] == SOFT])) == {SKIN, MYO}


def test_minus_fifty_split_without_seeds():
    classes = np.zeros((1, 200, 200), np.uint8)
    classes[0][_disk((200, 200), (100, 100), 90)] = SOFT
    hu = np.full(classes.shape, -49.0, np.float32)
    hu[:, :, 100:] = -51.0
    regions = subdivide_soft_tissue(classes, hu, SPACING, RAW)
    inner = regions[0][_disk((200, 200), (100, 100), 60)]
    left = regions[0][:, :100][_disk((200, 200), (100, 100), 60)[:, :100]]
    assert set(np.unique(inner)) == {MYO, FAT}
    assert (left == MYO).all()


def test_seeds_grow_across_the_split_threshold_by_the_growth_distance():
    classes = np.zeros((1, 200, 200), np.uint8)
    classes[0][_disk((200, 200), (100, 100), 90)] = SOFT
    hu = np.full(classes.shape, -100.0, np.float32)  # below -50: adipose by the split rule
    hu[0, 95:105, 95:105] = 300.0  # a tendon seed
    no_growth = subdivide_soft_tissue(classes, hu, SPACING, RAW)
    grown = subdivide_soft_tissue(
        classes, hu, SPACING, GROWTH)
    assert no_growth[0, 100, 106] == FAT
    # 0.3 mm = 3 voxels of growth (4-neighbourhood steps) from the seed's edge
    assert (grown[0, 100, 105:108] == MYO).all()
    assert grown[0, 100, 108] == FAT
    # fat seeds stop tendon growth where they meet: a fat seed right next to the tendon seed
    hu[0, 100, 105] = -400.0
    contested = subdivide_soft_tissue(
        classes, hu, SPACING, GROWTH)
    assert contested[0, 100, 105] == FAT


def test_seed_windows_are_closed_intervals():
    classes = np.zeros((1, 100, 100), np.uint8)
    classes[0][_disk((100, 100), (50, 50), 45)] = SOFT
    hu = np.full(classes.shape, 0.0, np.float32)  # no seeds anywhere
    one_step = PostprocessConfig(smoothing_window_mm=0.0, seed_growth_mm=0.1).with_fixed_split()
    hu[0, 50, 50], hu[0, 50, 51] = 100.0, -60.0  # seed at the window's edge grows
    hu[0, 40, 50], hu[0, 40, 51] = 600.5, -60.0  # just outside the window: no seed
    hu[0, 60, 50], hu[0, 60, 51] = -200.0, 0.0  # fat seed at the window's edge grows
    regions = subdivide_soft_tissue(classes, hu, SPACING, one_step)
    assert regions[0, 50, 51] == MYO
    assert regions[0, 40, 50] == MYO and regions[0, 40, 51] == FAT
    assert regions[0, 60, 51] == FAT


def test_smoothing_reduces_speckle_in_noisy_fat():
    rng = np.random.default_rng(0)
    classes = np.zeros((3, 200, 200), np.uint8)
    classes[:, _disk((200, 200), (100, 100), 90)] = SOFT
    hu = (-100 + 150 * rng.standard_normal(classes.shape)).astype(np.float32)
    inner = _disk((200, 200), (100, 100), 60)
    raw = subdivide_soft_tissue(classes, hu, SPACING, PAPER)
    smooth = subdivide_soft_tissue(classes, hu, SPACING,
                                   PostprocessConfig(smoothing_window_mm=0.6).with_fixed_split())
    raw_fat = np.mean(raw[1][inner] == FAT)
    smooth_fat = np.mean(smooth[1][inner] == FAT)
    assert raw_fat < 0.8
    assert smooth_fat > 0.97


def test_thin_bright_lines_in_fat_are_opened_away_and_muscle_is_kept():
    # Fat with a muscle belly (3 mm square) and a bright line 0.3 mm wide, as a motion streak
    # leaves one: the opening turns the line into adipose and keeps the belly whole.
    classes = np.zeros((1, 200, 200), np.uint8)
    classes[0][_disk((200, 200), (100, 100), 95)] = SOFT
    hu = np.where(classes == SOFT, -100.0, -1000.0).astype(np.float32)
    hu[0, 60:90, 60:90] = 50.0  # the belly
    hu[0, 120:123, 40:160] = 150.0  # the streak, 3 voxels of 0.1 mm
    config = PostprocessConfig(smoothing_window_mm=0.0).with_fixed_split()
    opened = replace(config, myotendinous_opening_mm=0.4)
    before = subdivide_soft_tissue(classes, hu, SPACING, config)[0]
    after = subdivide_soft_tissue(classes, hu, SPACING, opened)[0]
    assert (before[120:123, 40:160] == MYO).all()  # the split alone calls the line muscle
    assert (after[120:123, 40:160] == FAT).all()
    assert (after[60:90, 60:90] == MYO).all() and (after == MYO).sum() == 900
    # a line as wide as the square (0.5 mm: 5 voxels) stays
    hu[0, 120:125, 40:160] = 150.0
    assert (subdivide_soft_tissue(classes, hu, SPACING, opened)[0][120:125, 40:160] == MYO).all()


def test_the_opening_is_off_in_the_paper_rules():
    assert PAPER.myotendinous_opening_mm == 0
    assert PostprocessConfig().with_fixed_split().myotendinous_opening_mm == 0
    assert PostprocessConfig().myotendinous_opening_mm == 0.4
    with pytest.raises(ValueError, match="myotendinous_opening_mm"):
        PostprocessConfig(myotendinous_opening_mm=-1.0)


def test_distance_rings_have_the_requested_radii():
    classes = np.zeros((1, 400, 400), np.uint8)
    classes[0][_disk((400, 400), (200, 200), 190)] = SOFT
    classes[0][_disk((400, 400), (200, 200), 50)] = TC
    classes[0][_disk((400, 400), (200, 200), 40)] = TT
    rings = distance_rings(classes, SPACING, (2.0, 5.0, 10.0))
    profile = rings[0, 200, 251:]
    # distances from the tibia surface (radius 50 px) in 0.1 mm pixels
    assert profile[0] == 1 and profile[19] == 1 and profile[20] == 2
    assert profile[49] == 2 and profile[50] == 3 and profile[99] == 3 and profile[100] == 0
    assert not rings[classes != SOFT].any()


def test_postprocess_end_to_end_returns_seven_regions_and_rejects_region_maps():
    classes = leg_phantom()
    hu = np.where(classes == SOFT, 40.0, 1500.0).astype(np.float32)
    result = postprocess(classes, hu, SPACING, with_rings=True)
    assert result.regions.dtype == np.uint8
    assert set(np.unique(result.regions)) == {0, TC, TT, FC, FT, SKIN, MYO, FAT}
    # Muscle-level tissue is myotendinous except where the opening's square cannot reach:
    # a few voxels in the staircase of the small fibula's digital circle.
    fat = result.regions == FAT
    assert fat.sum() < 2e-3 * (result.regions == MYO).sum()
    near_bone = ndi.binary_dilation(np.isin(result.regions, (FC, FT, TC, TT)),
                                    iterations=4)  # closer than the square's side (5)
    assert near_bone[fat].all()
    plain = postprocess(classes, hu, SPACING, PostprocessConfig(myotendinous_opening_mm=0.0))
    assert set(np.unique(plain.regions)) == {0, TC, TT, FC, FT, SKIN, MYO}
    assert result.rings is not None and result.rings.max() >= 1
    with pytest.raises(ValueError, match="5-class"):
        postprocess(np.full((1, 4, 4), 7, np.uint8), np.zeros((1, 4, 4), np.float32), SPACING)


def test_an_unclosable_cortex_never_loses_the_trabecular_bone():
    classes = leg_phantom(n_slices=1)
    classes[:, 40:70, 70:100] = SOFT  # a 3 mm hole through the cortex and into the marrow
    before = classes == TT
    cleaned, warnings = clean_classes(classes, SPACING, PostprocessConfig(max_cortical_gap_mm=0.3))
    assert any("open" in w for w in warnings)
    assert (cleaned[before] == TT).all()
