"""Prediction mode (``features=``): every value equal (==) to the full extraction's.

Prediction mode computes each (image, region) pair on the region's own box and voxels
(:mod:`HRpQCTRadiomicsEngine.region_images`, :mod:`HRpQCTRadiomicsEngine.region_matrices`),
only the wavelet decompositions asked for, and first-order binning and the shape mesh only
when read. These tests compare it with the full extraction (itself compared with direct
pyradiomics calls in ``test_radiomics_extraction``) on a whole slice, whose soft-tissue
regions are annuli with boxes much larger than themselves.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from HRpQCTRadiomicsEngine.extraction import STATUS_OK, extract_features, extract_slice_features

pytestmark = pytest.mark.filterwarnings("ignore:Applying `local_binary_pattern`:UserWarning")


@pytest.fixture(scope="module")
def whole_slice():
    """One whole 400 x 400 slice (0.24 mm) of a phantom: all seven regions, full annuli."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    phantom = generate_phantom(PhantomParams(n_slices=1, field_px=400, voxel_mm=0.0607 * 4),
                               seed=2)
    return (np.ascontiguousarray(phantom.scan.hu, dtype=np.float32), phantom.regions,
            tuple(phantom.scan.spacing_mm))


@pytest.fixture(scope="module")
def full_tables(whole_slice):
    """The full extraction of both presets (every feature of every region)."""
    hu, regions, spacing = whole_slice
    return {preset: extract_features(hu, regions, spacing, settings=preset, n_jobs=1)
            for preset in ("paper", "complete")}


def _assert_equal_to_full(table, full, request) -> None:
    """Every requested value == the full extraction's, in the full extraction's order."""
    full_rows = {(r.slice_index, r.region_label): r for r in full.rows}
    assert len(table.rows) == len(request)
    for row in table.rows:
        reference = full_rows[row.slice_index, row.region_label]
        assert (row.status, row.reason, row.voxel_count) == (
            reference.status, reference.reason, reference.voxel_count)
        if row.status != STATUS_OK:
            continue
        wanted = [n for n in reference.features if n in request[row.region_label]]
        assert list(row.features) == wanted  # nothing else, pyradiomics' order
        assert row.features == {n: reference.features[n] for n in wanted}


def _bundled_classifier_request() -> dict[int, list[str]]:
    import HRpQCTRadiomicsEngine
    from HRpQCTRadiomicsEngine.prediction import features_by_region

    path = (Path(HRpQCTRadiomicsEngine.__file__).parent / "resources"
            / "osteoporosis-soft-tissue.classifier.json")
    return features_by_region(json.loads(path.read_text())["features"])


@pytest.mark.parametrize("preset", ["paper", "complete"])
def test_bundled_classifier_features_equal_full_extraction(whole_slice, full_tables, preset):
    hu, regions, spacing = whole_slice
    request = _bundled_classifier_request()
    table = extract_features(hu, regions, spacing, settings=preset, features=request, n_jobs=1)
    _assert_equal_to_full(table, full_tables[preset], request)


@pytest.mark.parametrize("preset", ["paper", "complete"])
@pytest.mark.parametrize("step", [7, 23])
def test_spread_feature_lists_equal_full_extraction(whole_slice, full_tables, preset, step):
    """Every step-th feature of each region (offset by the label): all images, all classes."""
    hu, regions, spacing = whole_slice
    full = full_tables[preset]
    request = {label: full.feature_names[label::step] for label in range(1, 8)}
    touched = {n.split("_")[1] for names in request.values() for n in names}
    assert {"firstorder", "glcm", "glszm", "glrlm", "ngtdm", "gldm"} <= touched
    table = extract_features(hu, regions, spacing, settings=preset, features=request, n_jobs=1)
    _assert_equal_to_full(table, full, request)


@pytest.mark.parametrize("image", ["original", "wavelet-HH", "wavelet-LL", "square", "squareroot",
                                   "logarithm", "exponential", "gradient"])
def test_one_feature_per_class_alone_equals_full_extraction(whole_slice, full_tables, image):
    """One feature of one class per region: no other class computed, the same value."""
    hu, regions, spacing = whole_slice
    full = full_tables["paper"]
    names = [n for n in full.feature_names if n.startswith(f"{image}_")]
    by_class: dict[str, list[str]] = {}
    for n in names:
        by_class.setdefault(n.split("_")[1], []).append(n)
    classes = sorted(by_class)
    request = {}
    for label in range(1, 8):  # a different class (and feature) per region: all classes
        candidates = by_class[classes[label % len(classes)]]
        request[label] = [candidates[label % len(candidates)]]
    table = extract_features(hu, regions, spacing, features=request, n_jobs=1)
    _assert_equal_to_full(table, full, request)


