"""Radiomics extraction: counts, equality with pyradiomics' own calls, skipping, modes."""

import numpy as np
import pytest
from _fixtures_radiomics import direct_pyradiomics

from HRpQCTRadiomicsEngine.extraction import (
    STATUS_OK,
    STATUS_SKIPPED,
    extract_features,
    extract_slice_features,
)
from HRpQCTRadiomicsEngine.settings import load_settings, parse_settings, settings_for_mode


def _assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)  # same names, same order
    differing = [k for k in theirs
                 if not (ours[k] == theirs[k] or (np.isnan(ours[k]) and np.isnan(theirs[k])))]
    assert differing == []


@pytest.mark.filterwarnings("ignore:Applying `local_binary_pattern`:UserWarning")
@pytest.mark.parametrize("preset, count", [("paper", 939), ("complete", 1311)])
def test_preset_values_equal_direct_pyradiomics(radiomics_scan, preset, count):
    settings = load_settings(preset)
    params = settings_for_mode(settings, "slice")
    s = radiomics_scan
    z = 1
    # every region of the slice (all matrices of all regions are computed together)
    results = [r for r in extract_slice_features(s.hu[z], s.regions[z], s.spacing_mm, preset)
               if r.voxel_count]
    assert [r.status for r in results] == [STATUS_OK] * len(results)
    assert {3, 4, 7} <= {r.region_label for r in results}
    dz, dy, dx = s.spacing_mm
    for r in results:
        assert len(r.features) == count
        if settings.slice_geometry == "volume":
            direct = direct_pyradiomics(params, s.hu[z:z + 1], s.regions[z:z + 1],
                                        (dx, dy, dz), r.region_label)
        else:
            direct = direct_pyradiomics(params, s.hu[z], s.regions[z], (dx, dy),
                                        r.region_label)
        _assert_same(r.features, direct)


def test_flat_and_two_valued_regions_equal_direct_pyradiomics(radiomics_scan):
    """Degenerate inputs of the engine's own code paths: one grey level (flat GLCM, zero
    moments, equal percentiles) and two values (ties in every percentile)."""
    s = radiomics_scan
    z = 0
    hu = s.hu[z].copy()
    hu[s.regions[z] == 3] = 40.0
    two = s.regions[z] == 4
    hu[two] = np.where(np.arange(two.sum()) % 3 == 0, -120.0, 310.0)
    params = settings_for_mode(load_settings("paper"), "slice")
    dz, dy, dx = s.spacing_mm
    for r in extract_slice_features(hu, s.regions[z], s.spacing_mm, "paper", regions=[3, 4]):
        assert r.status == STATUS_OK
        direct = direct_pyradiomics(params, hu[np.newaxis], s.regions[z:z + 1], (dx, dy, dz),
                                    r.region_label)
        _assert_same(r.features, direct)


def test_complete_preset_has_log_and_lbp(radiomics_scan):
    s = radiomics_scan
    (r,) = extract_slice_features(s.hu[0], s.regions[0], s.spacing_mm, "complete", regions=[7])
    images = {name.split("_", 1)[0] for name in r.features}
    assert {"log-sigma-0-25-mm-3D", "log-sigma-0-5-mm-3D", "log-sigma-1-0-mm-3D",
            "lbp-2D"} <= images
    assert len(images) == 14
    # LBP codes are 0..9 (uniform, 8 samples): with bin width 1 the texture is not degenerate
    assert r.features["lbp-2D_firstorder_Range"] > 0
    assert r.features["lbp-2D_glcm_JointEntropy"] > 0


def test_lbp_on_paper_geometry_gives_1032(radiomics_scan):
    text = load_settings("paper").text.replace(
        "  Gradient:\n", "  LBP2D:\n    binWidth: 1\n  Gradient:\n")
    settings = parse_settings(text, "test", "paper+lbp")
    s = radiomics_scan
    (r,) = extract_slice_features(s.hu[0], s.regions[0], s.spacing_mm, settings, regions=[7])
    assert len(r.features) == 1032
    assert not any(name.startswith("log-") for name in r.features)


def test_log_is_skipped_on_one_slice_volume(radiomics_scan):
    """Why the paper preset leaves LoG out: pyradiomics adds nothing on a one-slice volume."""
    text = load_settings("paper").text.replace(
        "  Original: {}\n", "  Original: {}\n  LoG:\n    sigma: [0.5]\n")
    settings = parse_settings(text, "test", "paper+log")
    s = radiomics_scan
    (r,) = extract_slice_features(s.hu[0], s.regions[0], s.spacing_mm, settings, regions=[7])
    assert len(r.features) == 939


