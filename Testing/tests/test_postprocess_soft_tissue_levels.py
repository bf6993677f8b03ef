"""The soft-tissue split on the scan's own levels: histogram peaks, streaks, slow drift."""

from dataclasses import replace

import numpy as np
import pytest

from HRpQCTCore.regions import class_by_name, region_by_name
from HRpQCTSegmentationEngine.postprocess import DEFAULT, PAPER, PostprocessConfig
from HRpQCTSegmentationEngine.postprocess.soft_tissue import (
    soft_tissue_levels,
    subdivide_soft_tissue,
)
from HRpQCTSegmentationEngine.postprocess.soft_tissue_levels import (
    NOMINAL_FAT_HU,
    NOMINAL_MUSCLE_HU,
    SoftTissueLevels,
    correct_drift,
    estimate_levels,
    suppress_streaks,
)

SOFT = class_by_name("soft_tissue").label
MYO, FAT = region_by_name("myotendinous").label, region_by_name("adipose").label
VOXEL_MM = 0.0607


def _mixture(rng, fat_hu=-110.0, muscle_hu=50.0, tendon_hu=115.0, n=200_000, sd=25.0):
    """Local-mean HU of a leg's inner soft tissue: mostly fat, muscle and some tendon."""
    return np.concatenate([rng.normal(fat_hu, sd, int(n * 0.7)),
                           rng.normal(muscle_hu, sd * 1.5, int(n * 0.22)),
                           rng.normal(tendon_hu, sd, int(n * 0.08))])


@pytest.mark.parametrize(("scale", "offset_hu"), [(1.0, 0.0), (1.0, 150.0), (1.0, -150.0),
                                                   (0.85, 0.0), (0.85, 150.0)])
def test_levels_follow_the_scans_calibration(scale, offset_hu):
    values = _mixture(np.random.default_rng(0)) * scale + offset_hu
    levels = estimate_levels(values)
    assert levels.source == "histogram"
    assert levels.fat_hu == pytest.approx(-110 * scale + offset_hu, abs=6)
    assert -110 * scale + offset_hu + 100 * scale < levels.muscle_hu
    assert levels.muscle_hu < 115 * scale + offset_hu
    # the split sits half-way between the two levels, wherever the calibration put them
    assert levels.split_hu == pytest.approx((levels.fat_hu + levels.muscle_hu) / 2)
    unshifted = estimate_levels(_mixture(np.random.default_rng(0)))
    assert levels.split_hu == pytest.approx(unshifted.split_hu * scale + offset_hu, abs=8)


def test_a_single_tissue_falls_back_to_the_fixed_split():
    # One peak could be fat or muscle: nothing in the histogram says which.
    values = np.random.default_rng(1).normal(40.0, 20.0, 50_000)
    levels = estimate_levels(values, fallback_split_hu=-50.0)
    assert levels.source == "one peak"
    assert levels.split_hu == -50.0
    assert "one tissue only" in levels.describe()


def test_too_few_voxels_are_refused():
    with pytest.raises(ValueError, match="Too few"):
        estimate_levels(np.zeros(10))


def test_seed_windows_map_onto_the_scans_levels():
    levels = SoftTissueLevels(fat_hu=40.0, muscle_hu=200.0, split_hu=120.0, source="histogram")
    assert levels.to_scan_hu(NOMINAL_FAT_HU) == pytest.approx(40.0)
    assert levels.to_scan_hu(NOMINAL_MUSCLE_HU) == pytest.approx(200.0)


def _tissue_slice(rng, size=600):
    """A leg-like slice: fat disk with two muscle ellipses, noise as after a local mean."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    soft = (yy - c) ** 2 + (xx - c) ** 2 < (0.45 * size) ** 2
    muscle = (((yy - 0.35 * size) / 60) ** 2 + ((xx - 0.4 * size) / 110) ** 2 < 1) | (
        ((yy - 0.65 * size) / 90) ** 2 + ((xx - 0.6 * size) / 70) ** 2 < 1)
    muscle &= soft
    clean = np.where(muscle, 50.0, -110.0).astype(np.float32)
    clean[~soft] = -1000.0
    noisy = clean + rng.normal(0, 15, clean.shape).astype(np.float32)
    noisy[~soft] = -1000.0
    return noisy, clean, soft, muscle


def _streaks(shape, degrees=(25.0, 30.0, 35.0), period_mm=0.9, amplitude_hu=50.0):
    """Parallel lines in a narrow fan of directions, as a moved projection block leaves."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32) * VOXEL_MM
    out = np.zeros(shape, np.float32)
    for k, d in enumerate(degrees):
        a = np.radians(d)
        out += np.cos(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period_mm + k)
    return amplitude_hu * out / len(degrees) * 2


