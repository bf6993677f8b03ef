"""``hrpqct convert`` end to end through HRpQCTPipeline.cli.main."""

import numpy as np
import pytest
import SimpleITK as sitk
from _fixtures_io import TEST_CALIBRATION, make_hu_volume, write_aim_with_identifiers

from HRpQCTCore.io import read_scan, write_scan
from HRpQCTCore.scan import Scan
from HRpQCTPipeline.cli import main


def test_convert_aim_to_nifti_prints_summary(tmp_path, capsys):
    hu = make_hu_volume()
    native = np.rint(TEST_CALIBRATION.hu_to_native(hu)).astype(np.int16)
    src = write_aim_with_identifiers(tmp_path / "scan.aim", native)
    out = tmp_path / "scan.nii.gz"
    assert main(["convert", str(src), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "8x64x64" in line and "0.0607" in line and "native units" in line
    assert "calibration: header" in line
    back = read_scan(out)
    np.testing.assert_allclose(back.hu, hu, atol=0.3)
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkFloat32


def test_convert_native_nifti_with_user_calibration_int16_nrrd(tmp_path, hu_scan):
    src = write_scan(hu_scan.with_array(TEST_CALIBRATION.hu_to_native(hu_scan.hu)),
                     tmp_path / "native.nii.gz")
    out = tmp_path / "hu.nrrd"
    args = ["convert", str(src), str(out), "--units", "native", "--mu-scaling", "8192",
            "--mu-water", "0.2409", "--dtype", "int16"]
    assert main(args) == 0
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu_scan.hu.astype(np.int16))
    np.testing.assert_allclose(image.GetDirection(), hu_scan.direction, atol=1e-6)


def test_convert_resamples(tmp_path, hu_scan, capsys):
    coarse = Scan(hu=hu_scan.hu, spacing_mm=(0.1214,) * 3)
    src = write_scan(coarse, tmp_path / "coarse.nii.gz")
    out = tmp_path / "fine.nii.gz"
    assert main(["convert", str(src), str(out), "--resample-mm", "0.0607"]) == 0
    back = read_scan(out)
    assert back.shape == (16, 128, 128)
    assert back.spacing_mm == pytest.approx((0.0607,) * 3)
    assert back.metadata["warnings"] == []


@pytest.mark.parametrize("case,code", [
    ("missing", 3), ("empty", 3), ("unknown", 3), ("truncated", 3), ("not_hu", 5),
    ("nan", 4), ("bad_output", 2), ("exists", 2), ("bad_calibration", 2), ("bad_resample", 2),
])
def test_convert_exit_codes(tmp_path, hu_scan, capsys, case, code):
    good = write_scan(hu_scan, tmp_path / "good.nii.gz")
    out = tmp_path / "out.nii.gz"
    extra: list[str] = []
    src = good
    if case == "missing":
        src = tmp_path / "missing.aim"
    elif case == "empty":
        src = tmp_path / "empty.nii.gz"
        src.touch()
    elif case == "unknown":
        src = tmp_path / "scan.tiff"
        src.write_bytes(b"II*\x00" + bytes(100))
    elif case == "truncated":
        src = tmp_path / "cut.nii"
        write_scan(hu_scan, src)
        src.write_bytes(src.read_bytes()[:5000])
    elif case == "not_hu":
        src = write_scan(hu_scan.with_array(hu_scan.hu + 1000), tmp_path / "native.nrrd")
    elif case == "nan":
        hu = hu_scan.hu.copy()
        hu[0, 0, 0] = np.nan
        src = write_scan(hu_scan.with_array(hu), tmp_path / "nan.nii.gz")
    elif case == "bad_output":
        out = tmp_path / "out.png"
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "bad_calibration":
        extra = ["--units", "native", "--mu-water", "-1"]
    elif case == "bad_resample":
        extra = ["--resample-mm", "0"]
    assert main(["convert", str(src), str(out), *extra]) == code
    err = capsys.readouterr().err
    assert err.startswith("hrpqct convert: error:")
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    elif case != "bad_output":
        assert not out.exists()


def test_convert_overwrite(tmp_path, hu_scan):
    src = write_scan(hu_scan, tmp_path / "in.nii.gz")
    out = tmp_path / "out.nrrd"
    out.write_bytes(b"old")
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(read_scan(out).hu, hu_scan.hu)


def test_convert_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "hrpqct convert C0001234.AIM scan.nii.gz" in text
    assert "--resample-mm" in text and "--dtype" in text
