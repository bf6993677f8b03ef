"""The engine's GLCM coefficients and MCC are bit-identical to pyradiomics' own methods."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from HRpQCTRadiomicsEngine.glcm_coefficients import calculate_glcm_coefficients, mcc_feature_value


def _both(p_glcm: np.ndarray, gray_levels: np.ndarray) -> tuple[dict, dict]:
    from radiomics.glcm import RadiomicsGLCM

    def holder():
        return SimpleNamespace(P_glcm=p_glcm.copy(), logger=logging.getLogger("test"),
                               coefficients={"grayLevels": gray_levels.copy(),
                                             "Ng": int(gray_levels.max())})

    theirs, ours = holder(), holder()
    RadiomicsGLCM._calculateCoefficients(theirs)
    calculate_glcm_coefficients(ours)
    return ours.coefficients, theirs.coefficients


def _assert_same_mcc(p_glcm: np.ndarray, gray_levels: np.ndarray) -> None:
    from radiomics.glcm import RadiomicsGLCM

    holder = SimpleNamespace(P_glcm=p_glcm, logger=logging.getLogger("test"),
                             coefficients={"grayLevels": gray_levels, "Ng": int(gray_levels.max())})
    RadiomicsGLCM._calculateCoefficients(holder)
    theirs = RadiomicsGLCM.getMCCFeatureValue(holder)
    ours = mcc_feature_value(holder)
    assert np.shape(ours) == np.shape(theirs)
    assert np.array_equal(ours, theirs, equal_nan=True)  # bit-identical, not close


def _assert_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        got = ours[key]
        if np.ndim(expected) == 0:
            assert got == expected, key
            continue
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        assert got.strides == expected.strides, key  # later reductions add in the same order
        assert np.array_equal(got, expected, equal_nan=True), key  # bit-identical, not close


@pytest.mark.parametrize("seed", range(4))
def test_random_glcms_with_missing_levels(seed):
    rng = np.random.default_rng(seed)
    n_levels = int(rng.integers(1, 160))
    levels = np.sort(rng.choice(np.arange(1, 220), size=n_levels, replace=False))
    counts = rng.poisson(rng.uniform(0.2, 30), size=(1, n_levels, n_levels, 4)).astype(float)
    counts += counts.transpose(0, 2, 1, 3)
    counts[..., 0] += 1  # no empty angle
    p_glcm = counts / counts.sum((1, 2), keepdims=True)
    _assert_identical(*_both(p_glcm, levels))
    _assert_same_mcc(p_glcm[:, :80, :80], levels[:80])  # (MCC of real images: extraction tests)


@pytest.mark.parametrize(("n_v", "n_angles"), [(1, 1), (2, 1), (1, 2), (3, 13)])
def test_angle_and_voxel_counts(n_v, n_angles):
    """One angle (weighting, tiny regions), 3D angles, voxel-based (several GLCMs)."""
    rng = np.random.default_rng(n_v * 100 + n_angles)
    for _ in range(5):
        n_levels = int(rng.integers(20, 60))
        levels = np.sort(rng.choice(np.arange(1, 220), size=n_levels, replace=False))
        values = rng.random((n_v, n_levels, n_levels, n_angles))
        values += values.transpose(0, 2, 1, 3)
        p_glcm = values / values.sum((1, 2), keepdims=True)
        _assert_identical(*_both(p_glcm, levels))
        _assert_same_mcc(p_glcm, levels)


def test_mcc_of_flat_and_two_level_regions():
    _assert_same_mcc(np.ones((1, 1, 1, 4)), np.array([3]))
    two = np.array([[[[0.5, 0.0]], [[0.25, 0.5]]], [[[0.25, 0.5]], [[0.0, 0.0]]]])
    _assert_same_mcc(two.reshape(1, 2, 2, 2), np.array([1, 4]))


def test_glcms_of_the_paper_images(radiomics_scan):
    """Real GLCMs: every image of the paper preset, two regions, from pyradiomics itself."""
    import SimpleITK as sitk
    from radiomics import imageoperations
    from radiomics.glcm import RadiomicsGLCM

    from HRpQCTRadiomicsEngine.extraction import _filtered_images
    from HRpQCTRadiomicsEngine.settings import load_settings, settings_for_mode

    s = radiomics_scan
    params = settings_for_mode(load_settings("paper"), "slice")
    image = sitk.GetImageFromArray(s.hu[:1])
    mask = sitk.GetImageFromArray(s.regions[:1].astype(np.uint32))
    mask.CopyInformation(image)
    checked = 0
    for label in (3, 7):
        kwargs = dict(params["setting"], label=label)
        bbox, _ = imageoperations.checkMask(image, mask, **kwargs)
        for filtered, _, image_kwargs in _filtered_images(image, mask, params, None):
            cropped, cropped_mask = imageoperations.cropToTumorMask(filtered, mask, bbox)
            glcm = RadiomicsGLCM(cropped, cropped_mask, **dict(image_kwargs, label=label))
            glcm.P_glcm = glcm._calculateMatrix()
            _assert_identical(*_both(glcm.P_glcm, glcm.coefficients["grayLevels"]))
            checked += 1
    assert checked == 20


@pytest.mark.parametrize("n_angles", [1, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_cluster_features_bit_identical(seed, n_angles):
    """Tendency, shade and prominence with the power taken once per i + j, as pyradiomics'."""
    from radiomics.glcm import RadiomicsGLCM

    from HRpQCTRadiomicsEngine.glcm_coefficients import cluster_feature_value

    rng = np.random.default_rng(100 + seed)
    n_levels = int(rng.integers(1, 140))
    levels = np.sort(rng.choice(np.arange(1, 400), size=n_levels, replace=False))
    counts = rng.poisson(rng.uniform(0.2, 5), size=(1, n_levels, n_levels, n_angles)).astype(float)
    counts[0, 0, 0, :] += 1  # no empty angle
    p_glcm = counts / counts.sum((1, 2), keepdims=True)
    holder = SimpleNamespace(P_glcm=p_glcm, logger=logging.getLogger("test"),
                             coefficients={"grayLevels": levels, "Ng": int(levels.max())})
    # both coefficient paths: pyradiomics' own (one angle) and the engine's
    (RadiomicsGLCM._calculateCoefficients if n_angles == 1 else calculate_glcm_coefficients)(
        holder)
    for power, name in ((2, "Tendency"), (3, "Shade"), (4, "Prominence")):
        theirs = getattr(RadiomicsGLCM, f"getCluster{name}FeatureValue")(holder)
        ours = cluster_feature_value(holder, power)
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs, equal_nan=True), name  # bit-identical
