"""Surface refinement: skin and periosteal surfaces move to the scan's HU edges, nothing else.

Constructed slices with a known truth: a leg disk (0 HU) in air (-1000 HU) with a tibia
(cortex 2000 HU, marrow 300 HU), blurred like a scanner would; the "prediction" is the truth
with surfaces displaced, or with a holder shell attached.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from HRpQCTCore.regions import class_by_name
from HRpQCTSegmentationEngine.postprocess import (
    PAPER,
    PostprocessConfig,
    postprocess,
    refine_surfaces,
)
from HRpQCTSegmentationEngine.postprocess.bone import fill_holes

TC, TT = class_by_name("tibial_cortical").label, class_by_name("tibial_trabecular").label
FC, FT = class_by_name("fibular_cortical").label, class_by_name("fibular_trabecular").label
SOFT = class_by_name("soft_tissue").label
PIXEL_MM = 0.06
SPACING = (PIXEL_MM,) * 3
SIZE = 400
LEG_RADIUS, CORTEX_RADIUS, MARROW_RADIUS = 150, 70, 55
CENTRE = (200, 200)
BONE_CENTRE = (190, 185)


def _disk(centre, radius):
    yy, xx = np.ogrid[:SIZE, :SIZE]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def truth_slice(leg_radius=LEG_RADIUS, cortex_radius=CORTEX_RADIUS, marrow_radius=MARROW_RADIUS):
    plane = np.zeros((SIZE, SIZE), np.uint8)
    plane[_disk(CENTRE, leg_radius)] = SOFT
    plane[_disk(BONE_CENTRE, cortex_radius)] = TC
    plane[_disk(BONE_CENTRE, marrow_radius)] = TT
    return plane


def image_of(plane, cortex_hu=2000.0, noise_hu=0.0, seed=0):
    """HU of a labelled slice, blurred (partial volume and point-spread), optionally noisy."""
    hu = np.full(plane.shape, -1000.0, np.float32)
    hu[plane == SOFT] = 0.0
    hu[plane == TC] = cortex_hu
    hu[plane == TT] = 300.0
    hu = ndi.gaussian_filter(hu, 1.0)
    if noise_hu:
        hu += np.random.default_rng(seed).normal(0, noise_hu, hu.shape).astype(np.float32)
    return hu


def volume(plane, n=2):
    return np.repeat(plane[None], n, axis=0)


def boundary_errors(result, truth, label_set):
    return int(np.count_nonzero(np.isin(result, label_set) != np.isin(truth, label_set)))


@pytest.mark.parametrize("shift_px", [-6, 5])
def test_skin_surface_moves_to_the_air_edge(shift_px):
    truth = truth_slice()
    predicted = truth_slice(leg_radius=LEG_RADIUS + shift_px)
    hu = volume(image_of(truth, noise_hu=100.0))
    refined = refine_surfaces(volume(predicted), hu, SPACING, PostprocessConfig())
    before = boundary_errors(predicted, truth, [SOFT, TC, TT])
    after = boundary_errors(refined[0], truth, [SOFT, TC, TT])
    assert before > 4000
    assert after < before / 10
    # the bone was not touched by the skin step, and the bone's own surface was already right
    np.testing.assert_array_equal(refined[0] == TT, truth == TT)


def test_holder_shell_bridged_to_the_skin_is_cut_off():
    """A holder shell 0.9 mm thick, 1.2 mm from the skin, that the network calls soft tissue
    and joins to the leg with a bridge across the air gap."""
    truth = truth_slice()
    yy, xx = np.ogrid[:SIZE, :SIZE]
    r = np.hypot(yy - CENTRE[0], xx - CENTRE[1])
    shell = (r > LEG_RADIUS + 20) & (r <= LEG_RADIUS + 35) & (yy > 300)
    bridge = (r > LEG_RADIUS - 2) & (r <= LEG_RADIUS + 21) & (np.abs(xx - CENTRE[1]) < 5)
    bridge &= yy > 300
    hu = np.where(shell, 250.0, image_of(truth)).astype(np.float32)
    predicted = truth.copy()
    predicted[(shell | bridge) & (truth == 0)] = SOFT
    refined = refine_surfaces(volume(predicted), volume(hu), SPACING, PostprocessConfig())
    kept_shell = np.count_nonzero((refined[0] > 0) & shell & (truth == 0))
    assert np.count_nonzero(shell) > 2000
    assert kept_shell == 0
    assert boundary_errors(refined[0], truth, [SOFT, TC, TT]) < 100
    # the paper's rules keep what the network says
    unchanged = refine_surfaces(volume(predicted), volume(hu), SPACING, PAPER)
    np.testing.assert_array_equal(unchanged[0], predicted)


@pytest.mark.parametrize("shift_px", [-2, 2])
def test_periosteal_surface_moves_to_the_half_way_level(shift_px):
    truth = truth_slice()
    predicted = truth_slice(cortex_radius=CORTEX_RADIUS + shift_px)
    hu = volume(image_of(truth, noise_hu=50.0))
    refined = refine_surfaces(volume(predicted), hu, SPACING, PostprocessConfig())
    before = boundary_errors(predicted, truth, [TC])
    after = boundary_errors(refined[0], truth, [TC])
    assert before > 800
    assert after < before / 4
    # the endosteal surface (cortex | marrow) is never moved
    np.testing.assert_array_equal(refined[0] == TT, truth == TT)


def test_thin_faint_cortex_stays_a_closed_ring():
    """An osteoporotic cortex, 3 px thick and barely denser than muscle next to the marrow."""
    truth = truth_slice(cortex_radius=MARROW_RADIUS + 3)
    hu = volume(image_of(truth, cortex_hu=700.0, noise_hu=150.0))
    refined = refine_surfaces(volume(truth), hu, SPACING, PostprocessConfig())
    for plane in refined:
        cortex = plane == TC
        assert np.count_nonzero(cortex) > 0
        assert (fill_holes(cortex) >= (plane == TT)).all()  # marrow still enclosed
        np.testing.assert_array_equal(plane == TT, truth == TT)


def test_no_edge_no_change():
    """An image without air or bone contrast (all zeros): the HU steps leave the prediction
    as it is (the opening, which looks at shapes only, would trim the disk's 1-pixel tips)."""
    predicted = volume(truth_slice(leg_radius=LEG_RADIUS + 5))
    refined = refine_surfaces(predicted.copy(), np.zeros(predicted.shape, np.float32), SPACING,
                              PostprocessConfig(leg_opening_mm=0.0))
    np.testing.assert_array_equal(refined, predicted)


def test_paper_preset_keeps_the_network_surfaces_and_postprocess_uses_the_step():
    truth = truth_slice()
    predicted = volume(truth_slice(leg_radius=LEG_RADIUS + 5, cortex_radius=CORTEX_RADIUS + 2))
    hu = volume(image_of(truth))
    paper = postprocess(predicted, hu, SPACING, PAPER)
    default = postprocess(predicted, hu, SPACING)
    assert np.count_nonzero(paper.classes[0] > 0) == np.count_nonzero(predicted[0] > 0)
    assert (boundary_errors(default.classes[0], truth, [SOFT, TC, TT])
            < boundary_errors(paper.classes[0], truth, [SOFT, TC, TT]) / 5)


def _with_close_fibula(gap_px=12):
    """The truth slice with a fibula ``gap_px`` (0.72 mm) beside the tibia, its image, and a
    prediction that fills the soft tissue between the bones with tibial marrow (the wedge)."""
    truth = truth_slice()
    centre = (BONE_CENTRE[0], BONE_CENTRE[1] + CORTEX_RADIUS + gap_px + 30)
    truth[_disk(centre, 30)] = FC
    truth[_disk(centre, 22)] = FT
    hu = image_of(truth)
    hu[truth == FC], hu[truth == FT] = 2000.0, 300.0
    hu = ndi.gaussian_filter(np.where(truth == 0, -1000.0, hu).astype(np.float32), 1.0)
    between = ndi.distance_transform_edt(~np.isin(truth, (FC, FT))) * PIXEL_MM <= 1.0
    between &= ndi.distance_transform_edt(~np.isin(truth, (TC, TT))) * PIXEL_MM <= 1.0
    predicted = truth.copy()
    predicted[between & (truth == SOFT)] = TT
    return truth, volume(hu), predicted, between & (truth == SOFT)


def test_soft_tissue_between_close_bones_called_marrow_is_given_back():
    truth, hu, predicted, wedge = _with_close_fibula()
    assert wedge.sum() > 150
    config = PostprocessConfig(bone_gap_band_mm=2.5)  # reaches into the tibia's marrow
    refined = refine_surfaces(volume(predicted), hu, SPACING, config)
    for plane in refined:
        assert (plane[wedge] == SOFT).all()
        # the marrow, as dark as the wedge but inside a bright cortex, stays
        np.testing.assert_array_equal(plane == TT, truth == TT)


def test_the_gap_step_is_off_at_zero_and_in_the_paper_preset():
    _, hu, predicted, wedge = _with_close_fibula()
    refined = refine_surfaces(volume(predicted), hu, SPACING,
                              PostprocessConfig(bone_gap_band_mm=0.0))
    assert (refined[:, wedge] == TT).all()
    assert PAPER.bone_gap_band_mm == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        refine_surfaces(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 5), np.float32),
                        SPACING, PostprocessConfig())


@pytest.mark.parametrize("field", ["leg_opening_mm", "skin_surface_band_mm",
                                   "periosteal_band_mm", "bone_gap_band_mm"])
def test_negative_settings_are_refused(field):
    with pytest.raises(ValueError, match=field):
        PostprocessConfig(**{field: -1.0})
