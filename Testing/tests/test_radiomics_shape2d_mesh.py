"""The 2D mesh perimeter and surface equal pyradiomics' C values bit for bit."""

import numpy as np
import pytest
from scipy import ndimage

from HRpQCTRadiomicsEngine.shape2d_mesh import mesh_perimeter_surface


def _assert_same_as_c(mask: np.ndarray, spacing) -> None:
    from radiomics import cShape

    perimeter, surface, _ = cShape.calculate_coefficients2D(mask, np.asarray(spacing))
    assert mesh_perimeter_surface(mask, spacing) == (perimeter, surface)  # identical


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_with_saddles_and_holes(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        h, w = rng.integers(1, 70, 2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)  # many saddle cells
        if seed % 2:
            mask = ndimage.binary_opening(mask) | (rng.random((h, w)) < 0.03)
        mask[rng.integers(h), rng.integers(w)] = True
        _assert_same_as_c(np.pad(mask, 1), rng.uniform(0.02, 2.0, 2))


def test_annulus_like_soft_tissue_and_single_pixel():
    yy, xx = np.mgrid[:300, :260]
    radius = np.hypot((yy - 150) / 1.1, xx - 130)
    annulus = (radius > 95) & (radius < 110)
    _assert_same_as_c(np.pad(annulus, 1), (0.0607, 0.0607))
    _assert_same_as_c(np.pad(np.ones((1, 1), bool), 1), (0.0607, 0.0607))


def test_prediction_mode_shape_values_equal_pyradiomics():
    """Perimeter asked for without the diameter, and both: the same values either way."""
    import SimpleITK as sitk
    from radiomics.shape2D import RadiomicsShape2D

    from HRpQCTRadiomicsEngine.feature_classes import shape_class

    yy, xx = np.mgrid[:120, :100]
    mask = ((np.hypot(yy - 60, xx - 50) < 40) & (np.hypot(yy - 55, xx - 45) > 12))
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    label = sitk.GetImageFromArray(mask.astype(np.uint32))
    for img in (image, label):
        img.SetSpacing((0.0607, 0.0607))
    theirs = RadiomicsShape2D(image, label)
    theirs.enableAllFeatures()
    expected = theirs.execute()
    for names in (["Perimeter", "Sphericity"], ["Perimeter", "MaximumDiameter", "MeshSurface"]):
        ours = shape_class("shape2D")(image, label)
        for name in names:
            ours.enableFeatureByName(name)
        got = ours.execute()
        assert {k: got[k] for k in names} == {k: expected[k] for k in names}
