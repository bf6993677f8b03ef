"""GLRLM, GLDM and NGTDM of all regions at once equal pyradiomics' own per-region matrices."""

import logging

import numpy as np
import pytest

from HRpQCTRadiomicsEngine.feature_classes import feature_classes_for_one_image
from HRpQCTRadiomicsEngine.texture_matrices import ImageTextures

_CLASSES = ("glrlm", "gldm", "ngtdm")


def _assert_identical(ours: dict, theirs: dict, where: str) -> None:
    assert ours.keys() == theirs.keys(), where
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, tuple):  # e.g. NGTDM's p_zero (numpy.where)
            assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True)), where
            continue
        if np.ndim(expected) == 0:
            assert got == expected or (np.isnan(got) and np.isnan(expected)), (where, key)
            continue
        assert got.shape == expected.shape and got.dtype == expected.dtype, (where, key)
        # same memory layout, so later sums add in the same order (a length-1 axis has no
        # meaningful stride)
        assert [st for st, n in zip(got.strides, got.shape, strict=True) if n > 1] == \
            [st for st, n in zip(expected.strides, expected.shape, strict=True) if n > 1], \
            (where, key)
        assert np.array_equal(got, expected, equal_nan=True), (where, key)  # bit-identical


def _check_image(image, labels: np.ndarray, kwargs: dict, region_labels) -> int:
    """Matrices and coefficients of our classes vs pyradiomics' for every region; count."""
    import SimpleITK as sitk
    from radiomics import getFeatureClasses, imageoperations

    mask = sitk.GetImageFromArray(labels.astype(np.uint32))
    mask.CopyInformation(image)
    regions = {}
    for label in region_labels:
        inside = np.flatnonzero(labels.ravel() == label)
        coords = np.nonzero(labels == label)
        regions[label] = (inside, tuple(int(c.max() - c.min() + 1) for c in coords))
    textures = ImageTextures(sitk.GetArrayViewFromImage(image), regions, kwargs)
    checked = 0
    for label in region_labels:
        bbox, _ = imageoperations.checkMask(image, mask, **dict(kwargs, label=label))
        cropped, cropped_mask = imageoperations.cropToTumorMask(image, mask, bbox)
        ours_classes = feature_classes_for_one_image(textures)
        for name in _CLASSES:
            theirs = getFeatureClasses()[name](cropped, cropped_mask, **dict(kwargs, label=label))
            ours = ours_classes[name](cropped, cropped_mask, **dict(kwargs, label=label))
            theirs._initCalculation()
            ours._initCalculation()
            matrix = f"P_{name}"
            _assert_identical({"P": getattr(ours, matrix), **ours.coefficients},
                              {"P": getattr(theirs, matrix), **theirs.coefficients},
                              f"{name} region {label}")
            checked += 1
    assert textures.covers(region_labels[0])
    return checked


@pytest.mark.filterwarnings("ignore:Applying `local_binary_pattern`:UserWarning")
@pytest.mark.parametrize("preset", ["paper", "complete"])
def test_matrices_of_every_image_equal_pyradiomics(radiomics_scan, preset):
    """Every filtered image of both presets (one-slice volume + force2D, and true 2D)."""
    import SimpleITK as sitk

    from HRpQCTRadiomicsEngine.extraction import _filtered_images
    from HRpQCTRadiomicsEngine.settings import load_settings, settings_for_mode

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    settings = load_settings(preset)
    params = settings_for_mode(settings, "slice")
    s = radiomics_scan
    volume = settings.slice_geometry == "volume"
    hu = s.hu[:1] if volume else s.hu[0]
    labels = s.regions[:1] if volume else s.regions[0]
    image = sitk.GetImageFromArray(hu)
    mask = sitk.GetImageFromArray(labels.astype(np.uint32))
    mask.CopyInformation(image)
    present = [int(v) for v in np.unique(labels) if v and (labels == v).sum() > 16]
    checked = 0
    for filtered, _, image_kwargs in _filtered_images(image, mask, params, None):
        checked += _check_image(filtered, labels, image_kwargs, present)
    assert checked == 3 * len(present) * (10 if volume else 14)


def test_degenerate_regions_and_other_settings(radiomics_scan):
    """A diagonal line (no two voxels on a row: pyradiomics clears run length 1 there), a
    flat region, several distances and a GLDM tolerance."""
    import SimpleITK as sitk

    s = radiomics_scan
    hu = s.hu[0].copy()
    labels = s.regions[0].copy()
    labels[labels == 1] = 0
    for i in range(30):
        labels[5 + i, 10 + i] = 1  # diagonal line
    hu[labels == 3] = 40.0  # one grey level
    image = sitk.GetImageFromArray(hu)
    present = [int(v) for v in np.unique(labels) if v and (labels == v).sum() > 16]
    assert 1 in present and 3 in present
    for extra in ({}, {"distances": [1, 2], "gldm_a": 1}):
        kwargs = {"binWidth": 25, "force2D": False, **extra}
        assert _check_image(image, labels, kwargs, present) == 3 * len(present)


