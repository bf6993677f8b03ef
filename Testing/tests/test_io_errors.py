"""Bad input gives the specific error with what-to-do text, and unusual spacing a warning."""

import gzip
import logging

import numpy as np
import pytest
import SimpleITK as sitk
from _fixtures_io import TEST_CALIBRATION, make_hu_volume, write_minimal_isq

from HRpQCTCore.errors import (
    CalibrationError,
    CorruptFileError,
    InputFileError,
    InvalidScanError,
    UnsupportedFormatError,
)
from HRpQCTCore.io import read_scan, write_scan, write_scan_aim
from HRpQCTCore.scan import Scan


def test_missing_path(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_scan(tmp_path / "nope.nii.gz")


def test_unknown_extension(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"not an image at all" * 10)
    with pytest.raises(UnsupportedFormatError, match="NIfTI"):
        read_scan(path)


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.aim", "empty.isq", "empty.nrrd"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    with pytest.raises(InputFileError, match="empty"):
        read_scan(tmp_path / name)


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


@pytest.mark.parametrize("name", ["s.nii", "s.nii.gz", "s.nrrd", "s.mha"])
def test_truncated_sitk_files(tmp_path, hu_scan, name):
    path = _truncate(write_scan(hu_scan, tmp_path / name))
    with pytest.raises(CorruptFileError, match=r"truncated|damaged"):
        read_scan(path)


def test_truncated_and_fake_scanco_files(tmp_path, aim_scan):
    aim = _truncate(write_scan_aim(aim_scan, tmp_path / "s.aim"))
    with pytest.raises(CorruptFileError, match="truncated"):
        read_scan(aim)
    native = np.rint(TEST_CALIBRATION.hu_to_native(make_hu_volume())).astype(np.int16)
    isq = _truncate(write_minimal_isq(tmp_path / "s.isq", native), 0.7)
    with pytest.raises(CorruptFileError, match="truncated"):
        read_scan(isq)
    fake = tmp_path / "fake.isq"
    fake.write_bytes(b"x" * 2000)
    with pytest.raises(CorruptFileError, match="not a Scanco ISQ"):
        read_scan(fake)
    fake_aim = tmp_path / "fake.aim"
    fake_aim.write_bytes(b"x" * 2000)
    with pytest.raises(CorruptFileError):
        read_scan(fake_aim)


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(CorruptFileError):
        read_scan(path)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(make_hu_volume()[0]), str(path))
    with pytest.raises(InvalidScanError, match="2D"):
        read_scan(path)


def test_single_slice_volume(tmp_path):
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(make_hu_volume()[:1]), str(path))
    with pytest.raises(InvalidScanError, match="single slice"):
        read_scan(path)


def test_4d_image(tmp_path):
    path = tmp_path / "series4d.nii.gz"
    volumes = [sitk.GetImageFromArray(np.zeros((4, 16, 16), np.int16)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(path))
    with pytest.raises(InvalidScanError, match="4D"):
        read_scan(path)


def test_4d_with_one_time_point_is_a_3d_scan(tmp_path):
    hu = make_hu_volume()
    image = sitk.JoinSeries([sitk.GetImageFromArray(hu)])  # 4D, last axis of length 1
    image.SetSpacing((0.0607, 0.0607, 0.0607, 1.0))
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(image, str(path))
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.hu, hu)


@pytest.mark.parametrize("name", ["rgb.nrrd", "vector.mha"])
def test_multi_component_image(tmp_path, name):
    image = sitk.GetImageFromArray(np.zeros((4, 16, 16, 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(tmp_path / name))
    with pytest.raises(InvalidScanError, match="values per voxel"):
        read_scan(tmp_path / name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.nrrd", "bad.mha"])
def test_non_finite_values(tmp_path, hu_scan, bad, name):
    """NIfTI included: ITK's reader would turn NaN/Inf into 0 silently."""
    hu = hu_scan.hu.copy()
    hu[3, 10, 10] = bad
    path = write_scan(hu_scan.with_array(hu), tmp_path / name)
    with pytest.raises(InvalidScanError, match="NaN or infinite"):
        read_scan(path)


def test_unusual_spacing_warns_and_records(tmp_path, hu_scan, caplog):
    scan = Scan(hu=hu_scan.hu, spacing_mm=(0.5, 0.3, 0.3))
    with caplog.at_level(logging.WARNING):
        back = read_scan(write_scan(scan, tmp_path / "ct.nii.gz"))
    assert len(back.metadata["warnings"]) == 1
    assert "--resample-mm 0.0607" in back.metadata["warnings"][0]
    assert "far from HR-pQCT" in caplog.text
    xtremect1 = Scan(hu=hu_scan.hu, spacing_mm=(0.082,) * 3)
    assert read_scan(write_scan(xtremect1, tmp_path / "x1.nii.gz")).metadata["warnings"] == []


def test_values_not_like_hu_need_units(tmp_path, hu_scan):
    native = TEST_CALIBRATION.hu_to_native(hu_scan.hu)
    path = write_scan(hu_scan.with_array(native), tmp_path / "native.nii.gz")
    with pytest.raises(CalibrationError, match="--units native"):
        read_scan(path)
    with pytest.raises(CalibrationError, match="no calibration"):
        read_scan(path, units="native")
    scan = read_scan(path, units="native", calibration=TEST_CALIBRATION)
    np.testing.assert_allclose(scan.hu, hu_scan.hu, atol=0.05)
    density = TEST_CALIBRATION.hu_to_density(hu_scan.hu)
    dpath = write_scan(hu_scan.with_array(density), tmp_path / "density.nrrd")
    with pytest.raises(CalibrationError):
        read_scan(dpath)
    np.testing.assert_allclose(read_scan(dpath, "density", TEST_CALIBRATION).hu, hu_scan.hu,
                               atol=0.05)


def test_unknown_units_word(tmp_path, hu_scan):
    path = write_scan(hu_scan, tmp_path / "s.nii.gz")
    with pytest.raises(CalibrationError, match="Unknown units"):
        read_scan(path, units="kelvin")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "dicom").mkdir()
    with pytest.raises(InputFileError, match="No DICOM series"):
        read_scan(tmp_path / "dicom")


def test_unknown_output_extension(tmp_path, hu_scan):
    with pytest.raises(UnsupportedFormatError, match=r"\.nii\.gz"):
        write_scan(hu_scan, tmp_path / "out.png")