def test_first_order_without_binning_and_shape_without_mesh_equal_full(whole_slice,
                                                                       full_tables):
    hu, regions, spacing = whole_slice
    request = {5: ["exponential_firstorder_Range"], 6: ["wavelet-LH_firstorder_Mean",
                                                        "original_shape2D_Elongation"],
               7: ["exponential_firstorder_Median", "original_firstorder_Entropy",
                   "original_shape2D_MajorAxisLength", "original_shape2D_Perimeter"]}
    table = extract_features(hu, regions, spacing, features=request, n_jobs=1)
    _assert_equal_to_full(table, full_tables["paper"], request)


def test_shape_only_request_equals_full_extraction(whole_slice, full_tables):
    hu, regions, spacing = whole_slice
    full = full_tables["paper"]
    shape = [n for n in full.feature_names if "_shape2D_" in n]
    request = {3: shape, 6: ["original_shape2D_Elongation"]}
    table = extract_features(hu, regions, spacing, features=request, n_jobs=1)
    _assert_equal_to_full(table, full, request)


def test_tiny_and_empty_regions_in_prediction_mode_match_full(whole_slice):
    hu, regions, spacing = whole_slice
    labels = regions[0].copy()
    labels[labels == 1] = 0  # empty
    labels[labels == 2] = 0
    labels[5, 5] = 2  # one pixel
    labels[labels == 3] = 0
    labels[8, 10:40] = 3  # a line
    labels[labels == 4] = 0
    labels[20:25, 20:25] = 4  # 25 pixels: just above minimumROISize
    labels[labels == 5] = 0
    labels[30:34, 30:35] = 5  # 20 pixels, in a corner of the image
    full = {r.region_label: r for r in extract_slice_features(hu[0], labels, spacing, "paper")}
    names = ["original_firstorder_Mean", "square_glcm_Idmn", "exponential_gldm_DependenceEntropy",
             "logarithm_ngtdm_Busyness", "wavelet-HL_glszm_ZoneEntropy",
             "squareroot_glrlm_RunEntropy", "original_shape2D_Elongation",
             "gradient_firstorder_Median"]
    rows = extract_slice_features(hu[0], labels, spacing, "paper",
                                  features={label: names for label in range(1, 8)})
    for row in rows:
        reference = full[row.region_label]
        assert (row.status, row.reason) == (reference.status, reference.reason)
        if row.status == STATUS_OK:
            assert row.features == {n: reference.features[n] for n in reference.features
                                    if n in names}


@pytest.mark.parametrize("shape, settings", [
    ((1, 37, 50), {"force2D": True, "force2Ddimension": 0}),
    ((1, 36, 51), {"force2D": True, "level": 2, "start_level": 1, "wavelet": "db2"}),
    ((9, 10, 11), {}),
    ((3, 21, 20), {"force2D": True, "force2Ddimension": 0}),  # odd axis not transformed
    ((7, 6, 5), {"force2D": True, "force2Ddimension": 2}),
    ((40, 31), {"level": 3}),
])
def test_wavelet_decompositions_alone_equal_pyradiomics(shape, settings):
    import SimpleITK as sitk
    from radiomics import imageoperations

    from HRpQCTRadiomicsEngine.region_images import wavelet_images

    array = (np.random.default_rng(0).normal(size=shape) * 300).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    reference = {name: sitk.GetArrayFromImage(im)
                 for im, name, _ in imageoperations.getWaveletImage(image, image, **settings)}
    for wanted in (set(reference), {sorted(reference)[0]}, {sorted(reference)[-1]}):
        ours = {name: sitk.GetArrayFromImage(im)
                for im, name, _ in wavelet_images(image, wanted, settings)}
        assert list(ours) == [n for n in reference if n in wanted]
        for name, values in ours.items():
            assert values.dtype == reference[name].dtype
            assert np.array_equal(values, reference[name])