def test_unsupported_geometry_falls_back():
    volume = np.zeros((3, 8, 8), dtype=np.float32)
    regions = {1: (np.arange(4), (1, 2, 2))}
    assert not ImageTextures(volume, regions, {"force2D": False}).covers(1)
    assert not ImageTextures(volume[:1], regions, {"force2D": False}).covers(1)
    assert ImageTextures(volume[:1], regions, {"force2D": True}).covers(1)
    assert not ImageTextures(volume[0], regions, {"voxelBased": True}).covers(1)


@pytest.mark.filterwarnings("ignore:Applying `local_binary_pattern`:UserWarning")
@pytest.mark.parametrize("preset", ["paper", "complete"])
def test_extraction_with_the_shared_pass_equals_direct_pyradiomics(radiomics_scan, monkeypatch,
                                                                   preset):
    """Every feature of every region with the shared pass forced on (on full-size slices it
    is on by itself; on this small crop the regions' boxes do not add up to twice the image)."""
    from _fixtures_radiomics import direct_pyradiomics

    from HRpQCTRadiomicsEngine import extraction
    from HRpQCTRadiomicsEngine.settings import load_settings, settings_for_mode

    used = []
    original = extraction.ImageTextures.covers

    def covers(self, label):
        result = original(self, label)
        used.append(result)
        return result

    monkeypatch.setattr(extraction, "_SHARED_PASS_MIN_GAIN", 0.0)
    monkeypatch.setattr(extraction.ImageTextures, "covers", covers)
    settings = load_settings(preset)
    params = settings_for_mode(settings, "slice")
    s = radiomics_scan
    z = 2
    results = [r for r in extraction.extract_slice_features(s.hu[z], s.regions[z], s.spacing_mm,
                                                            preset) if r.voxel_count]
    assert any(used) and len(results) >= 3
    dz, dy, dx = s.spacing_mm
    for r in results:
        assert r.status == extraction.STATUS_OK
        if settings.slice_geometry == "volume":
            direct = direct_pyradiomics(params, s.hu[z:z + 1], s.regions[z:z + 1],
                                        (dx, dy, dz), r.region_label)
        else:
            direct = direct_pyradiomics(params, s.hu[z], s.regions[z], (dx, dy), r.region_label)
        assert list(r.features) == list(direct)
        differing = [k for k in direct if not (r.features[k] == direct[k]
                                               or (np.isnan(r.features[k])
                                                   and np.isnan(direct[k])))]
        assert differing == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bin_width", [25, 0.5, 3.0])
def test_digitize_equals_numpy_on_pyradiomics_edges(dtype, bin_width):
    """The arithmetic bin guess, corrected against the edges, is numpy.digitize exactly,
    values lying on the edges and at the extremes included."""
    from radiomics import imageoperations

    from HRpQCTRadiomicsEngine.texture_matrices import digitize

    rng = np.random.default_rng(7)
    values = rng.normal(40, 400 * bin_width / 25, size=20_000).astype(dtype)
    extremes = np.array([values.min(), values.max()], dtype=dtype)
    edges = imageoperations.getBinEdges(extremes, binWidth=bin_width)
    on_edges = np.asarray(edges, dtype=dtype)[rng.integers(0, len(edges) - 1, 500)]
    values = np.concatenate([values, on_edges, np.nextafter(on_edges, dtype(-np.inf))])
    assert np.array_equal(digitize(values, edges), np.digitize(values, edges))
    by_count = imageoperations.getBinEdges(values, binWidth=bin_width, binCount=37)
    assert np.array_equal(digitize(values, by_count), np.digitize(values, by_count))


def test_digitize_special_inputs_equal_numpy():
    from HRpQCTRadiomicsEngine.texture_matrices import digitize

    flat = np.full(10, 50.0)
    flat_edges = [49.5, 50.5]  # pyradiomics' edges of a flat region
    assert np.array_equal(digitize(flat, flat_edges), np.digitize(flat, flat_edges))
    with_nan = np.array([1.0, np.nan, 30.0, -5.0])
    edges = np.arange(-25.0, 75.0, 25.0)
    assert np.array_equal(digitize(with_nan, edges), np.digitize(with_nan, edges))
    uneven = np.array([0.0, 1.0, 100.0, 101.0])  # far from even: numpy's search decides
    values = np.linspace(-1, 102, 300)
    assert np.array_equal(digitize(values, uneven), np.digitize(values, uneven))
    assert digitize(np.zeros(0), edges).size == 0
    # integer values and edges (an int16 scan, an integer bin width): compared as integers,
    # values at the type's limits and beyond the last edge included
    info = np.iinfo(np.int16)
    integers = np.concatenate([np.arange(-600, 700, 7), [info.min, info.max]]).astype(np.int16)
    integer_edges = np.arange(-625, 700, 25)
    assert np.array_equal(digitize(integers, integer_edges), np.digitize(integers, integer_edges))
    int64 = np.array([np.iinfo(np.int64).max, 0])
    assert np.array_equal(digitize(int64, integer_edges), np.digitize(int64, integer_edges))
