"""Filtering only a box around the regions keeps every value equal to pyradiomics' own."""

import numpy as np
import pytest
from _fixtures_radiomics import direct_pyradiomics

from HRpQCTRadiomicsEngine.extraction import STATUS_OK, _exact_crop, extract_slice_features
from HRpQCTRadiomicsEngine.settings import load_settings, parse_settings, settings_for_mode

_POINT_FILTERS_ONLY = """
setting:
  binWidth: 25
  force2D: true
  force2Ddimension: 0
imageType:
  Original: {}
  Square: {}
  SquareRoot: {}
  Logarithm: {}
  Exponential: {}
featureClass:
  firstorder: []
  glcm: []
"""


def _assert_equal_to_direct(hu2d, labels2d, spacing_mm, settings, regions):
    params = settings_for_mode(settings, "slice")
    dz, dy, dx = spacing_mm
    results = extract_slice_features(hu2d, labels2d, spacing_mm, settings, regions=regions)
    for r in results:
        assert r.status == STATUS_OK
        direct = direct_pyradiomics(params, hu2d[np.newaxis], labels2d[np.newaxis],
                                    (dx, dy, dz), r.region_label)
        assert list(r.features) == list(direct)
        differing = [k for k in direct if not (r.features[k] == direct[k]
                                               or (np.isnan(r.features[k])
                                                   and np.isnan(direct[k])))]
        assert differing == []


def test_paper_preset_on_a_cropped_box_equals_direct_call(radiomics_scan):
    """Fibula regions: wavelet, gradient and point filters computed on a box only."""
    s = radiomics_scan
    z = 1
    params = settings_for_mode(load_settings("paper"), "slice")
    crop = _exact_crop(s.hu[z:z + 1], s.regions[z:z + 1], [3, 4], params, None)
    assert crop is not None  # the box is smaller than the image, so this tests the crop
    _assert_equal_to_direct(s.hu[z], s.regions[z], s.spacing_mm, load_settings("paper"), [3, 4])


def test_box_holds_the_largest_value_for_point_filters(radiomics_scan):
    """Square, square root, logarithm and exponential rescale by the image's max |value|."""
    s = radiomics_scan
    hu = s.hu[1].copy()
    hu[3, 5] = -9000.0  # far from the fibula: the box must grow to include it
    settings = parse_settings(_POINT_FILTERS_ONLY, "test", "points")
    params = settings_for_mode(settings, "slice")
    crop = _exact_crop(hu[np.newaxis], s.regions[1:2], [4], params, None)
    assert crop is not None
    assert crop[1].start <= 3 < crop[1].stop and crop[2].start <= 5 < crop[2].stop
    _assert_equal_to_direct(hu, s.regions[1], s.spacing_mm, settings, [4])


def test_wavelet_box_spans_axes_where_it_reaches_the_border():
    params = settings_for_mode(load_settings("paper"), "slice")
    labels = np.zeros((1, 60, 60), dtype=np.uint8)
    labels[0, 2:10, 25:35] = 7  # 2 rows from the top: the margin reaches the border
    hu = np.zeros(labels.shape, dtype=np.float32)
    hu[0, 30, 30] = 100.0
    crop = _exact_crop(hu, labels, [7], params, None)
    assert crop[1] == slice(0, 60)  # periodic wrap-around: the whole axis
    assert crop[2].start > 0 and crop[2].stop < 60
    assert _exact_crop(hu, labels, [7], params, {"Original", "Square"})[1].stop < 60


@pytest.mark.parametrize("image_type", ["LoG", "LBP3D"])
def test_no_box_for_filters_that_use_the_whole_image(image_type):
    params = settings_for_mode(load_settings("complete"), "slice")
    params = dict(params, imageType=dict(params["imageType"], **{image_type: {}}))
    labels = np.zeros((60, 60), dtype=np.uint8)
    labels[20:30, 20:30] = 7
    hu = np.ones(labels.shape, dtype=np.float32)
    assert _exact_crop(hu, labels, [7], params, {"Original", image_type}) is None
    assert _exact_crop(hu, labels, [7], params, {"Original"}) is not None
    normalised = dict(params, setting=dict(params["setting"], normalize=True))
    assert _exact_crop(hu, labels, [7], normalised, {"Original"}) is None