def test_streaks_are_scaled_back_and_nothing_else_moves():
    rng = np.random.default_rng(2)
    noisy, _, soft, _ = _tissue_slice(rng)
    streaks = _streaks(noisy.shape)
    streaked = noisy + np.where(soft, streaks, 0)
    out = suppress_streaks(streaked, soft, VOXEL_MM)
    before = np.abs(streaked - noisy)[soft].mean()
    after = np.abs(out - noisy)[soft].mean()
    assert after < 0.4 * before
    np.testing.assert_array_equal(out[~soft], streaked[~soft])  # bone and air untouched


def test_a_slice_without_streaks_comes_back_unchanged():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:600, :600].astype(np.float32)
    soft = (yy - 300) ** 2 + (xx - 300) ** 2 < 270**2
    blobs = (((yy - 200) ** 2 + (xx - 240) ** 2 < 70**2)
             | ((yy - 400) ** 2 + (xx - 360) ** 2 < 80**2))
    image = np.where(blobs, 50.0, -110.0).astype(np.float32) + rng.normal(0, 15, soft.shape)
    image = np.where(soft, image, -1000.0).astype(np.float32)
    np.testing.assert_array_equal(suppress_streaks(image, soft, VOXEL_MM), image)


def test_elongated_tissue_is_barely_touched():
    # Elongated muscles put some power into a sector too; what the equaliser takes from them
    # is a few HU, far below the fat-muscle contrast.
    noisy, _, soft, _ = _tissue_slice(np.random.default_rng(3))
    change = np.abs(suppress_streaks(noisy, soft, VOXEL_MM) - noisy)[soft]
    assert change.max() < 15 and change.mean() < 1.5


def test_slow_drift_is_removed_against_the_tissue_levels():
    rng = np.random.default_rng(4)
    noisy, _, soft, muscle = _tissue_slice(rng)
    ramp = np.linspace(-100, 100, noisy.shape[1], dtype=np.float32)[None, :]  # a broad band
    drifted = noisy + np.where(soft, ramp, 0)
    levels = SoftTissueLevels(-110.0, 50.0, -30.0, "histogram")
    corrected = correct_drift(drifted, soft, levels, (49, 49))
    wrong_before = ((drifted > -30) != muscle)[soft].mean()
    wrong_after = ((corrected > -30) != muscle)[soft].mean()
    assert wrong_before > 0.03
    assert wrong_after < 0.5 * wrong_before


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(("scale", "offset_hu"), [(1.0, 150.0), (1.0, -150.0), (0.85, 0.0)])
def test_the_split_survives_a_calibration_change(small_phantom, scale, offset_hu):
    phantom = small_phantom
    hu = phantom.scan.hu.astype(np.float32)
    spacing = phantom.scan.spacing_mm
    truth = phantom.regions
    shifted = hu * np.float32(scale) + np.float32(offset_hu)
    ours = subdivide_soft_tissue(phantom.classes, shifted, spacing, DEFAULT)
    reference = subdivide_soft_tissue(phantom.classes, hu, spacing, DEFAULT)
    fixed = subdivide_soft_tissue(phantom.classes, shifted, spacing, DEFAULT.with_fixed_split())
    for label in (MYO, FAT):
        # within 0.03 Dice of the unshifted scan, where fixed thresholds collapse
        assert _dice(ours == label, truth == label) > _dice(reference == label,
                                                            truth == label) - 0.03
    worst_fixed = min(_dice(fixed == label, truth == label) for label in (MYO, FAT))
    worst_ours = min(_dice(ours == label, truth == label) for label in (MYO, FAT))
    assert worst_fixed < worst_ours - 0.05


def test_levels_reported_are_the_levels_used(small_phantom):
    phantom = small_phantom
    hu = phantom.scan.hu.astype(np.float32) + np.float32(150.0)
    levels = soft_tissue_levels(phantom.classes, hu, phantom.scan.spacing_mm, DEFAULT)
    assert levels.source == "histogram"
    assert 0 < levels.fat_hu < 100 < levels.muscle_hu  # fat -110 + 150, muscle 50 + 150
    given = subdivide_soft_tissue(phantom.classes, hu, phantom.scan.spacing_mm, DEFAULT,
                                  levels=levels)
    found = subdivide_soft_tissue(phantom.classes, hu, phantom.scan.spacing_mm, DEFAULT)
    np.testing.assert_array_equal(given, found)
    moved = replace(levels, split_hu=levels.split_hu + 60)
    fewer = subdivide_soft_tissue(phantom.classes, hu, phantom.scan.spacing_mm, DEFAULT,
                                  levels=moved)
    assert (fewer == MYO).sum() < (found == MYO).sum()


def test_the_paper_preset_keeps_absolute_thresholds(small_phantom):
    phantom = small_phantom
    assert PAPER.split_levels == "fixed" and not PAPER.streak_suppression
    assert PAPER.drift_window_mm == 0
    levels = soft_tissue_levels(phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm,
                                PAPER)
    assert levels.source == "fixed" and levels.split_hu == PAPER.split_hu


@pytest.mark.parametrize("bad", [{"split_levels": "otsu"}, {"split_fraction": 1.5},
                                 {"drift_window_mm": -1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        PostprocessConfig(**bad)
