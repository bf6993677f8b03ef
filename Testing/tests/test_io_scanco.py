"""Scanco AIM/ISQ through read_scan and write_scan_aim (aimio-py; ISQ built by hand)."""

import json

import numpy as np
import pytest
from _fixtures_io import (
    PLANTED_BIRTH,
    PLANTED_ID,
    PLANTED_NAME,
    TEST_CALIBRATION,
    make_hu_volume,
    write_aim_with_identifiers,
    write_dicom_series,
    write_minimal_isq,
)

from HRpQCTCore.errors import CalibrationError
from HRpQCTCore.io import read_scan, write_scan, write_scan_aim
from HRpQCTCore.scan import Calibration
from HRpQCTPipeline.cli import main

NATIVE_STEP_HU = 1000.0 / (TEST_CALIBRATION.mu_water * TEST_CALIBRATION.mu_scaling)  # ~0.51


def native_of(hu: np.ndarray, cal: Calibration = TEST_CALIBRATION) -> np.ndarray:
    return np.rint(cal.hu_to_native(hu)).astype(np.int16)


def test_calibrated_int16_aim_reads_as_hu_with_geometry(tmp_path):
    hu = make_hu_volume()
    path = write_aim_with_identifiers(tmp_path / "C0001.AIM", native_of(hu), position=(10, 20, 30))
    scan = read_scan(path)
    assert scan.hu.dtype == np.float32
    np.testing.assert_allclose(scan.hu, hu, atol=NATIVE_STEP_HU / 2 + 1e-3)
    np.testing.assert_allclose(scan.spacing_mm, (0.0607,) * 3)
    np.testing.assert_allclose(scan.origin_mm, (10 * 0.0607, 20 * 0.0607, 30 * 0.0607), rtol=1e-6)
    assert scan.calibration == TEST_CALIBRATION
    meta = scan.metadata
    assert (meta["source_format"], meta["units_on_disk"], meta["calibration_source"]) == \
        ("aim", "native", "header")
    assert meta["scanner"]["processing_log"]["Energy [V]"] == "68000"


def test_vms_version_suffix_is_accepted(tmp_path):
    path = write_aim_with_identifiers(tmp_path / "C0001.AIM;1", native_of(make_hu_volume()))
    assert read_scan(path).metadata["source_format"] == "aim"


def test_user_calibration_overrides_header_and_units_density(tmp_path):
    hu = make_hu_volume()
    path = write_aim_with_identifiers(tmp_path / "a.aim", native_of(hu))
    other = Calibration(8192.0, 0.2402, 1633.0, -396.0, source="user")
    scan = read_scan(path, calibration=other)
    np.testing.assert_allclose(scan.hu, other.native_to_hu(native_of(hu)), atol=1e-3)
    assert scan.metadata["calibration_source"] == "user"
    # Declaring the stored values as density converts them through the calibration.
    as_density = read_scan(path, units="density")
    np.testing.assert_allclose(
        as_density.hu, TEST_CALIBRATION.density_to_hu(native_of(hu).astype(np.float32)),
        rtol=1e-5, atol=1e-2)


def test_aim_without_calibration_needs_one(tmp_path):
    hu = make_hu_volume()
    path = write_aim_with_identifiers(tmp_path / "raw.aim", native_of(hu), calibration=None)
    with pytest.raises(CalibrationError, match="--mu-scaling"):
        read_scan(path)
    scan = read_scan(path, calibration=Calibration(source="user"))
    np.testing.assert_allclose(scan.hu, hu, atol=NATIVE_STEP_HU / 2 + 1e-3)


