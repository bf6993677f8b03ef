"""Phantom generator: label consistency, tissue HU, noise, determinism (issue 3)."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from HRpQCTCore.regions import region_by_name, regions_to_classes

TIB_CORT = region_by_name("tibial_cortical").label
TIB_TRAB = region_by_name("tibial_trabecular").label
FIB_CORT = region_by_name("fibular_cortical").label
FIB_TRAB = region_by_name("fibular_trabecular").label
SKIN = region_by_name("skin").label
MYO = region_by_name("myotendinous").label
FAT = region_by_name("adipose").label


def test_shapes_types_and_classes_follow_regions(small_phantom):
    ph = small_phantom
    assert ph.scan.hu.dtype == np.int16
    assert ph.regions.dtype == np.uint8 and ph.classes.dtype == np.uint8
    assert ph.scan.hu.shape == ph.regions.shape == ph.classes.shape == (12, 400, 400)
    assert np.array_equal(ph.classes, regions_to_classes(ph.regions))
    assert set(np.unique(ph.regions)) == set(range(8))


def test_trabecular_enclosed_by_cortex_in_every_slice(small_phantom):
    for z in range(small_phantom.regions.shape[0]):
        reg = small_phantom.regions[z]
        for cort, trab in ((TIB_CORT, TIB_TRAB), (FIB_CORT, FIB_TRAB)):
            grown = ndimage.binary_dilation(reg == trab)
            assert np.all(np.isin(reg[grown], (cort, trab))), f"slice {z}: marrow leaks"
            # ... and the cortex closes around it: filling the bone adds nothing outside.
            bone = np.isin(reg, (cort, trab))
            assert np.array_equal(ndimage.binary_fill_holes(bone), bone)


def test_fibula_apart_from_tibia(small_phantom):
    vox = small_phantom.scan.spacing_mm[1]
    gap = small_phantom.truth["params"]["fibula_gap_mm"]
    for z in range(small_phantom.regions.shape[0]):
        reg = small_phantom.regions[z]
        dist = ndimage.distance_transform_edt(~np.isin(reg, (TIB_CORT, TIB_TRAB))) * vox
        fib = np.isin(reg, (FIB_CORT, FIB_TRAB))
        # Narrowest gap within a voxel of the requested one, and never below 1 mm.
        assert dist[fib].min() >= max(1.0, gap - 2 * vox)
        assert dist[fib].min() <= gap + 2 * vox


def test_skin_band_is_the_outer_two_mm(small_phantom):
    vox = small_phantom.scan.spacing_mm[1]
    width = small_phantom.truth["params"]["skin_width_mm"]
    for z in (0, 6, 11):
        reg = small_phantom.regions[z]
        depth = ndimage.distance_transform_edt(reg > 0) * vox
        skin = reg == SKIN
        soft = np.isin(reg, (SKIN, MYO, FAT))
        # Skin voxels lie within the band (one voxel slack for the outline approximation)...
        assert depth[skin].max() <= width + 1.5 * vox
        # ...and soft tissue clearly inside the band is skin.
        assert np.all(skin[soft & (depth < width - 1.5 * vox)])


def test_mean_hu_per_tissue_in_facts_ranges(small_phantom):
    hu = small_phantom.truth["hu_by_tissue"]
    ranges = {"fat": (-150, -100), "muscle": (40, 60), "tendon": (80, 150),
              "dermis": (30, 80), "marrow": (-100, 50), "air": (-1010, -990)}
    for tissue, (lo, hi) in ranges.items():
        assert lo <= hu[tissue]["mean_hu"] <= hi, tissue
    # Noise: SD 100-200 HU, measured in air as on a real scan.
    assert 100 <= hu["air"]["sd_hu"] <= 200


def test_bone_compartment_hu_in_facts_ranges(tibia_patch):
    m = tibia_patch.truth["morphometrics"]["tibia"]
    assert 2000 <= m["ct_mean_hu"] <= 2400  # cortical compartment
    assert 300 <= m["tb_mean_hu"] <= 450  # trabecular compartment
    # Tb.BMD ~ BV/TV * TMD + (1 - BV/TV) * marrow, with BMD ~ 0.39 HU - 4.
    p = tibia_patch.truth["params"]
    expected_hu = m["bv_tv"] * p["trabecular_tissue_hu"] + (1 - m["bv_tv"]) * p["marrow_hu"]
    assert m["tb_mean_hu"] == pytest.approx(expected_hu, rel=0.1)
    assert m["tb_bmd_mg_cm3"] == pytest.approx(0.39 * m["tb_mean_hu"] - 4, rel=0.05)


def test_paper_seed_windows_catch_only_tails(small_phantom):
    hu = small_phantom.scan.hu
    reg = small_phantom.regions
    fat = hu[reg == FAT]
    in_fat_window = np.mean((fat >= -600) & (fat <= -200))
    myo = hu[reg == MYO]
    in_tendon_window = np.mean((myo >= 100) & (myo <= 600))
    assert 0.05 < in_fat_window < 0.6
    assert 0.1 < in_tendon_window < 0.7


def _digests(paths):
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


def test_same_seed_same_bytes(tmp_path):
    from HRpQCTPhantom import PhantomParams, generate_phantom, write_phantom

    params = PhantomParams(motion_grade=3).small(200, 3)
    a = write_phantom(generate_phantom(params, 3, n_threads=2), tmp_path / "a", "p")
    b = write_phantom(generate_phantom(params, 3, n_threads=1), tmp_path / "b", "p")
    c = write_phantom(generate_phantom(params, 4), tmp_path / "c", "p")
    assert set(a) == {"scan", "classes", "regions", "truth"}
    assert _digests(a) == _digests(b)
    assert _digests(a)["scan"] != _digests(c)["scan"]
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left


def test_written_files_read_back(tmp_path, small_phantom):
    import json

    import SimpleITK as sitk

    from HRpQCTPhantom import write_phantom

    paths = write_phantom(small_phantom, tmp_path, "leg")
    img = sitk.ReadImage(str(paths["scan"]))
    assert img.GetSpacing() == pytest.approx((small_phantom.scan.spacing_mm[2],) * 3)
    assert np.array_equal(sitk.GetArrayFromImage(img), small_phantom.scan.hu)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["regions"])))
    assert np.array_equal(labels, small_phantom.regions)
    truth = json.loads(paths["truth"].read_text(encoding="utf-8"))
    assert truth["synthetic"] is True and truth["params"]["n_slices"] == 12


def test_motion_changes_image_not_labels():
    from HRpQCTPhantom import PhantomParams, generate_phantom

    still = generate_phantom(PhantomParams(noise_sd_hu=0).small(200, 2), 9)
    moved = generate_phantom(PhantomParams(noise_sd_hu=0, motion_grade=5).small(200, 2), 9)
    assert np.array_equal(still.regions, moved.regions)
    diff = np.abs(still.scan.hu.astype(np.int32) - moved.scan.hu)
    assert diff.max() > 300  # ghosted cortex and streaks


def test_invalid_params_are_rejected():
    from HRpQCTPhantom import PhantomParams

    with pytest.raises(ValueError, match="motion_grade"):
        PhantomParams(motion_grade=7)
    with pytest.raises(ValueError, match="Unknown phantom parameter"):
        PhantomParams.from_dict({"tibia_bvtv": 0.2})


def test_calibration_maps_the_image_and_keeps_labels_and_truth():
    from HRpQCTPhantom import PhantomParams, generate_phantom

    base = PhantomParams(motion_grade=2).small(200, 2)
    plain = generate_phantom(base, 11)
    shifted = generate_phantom(base.replace(calibration_scale=0.85,
                                            calibration_offset_hu=120.0), 11)
    assert np.array_equal(plain.regions, shifted.regions)
    # HU' = -1000 + scale * (HU + 1000) + offset, noise and motion included (int16 rounding
    # of both images: at most one HU apart).
    expected = -1000.0 + 0.85 * (plain.scan.hu.astype(np.float64) + 1000.0) + 120.0
    assert np.abs(shifted.scan.hu - expected).max() <= 1.0
    # Air stays -1000 before the offset; bone loses 15 % of its attenuation.
    air = shifted.truth["hu_by_tissue"]["air"]["mean_hu"]
    assert air == pytest.approx(-880.0, abs=3.0)
    bone_plain = plain.truth["hu_by_tissue"]["cortical_bone"]
    bone = shifted.truth["hu_by_tissue"]["cortical_bone"]
    assert bone["mean_hu"] == pytest.approx(
        -1000 + 0.85 * (bone_plain["mean_hu"] + 1000) + 120, rel=1e-3)
    # The truth's noise-free HU and densities are the tissue's, not the site's.
    assert bone["mean_hu_noise_free"] == pytest.approx(bone_plain["mean_hu_noise_free"])
    assert shifted.truth["morphometrics"] == plain.truth["morphometrics"]


def test_invalid_calibration_is_rejected():
    from HRpQCTPhantom import PhantomParams

    with pytest.raises(ValueError, match="calibration_scale"):
        PhantomParams(calibration_scale=0.2)
    with pytest.raises(ValueError, match="calibration_offset_hu"):
        PhantomParams(calibration_offset_hu=-900.0)


def test_a_fibula_half_a_millimetre_from_the_tibia():
    """The narrow gaps a fine-tuning cohort draws (``--fibula-gap-mm``) are rendered as asked."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    params = PhantomParams(fibula_gap_mm=0.6, n_slices=2, field_px=800, voxel_mm=0.1214)
    ph = generate_phantom(params, 3)
    vox = ph.scan.spacing_mm[1]
    for reg in ph.regions:
        dist = ndimage.distance_transform_edt(~np.isin(reg, (TIB_CORT, TIB_TRAB))) * vox
        narrowest = dist[np.isin(reg, (FIB_CORT, FIB_TRAB))].min()
        assert 0.6 - 2 * vox <= narrowest <= 0.6 + 2 * vox
        # The wedge between the bones is soft tissue, not bone.
        assert np.count_nonzero((dist > 0) & (dist < 0.6 - 2 * vox)
                                & np.isin(reg, (FIB_CORT, FIB_TRAB))) == 0
