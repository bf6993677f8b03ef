"""Phantom truth: measured morphometrics match the requested parameters (issue 3).

Tolerances (stated here, checked below), full-resolution 60.7 um patch, one seed:
BV/TV +-0.03 absolute (the generator sets each slice's BV/TV exactly; the requested value
varies +-5 % smoothly along z); Ct.Po +-0.01; Ct.Th +-15 %; Tb.Th +-25 % (a 7 x 7 x 1.9 mm
box holds few trabeculae); total areas (whole leg, coarse voxels) tibia +-10 %, fibula
+-15 %.
"""

import numpy as np
import pytest

from HRpQCTPhantom.morphometry import ridge_thickness_mm, thickness_2d_mm


def test_local_thickness_of_slabs_is_exact_within_half_a_voxel():
    for t in (3, 4, 7, 12):
        slab = np.zeros((30, 30, 40), bool)
        slab[:, :, 5:5 + t] = True
        assert ridge_thickness_mm(slab, 0.1) == pytest.approx(0.1 * t, abs=0.05 + 1e-9)
    ring = np.zeros((200, 200), bool)
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100, xx - 100)
    ring[(r < 80) & (r >= 60)] = True
    assert thickness_2d_mm(ring, 0.1) == pytest.approx(2.0, rel=0.05)


def test_full_resolution_truth_matches_parameters(tibia_patch):
    m = tibia_patch.truth["morphometrics"]["tibia"]
    p = tibia_patch.truth["params"]
    assert m["bv_tv"] == pytest.approx(p["tibia_bv_tv"], abs=0.03)
    assert m["ct_po"] == pytest.approx(p["tibia_ct_po"], abs=0.01)
    assert m["ct_th_mm"] == pytest.approx(p["tibia_ct_th_mm"], rel=0.15)
    assert m["tb_th_mm"] == pytest.approx(p["tibia_tb_th_mm"], rel=0.25)
    # Facts-sheet ranges for normal bone (Tb.N as 1 / (Tb.Th + Tb.Sp)).
    assert 0.6 <= m["tb_sp_mm"] <= 1.2
    assert 0.7 <= m["tb_n_per_mm"] <= 1.4


def test_osteoporotic_bone_is_sparser_and_thinner(tibia_patch):
    from HRpQCTPhantom import PhantomParams, generate_phantom

    params = PhantomParams(field_px=600, n_slices=32, field_center="tibia", noise_sd_hu=0.0,
                           tibia_bv_tv=0.14, tibia_ct_th_mm=0.9, tibia_ct_po=0.10,
                           tibia_rod_fraction=0.5, cortical_tissue_hu=2250.0)
    op = generate_phantom(params, 5).truth["morphometrics"]["tibia"]
    normal = tibia_patch.truth["morphometrics"]["tibia"]
    assert op["bv_tv"] == pytest.approx(0.14, abs=0.03)
    assert op["ct_po"] == pytest.approx(0.10, abs=0.01)
    assert op["ct_th_mm"] == pytest.approx(0.9, rel=0.15)
    assert op["tb_th_mm"] == pytest.approx(0.26, rel=0.25)
    assert op["tb_sp_mm"] > normal["tb_sp_mm"]
    assert op["tb_n_per_mm"] < normal["tb_n_per_mm"]
    assert op["ct_bmd_mg_cm3"] < normal["ct_bmd_mg_cm3"]
    assert op["tb_bmd_mg_cm3"] < normal["tb_bmd_mg_cm3"]


def test_whole_leg_areas(small_phantom):
    m = small_phantom.truth["morphometrics"]
    p = small_phantom.truth["params"]
    assert m["tibia"]["tt_ar_mm2"] == pytest.approx(p["tibia_area_mm2"], rel=0.10)
    assert m["fibula"]["tt_ar_mm2"] == pytest.approx(p["fibula_area_mm2"], rel=0.15)


def test_soft_tissue_truth(small_phantom):
    s = small_phantom.truth["morphometrics"]["soft_tissue"]
    p = small_phantom.truth["params"]
    assert s["intramuscular_fat_fraction"] == pytest.approx(p["intramuscular_fat_fraction"],
                                                            abs=0.06)
    assert 0.3 < s["fat_fraction"] < 0.95
    assert 60 < s["tendon_area_mm2"] < 400
    a = small_phantom.truth["anatomy_mid_slice"]
    assert 55 <= max(a["leg_width_ml_mm"], a["leg_depth_ap_mm"]) <= 80