@pytest.mark.parametrize("values", [(0, 127), (0, 1, 2, 3, 4, 5, 6, 7)])
def test_char_mask_aims_read_compressed(tmp_path, aim_scan, values):
    """int8 AIMs are written compressed (binary or run-length) and read back exactly."""
    import py_aimio

    mask = np.zeros(aim_scan.shape, np.int8)
    for i, v in enumerate(values[1:], start=1):
        mask[:, 4 * i:4 * i + 6, 10:50] = v
    path = tmp_path / "mask.aim"
    from HRpQCTCore.io import scanco

    scanco.write_aim(path, mask, aim_scan.spacing_mm, aim_scan.origin_mm, None)
    assert path.stat().st_size < mask.size  # compressed on disk
    assert py_aimio.aim_info(str(path))["aim_type"] in (0x150001, 0x80002)  # bin / char Cmp
    scan = read_scan(path)
    assert scan.metadata["units_on_disk"] == "label"
    np.testing.assert_array_equal(scan.hu, mask.astype(np.float32))


def test_write_scan_aim_round_trip(tmp_path, aim_scan):
    path = write_scan_aim(aim_scan, tmp_path / "phantom.aim")
    back = read_scan(path)
    np.testing.assert_allclose(back.hu, aim_scan.hu, atol=NATIVE_STEP_HU / 2 + 1e-3)
    np.testing.assert_allclose(back.origin_mm, aim_scan.origin_mm, rtol=1e-6)
    np.testing.assert_allclose(back.spacing_mm, aim_scan.spacing_mm)
    assert back.calibration.mu_scaling == TEST_CALIBRATION.mu_scaling
    assert back.calibration.density_intercept == pytest.approx(
        TEST_CALIBRATION.density_intercept, abs=1e-6)
    hu_path = write_scan_aim(aim_scan, tmp_path / "hu.aim", units="hu")
    np.testing.assert_array_equal(read_scan(hu_path, units="hu").hu, aim_scan.hu)
    with pytest.raises(CalibrationError):  # an AIM is native unless told otherwise
        read_scan(hu_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hu.aim", "phantom.aim"]


def test_minimal_isq_with_and_without_calibration(tmp_path):
    hu = make_hu_volume()
    calibrated = write_minimal_isq(tmp_path / "c.isq", native_of(hu), calibration=TEST_CALIBRATION)
    scan = read_scan(calibrated)
    np.testing.assert_allclose(scan.hu, hu, atol=NATIVE_STEP_HU / 2 + 1e-3)
    assert scan.calibration.mu_water == pytest.approx(TEST_CALIBRATION.mu_water)
    assert scan.calibration.density_slope == pytest.approx(TEST_CALIBRATION.density_slope)
    np.testing.assert_allclose(scan.spacing_mm, (0.0607,) * 3, rtol=2e-3)  # µm-rounded header
    plain = write_minimal_isq(tmp_path / "p.isq", native_of(hu))
    with pytest.raises(CalibrationError):
        read_scan(plain)
    user = read_scan(plain, units="native", calibration=TEST_CALIBRATION)
    np.testing.assert_allclose(user.hu, hu, atol=NATIVE_STEP_HU / 2 + 1e-3)


def test_planted_identifiers_never_reach_metadata_or_outputs(tmp_path):
    hu = make_hu_volume()
    inputs = [
        write_aim_with_identifiers(tmp_path / "in.aim", native_of(hu)),
        write_minimal_isq(tmp_path / "in.isq", native_of(hu), calibration=TEST_CALIBRATION),
        write_dicom_series(tmp_path / "dicom", hu),
    ]
    secrets = [s.encode() for s in (PLANTED_NAME, "SECRETNAME", PLANTED_ID, PLANTED_BIRTH,
                                    "93817264")]
    out = tmp_path / "out"
    out.mkdir()
    for i, path in enumerate(inputs):
        scan = read_scan(path)
        text = json.dumps(scan.metadata, default=str).encode()
        assert not any(s in text for s in secrets), scan.metadata
        write_scan(scan, out / f"{i}.nii.gz")
        write_scan(scan, out / f"{i}.nrrd", dtype="int16")
        write_scan(scan, out / f"{i}.mha")
        write_scan_aim(scan, out / f"{i}.aim")
        assert main(["convert", str(path), str(out / f"cli{i}.nrrd")]) == 0
    assert any(PLANTED_NAME.encode() in p.read_bytes() for p in inputs[:2])  # planted for real
    for written in out.iterdir():
        data = written.read_bytes()
        if written.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        assert not any(s in data for s in secrets), written.name