def test_empty_and_tiny_regions_are_skipped_with_reason(radiomics_scan):
    s = radiomics_scan
    labels = s.regions[0].copy()
    labels[labels == 1] = 0
    labels[:3, :3] = 1  # 9 pixels: below minimumROISize
    labels[labels == 2] = 0
    labels[10, 10:40] = 2  # a line
    labels[labels == 4] = 0
    labels[20, 20] = 4  # a single pixel
    results = {r.region_label: r for r in
               extract_slice_features(s.hu[0], labels, s.spacing_mm, "paper")}
    assert results[5].status == STATUS_SKIPPED and results[5].reason.startswith("empty")
    assert results[1].status == STATUS_SKIPPED and "9 voxels" in results[1].reason
    assert results[2].status == STATUS_SKIPPED and results[2].reason.startswith("too thin")
    assert results[4].status == STATUS_SKIPPED and "single voxel" in results[4].reason
    assert results[7].status == STATUS_OK
    assert all(not r.features for r in results.values() if r.status == STATUS_SKIPPED)


def test_prediction_mode_equals_full_extraction(radiomics_scan):
    s = radiomics_scan
    full = extract_features(s.hu, s.regions, s.spacing_mm, regions=[3, 7], n_jobs=1)
    wanted = ["original_shape2D_Perimeter", "wavelet-HL_glszm_ZoneEntropy",
              "gradient_glcm_MCC", "exponential_firstorder_Mean"]
    subset = extract_features(s.hu, s.regions, s.spacing_mm, features={7: wanted}, n_jobs=1)
    assert [r.region_label for r in subset.rows] == [7, 7, 7]
    assert subset.feature_names == sorted(wanted, key=full.feature_names.index)
    for a, b in zip([r for r in full.rows if r.region_label == 7], subset.rows, strict=True):
        assert {k: a.features[k] for k in wanted} == b.features


def test_parallel_workers_give_identical_rows(radiomics_scan):
    s = radiomics_scan
    serial = extract_features(s.hu, s.regions, s.spacing_mm, regions=[4, 6], n_jobs=1)
    parallel = extract_features(s.hu, s.regions, s.spacing_mm, regions=[4, 6], n_jobs=2)
    assert [(r.slice_index, r.region_label, r.status) for r in serial.rows] == \
        [(r.slice_index, r.region_label, r.status) for r in parallel.rows]
    for a, b in zip(serial.rows, parallel.rows, strict=True):
        assert a.features == b.features


@pytest.mark.slow  # over 20 s on 2 loaded cores
def test_scan_mode_is_3d_and_equals_direct_call(radiomics_scan):
    s = radiomics_scan
    table = extract_features(s.hu, s.regions, s.spacing_mm, mode="scan", regions=[4, 5],
                             scan_margin_voxels=100)
    by_label = {r.region_label: r for r in table.rows}
    assert by_label[5].status == STATUS_SKIPPED
    r = by_label[4]
    assert r.slice_index is None and r.voxel_count == int((s.regions == 4).sum())
    assert "original_shape_VoxelVolume" in r.features
    assert not any("shape2D" in k for k in r.features)
    assert "wavelet-LLH_firstorder_Mean" in r.features  # 3D wavelet: 8 bands
    params = settings_for_mode(load_settings("paper"), "scan")
    dz, dy, dx = s.spacing_mm
    # The margin covers the whole crop, so the engine saw the same volume.
    direct = direct_pyradiomics(params, s.hu, s.regions, (dx, dy, dz), 4)
    _assert_same(r.features, direct)


def test_bad_inputs_raise_clear_errors(radiomics_scan):
    from HRpQCTCore.errors import HRpQCTError, InvalidScanError

    s = radiomics_scan
    with pytest.raises(InvalidScanError, match="same shape"):
        extract_features(s.hu, s.regions[:2], s.spacing_mm)
    with pytest.raises(HRpQCTError, match="Unknown region"):
        extract_features(s.hu, s.regions, s.spacing_mm, regions=[9])
    with pytest.raises(HRpQCTError, match="not a pyradiomics feature name"):
        extract_features(s.hu, s.regions, s.spacing_mm, features=["Mean"])
    with pytest.raises(HRpQCTError, match=r"Unknown radiomics preset|does not exist"):
        load_settings("papr")
