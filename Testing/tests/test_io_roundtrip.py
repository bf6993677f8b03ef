"""Every format round trip through read_scan / write_scan with files the tests make."""

import numpy as np
import pytest
import SimpleITK as sitk
from _fixtures_io import SPACING_MM, make_hu_volume, write_dicom_series

from HRpQCTCore.io import (
    read_scan,
    resample_to_spacing,
    write_label_map,
    write_scan,
)
from HRpQCTCore.scan import Scan


def assert_same_geometry(a: Scan, b: Scan) -> None:
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(a.origin_mm, b.origin_mm, atol=1e-5)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha"])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_write_then_read_preserves_values_and_geometry(tmp_path, hu_scan, name, dtype):
    path = write_scan(hu_scan, tmp_path / name, dtype=dtype)
    back = read_scan(path)
    assert back.hu.dtype == np.float32
    np.testing.assert_array_equal(back.hu, hu_scan.hu)  # integer-valued HU: exact either way
    assert_same_geometry(back, hu_scan)
    assert back.metadata["units_on_disk"] == "hu"
    assert back.metadata["units_source"].startswith("assumed")
    assert back.metadata["dtype_on_disk"] == dtype
    assert back.metadata["warnings"] == []
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_int16_output_rounds_and_clips(tmp_path, hu_scan):
    hu = hu_scan.hu.copy()
    hu[0, 0, 0], hu[0, 0, 1], hu[0, 0, 2] = 12.4, 40000.0, -1000.6
    back = read_scan(write_scan(hu_scan.with_array(hu), tmp_path / "s.nrrd", dtype="int16"),
                     units="hu")
    assert back.hu[0, 0, :3].tolist() == [12.0, 32767.0, -1001.0]


@pytest.mark.parametrize("header,data", [("scan.nhdr", "raw.gz"), ("scan.mhd", "raw")])
def test_detached_headers_are_read(tmp_path, hu_scan, header, data):
    sitk.WriteImage(hu_scan.to_sitk(), str(tmp_path / header), True)
    back = read_scan(tmp_path / header)
    np.testing.assert_array_equal(back.hu, hu_scan.hu)
    assert_same_geometry(back, hu_scan)


def test_dicom_series_folder_and_single_file(tmp_path):
    hu = make_hu_volume()
    folder = write_dicom_series(tmp_path / "series", hu, origin_mm=(1.5, -2.0, 30.0))
    for target in (folder, folder / "slice004.dcm"):
        scan = read_scan(target)
        np.testing.assert_array_equal(scan.hu, hu)
        np.testing.assert_allclose(scan.spacing_mm, SPACING_MM, rtol=1e-5)
        np.testing.assert_allclose(scan.origin_mm, (1.5, -2.0, 30.0), atol=1e-4)
        assert scan.metadata["source_format"] == "dicom"
        assert scan.metadata["units_on_disk"] == "hu"  # modality CT: HU by the header
        assert scan.metadata["scanner"]["manufacturer"] == "TESTVENDOR"


def test_label_map_is_uint8_on_the_reference_grid(tmp_path, hu_scan):
    labels = (np.arange(hu_scan.hu.size) % 8).reshape(hu_scan.shape).astype(np.int64)
    for name in ("labels.nii.gz", "labels.nrrd"):
        path = write_label_map(labels, hu_scan, tmp_path / name)
        image = sitk.ReadImage(str(path))
        assert image.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
        back = read_scan(path, units="hu")
        assert_same_geometry(back, hu_scan)


def test_label_map_rejects_wrong_shape_and_values(tmp_path, hu_scan):
    from HRpQCTCore.errors import InvalidScanError, UnsupportedFormatError

    with pytest.raises(InvalidScanError, match="shape"):
        write_label_map(np.zeros((2, 2, 2), np.uint8), hu_scan, tmp_path / "l.nii.gz")
    with pytest.raises(InvalidScanError, match=r"0\.\.255"):
        write_label_map(np.full(hu_scan.shape, 300), hu_scan, tmp_path / "l.nii.gz")
    with pytest.raises(UnsupportedFormatError, match="Cannot write"):
        write_label_map(np.zeros(hu_scan.shape, np.uint8), hu_scan, tmp_path / "l.tif")
    with pytest.raises(UnsupportedFormatError, match="write_label_map"):
        write_scan(hu_scan, tmp_path / "s.seg.nrrd")  # a segmentation holds labels, not HU
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, hu_scan):
    target = tmp_path / "scan.nii.gz"
    write_scan(hu_scan, target)
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_scan(hu_scan, target, dtype="float64")
    assert target.read_bytes() == before


def test_resample_to_spacing_keeps_extent_and_values(hu_scan):
    coarse = resample_to_spacing(hu_scan, 0.0607 * 2)
    assert coarse.shape == (4, 32, 32)
    assert coarse.spacing_mm == (0.1214, 0.1214, 0.1214)
    assert coarse.origin_mm == hu_scan.origin_mm and coarse.direction == hu_scan.direction
    assert coarse.hu.dtype == np.float32
    # Voxel [0,0,0] sits on the same physical point: identical value; air stays air.
    assert coarse.hu[0, 0, 0] == pytest.approx(hu_scan.hu[0, 0, 0])
    assert abs(float(np.median(coarse.hu[:, :3, :3])) + 1000) < 150
    assert coarse.metadata["resampled_from_spacing_mm"] == list(hu_scan.spacing_mm)
    anisotropic = resample_to_spacing(hu_scan, (0.0607 * 4, 0.0607, 0.0607))
    assert anisotropic.shape == (2, 64, 64)
    np.testing.assert_allclose(anisotropic.hu[0], hu_scan.hu[0], atol=1e-3)


def test_progress_is_reported(tmp_path, hu_scan):
    seen = []
    read_scan(write_scan(hu_scan, tmp_path / "s.nii.gz"),
              progress=lambda d, t, s: seen.append((d, t, s)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
