"""Post-processing in its input's memory gives the regions of the separate full-volume steps.

``postprocess(..., overwrite_input=True)`` (what ``hrpqct run`` uses) cleans the network's
classes in place, subdivides the soft tissue of the leg's box only and writes the regions into
the input array: no further label volume of the scan's size. Here its regions are compared
with the steps run one after the other on whole arrays, on a phantom with a prediction's
defects.
"""

import numpy as np
import pytest

from HRpQCTCore.regions import class_by_name
from HRpQCTSegmentationEngine.postprocess import (
    PAPER,
    PostprocessConfig,
    clean_classes,
    distance_rings,
    postprocess,
    refine_surfaces,
    subdivide_soft_tissue,
)

SOFT = class_by_name("soft_tissue").label
TC = class_by_name("tibial_cortical").label
CONFIGS = {"default": PostprocessConfig(), "paper": PAPER}


@pytest.fixture(scope="module")
def prediction(small_phantom):
    """The phantom's classes with specks and a cortical gap, and its HU (float32)."""
    classes = np.array(small_phantom.classes, dtype=np.uint8)
    rng = np.random.default_rng(4)
    soft = np.argwhere(classes == SOFT)
    for label in range(1, 6):
        for z, y, x in soft[rng.choice(len(soft), 5, replace=False)]:
            classes[z, y:y + 2, x:x + 2] = label
    y, x = np.argwhere(classes[0] == TC)[0]
    classes[:4, y:y + 3, x:x + 3] = SOFT
    return classes, np.asarray(small_phantom.scan.hu, dtype=np.float32)


def _steps(classes, hu, spacing, config, with_rings):
    """The steps one after the other, on whole arrays (the input left untouched)."""
    cleaned, warnings = clean_classes(classes, spacing, config)
    refine_surfaces(cleaned, hu, spacing, config)
    regions = subdivide_soft_tissue(cleaned, hu, spacing, config)
    rings = distance_rings(cleaned, spacing, config.ring_radii_mm) if with_rings else None
    return cleaned, regions, rings, warnings


@pytest.mark.parametrize("with_rings", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_overwriting_the_input_gives_the_same_regions(prediction, small_phantom, name,
                                                      with_rings):
    classes, hu = prediction
    spacing, config = small_phantom.scan.spacing_mm, CONFIGS[name]
    cleaned, regions, rings, warnings = _steps(classes, hu, spacing, config, with_rings)
    work = classes.copy()
    result = postprocess(work, hu, spacing, config, with_rings=with_rings, overwrite_input=True)
    assert result.regions is work  # the regions took the input's memory
    assert result.classes is None
    np.testing.assert_array_equal(result.regions, regions)
    assert result.warnings == warnings
    if with_rings:
        np.testing.assert_array_equal(result.rings, rings)
    kept = postprocess(classes, hu, spacing, config, with_rings=with_rings)
    np.testing.assert_array_equal(kept.regions, regions)
    np.testing.assert_array_equal(kept.classes, cleaned)
    np.testing.assert_array_equal(classes, prediction[0])  # without the option: untouched


def test_cleaning_in_place_equals_cleaning_a_copy(prediction, small_phantom):
    classes, _ = prediction
    spacing, config = small_phantom.scan.spacing_mm, PostprocessConfig()
    expected, warnings = clean_classes(classes, spacing, config)
    work = classes.copy()
    cleaned, in_place_warnings = clean_classes(work, spacing, config, overwrite_input=True)
    assert cleaned is work
    np.testing.assert_array_equal(cleaned, expected)
    assert in_place_warnings == warnings
    assert not np.array_equal(expected, classes)  # there was something to clean


def test_inputs_that_cannot_be_overwritten_are_copied(prediction, small_phantom):
    classes, hu = prediction
    spacing, config = small_phantom.scan.spacing_mm, PostprocessConfig()
    expected = postprocess(classes, hu, spacing, config).regions
    read_only = classes.copy()
    read_only.flags.writeable = False
    wide = classes.astype(np.int16)
    for given in (read_only, wide):
        before = given.copy()
        result = postprocess(given, hu, spacing, config, overwrite_input=True)
        assert result.regions is not given and result.regions.dtype == np.uint8
        np.testing.assert_array_equal(result.regions, expected)
        np.testing.assert_array_equal(given, before)


def test_an_empty_prediction_overwritten(small_phantom):
    hu = np.asarray(small_phantom.scan.hu, dtype=np.float32)
    work = np.zeros(hu.shape, np.uint8)
    result = postprocess(work, hu, small_phantom.scan.spacing_mm, overwrite_input=True)
    assert not result.regions.any()
    assert result.warnings == ["The segmentation is empty: no leg was found in the scan."]