@pytest.mark.parametrize("image_type", ["Square", "SquareRoot", "Logarithm", "Exponential"])
def test_point_filters_on_region_voxels_equal_whole_image(whole_slice, image_type):
    import SimpleITK as sitk
    from radiomics import imageoperations
    from scipy import ndimage

    from HRpQCTRadiomicsEngine.region_images import RegionBoxes, point_filter_values

    hu, regions, spacing = whole_slice
    array, labels = hu, regions
    boxes = dict(enumerate(ndimage.find_objects(labels), start=1))
    flat = array.reshape(-1)
    extreme = flat[int(np.argmax(np.abs(flat)))]
    image = sitk.GetImageFromArray(array)
    [(whole, name, _)] = list(getattr(imageoperations, f"get{image_type}Image")(image, image))
    whole = sitk.GetArrayFromImage(whole)
    our_name, _, values = point_filter_values(
        image_type, RegionBoxes(array, labels, boxes, spacing[::-1]), [5, 7, 2], extreme, {})
    assert our_name == name
    for label in (5, 7, 2):
        assert values[label].dtype == whole.dtype
        assert np.array_equal(values[label], whole[labels == label])


def test_region_matrices_equal_pyradiomics_c_code(monkeypatch):
    """GLCM, GLSZM, GLRLM, GLDM and NGTDM from the region's voxels == pyradiomics' C
    functions, on random regions with holes, lines and single voxels (GLRLM on dense regions
    too, which otherwise go to C)."""
    from radiomics import _cmatrices

    from HRpQCTRadiomicsEngine import region_matrices
    from HRpQCTRadiomicsEngine.region_matrices import RegionTextures

    monkeypatch.setattr(region_matrices, "_GLRLM_MAX_OCCUPANCY", 1.0)

    rng = np.random.default_rng(0)
    settings = {"binWidth": 25, "force2D": True, "force2Ddimension": 0}
    compared = 0
    for _ in range(300):
        h, w = (int(n) for n in rng.integers(1, 25, 2))
        grey = rng.integers(1, rng.integers(2, 6), (1, h, w)) * 25.0 + 0.5
        mask = rng.random((1, h, w)) < rng.random()
        if not mask.any():
            continue
        ours = RegionTextures(grey[mask], np.nonzero(mask[0]), (1, h, w), 1, settings)
        levels = np.zeros((1, h, w), dtype=int)
        levels[mask] = ours.region_levels(1)
        n_g = int(levels.max())
        present = ours.gray_levels(1)
        one = np.array([1])
        glcm, _ = _cmatrices.calculate_glcm(levels, mask, one, n_g, True, 0)
        assert np.array_equal(ours.glcm(1), glcm)
        glszm = _cmatrices.calculate_glszm(levels, mask, n_g, int(mask.sum()), True, 0)
        assert np.array_equal(ours.glszm(1), glszm)
        glrlm, _ = _cmatrices.calculate_glrlm(levels, mask, n_g, max(h, w), True, 0)
        assert np.array_equal(ours.glrlm(1), glrlm[:, present - 1])
        gldm = _cmatrices.calculate_gldm(levels, mask, one, n_g, 0, True, 0)
        assert np.array_equal(ours.gldm(1), gldm[:, present - 1])
        ngtdm = _cmatrices.calculate_ngtdm(levels, mask, one, n_g, True, 0)
        assert np.array_equal(ours.ngtdm(1), ngtdm[:, present - 1])
        compared += 1
    assert compared > 250


def test_region_glrlm_of_a_dense_region_is_left_to_c():
    from HRpQCTRadiomicsEngine.region_matrices import RegionTextures

    settings = {"binWidth": 25, "force2D": True, "force2Ddimension": 0}
    box = np.zeros((1, 10, 10), dtype=bool)
    box[0, :5] = True  # half the box
    dense = RegionTextures(np.full(50, 30.0), np.nonzero(box[0]), (1, 10, 10), 1, settings)
    assert dense.glrlm(1) is None
    ring = np.zeros((1, 10, 10), dtype=bool)
    ring[0, 0] = True  # a tenth of the box
    thin = RegionTextures(np.full(10, 30.0), np.nonzero(ring[0]), (1, 10, 10), 1, settings)
    assert thin.glrlm(1).shape == (1, 1, 10, 4)


def test_worker_pool_on_16_bit_slices_gives_the_serial_rows(whole_slice):
    """16-bit slices go to the workers as stored (converted there): the same rows."""
    hu, regions, spacing = whole_slice
    stored = np.concatenate([hu, hu[:, ::-1]]).astype(np.int16)
    labels = np.concatenate([regions, regions[:, ::-1]])
    request = _bundled_classifier_request()
    serial = extract_features(stored.astype(np.float32), labels, spacing, features=request,
                              n_jobs=1)
    pooled = extract_features(stored, labels, spacing, features=request, n_jobs=2)
    assert pooled.feature_names == serial.feature_names
    assert [(r.slice_index, r.region_label, r.status, r.features) for r in pooled.rows] == [
        (r.slice_index, r.region_label, r.status, r.features) for r in serial.rows]
