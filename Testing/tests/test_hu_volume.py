"""Integer scans kept as stored (StoredHUVolume): the same HU everywhere, no whole float copy."""

import functools
import json
import logging
import pickle

import numpy as np
import pytest
from _fixtures_io import TEST_CALIBRATION, make_hu_volume, write_aim_with_identifiers

from HRpQCTCore import io
from HRpQCTCore.hu_volume import StoredHUVolume, as_hu_volume
from HRpQCTCore.scan import Scan

SHAPE = (11, 48, 40)


@pytest.fixture
def native():
    hu = make_hu_volume(SHAPE, seed=5)
    return np.rint(TEST_CALIBRATION.hu_to_native(hu)).astype(np.int16)


@pytest.fixture
def stored(native):
    return StoredHUVolume(native, TEST_CALIBRATION.native_to_hu)


def test_every_read_gives_the_bits_of_the_whole_conversion(native, stored):
    whole = TEST_CALIBRATION.native_to_hu(native)
    box = (slice(2, 9), slice(5, 40), slice(3, 31))
    assert stored.shape == SHAPE and stored.ndim == 3 and stored.dtype == np.float32
    assert len(stored) == SHAPE[0] and stored.size == whole.size
    assert stored.stored_nbytes == native.nbytes == whole.nbytes // 2
    np.testing.assert_array_equal(np.asarray(stored), whole)
    np.testing.assert_array_equal(stored[4], whole[4])
    np.testing.assert_array_equal(stored[[0, 7, 3]], whole[[0, 7, 3]])
    np.testing.assert_array_equal(stored[2:5, 10], whole[2:5, 10])
    np.testing.assert_array_equal(np.stack(list(stored)), whole)
    # views keeping all three axes stay stored; reading them is reading the whole's part
    for view, expected in ((stored[2:6], whole[2:6]), (stored[box], whole[box]),
                           (stored[box][1:3], whole[box][1:3])):
        assert isinstance(view, StoredHUVolume)
        np.testing.assert_array_equal(np.asarray(view), expected)
        np.testing.assert_array_equal(view[1], expected[1])
    assert stored.min() == whole.min() and stored.max() == whole.max()
    assert stored[box].max() == whole[box].max()


def test_it_works_as_a_read_only_float32_array_elsewhere(native, stored):
    whole = TEST_CALIBRATION.native_to_hu(native)
    np.testing.assert_array_equal(stored > 100, whole > 100)
    np.testing.assert_array_equal(stored[1:3] * 2 - 1, whole[1:3] * 2 - 1)
    np.testing.assert_array_equal(np.clip(stored, 0, 500), np.clip(whole, 0, 500))
    np.testing.assert_array_equal(np.percentile(stored, [1, 50]), np.percentile(whole, [1, 50]))
    assert stored.mean() == whole.mean()
    assert stored.astype(np.float64).dtype == np.float64
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(stored))), whole)
    assert as_hu_volume(stored) is stored and isinstance(as_hu_volume([[[1]]]), np.ndarray)
    with pytest.raises(TypeError, match="read-only"):
        stored[0, 0, 0] = 1.0
    assert not stored.stored.flags.writeable
    with pytest.raises(TypeError):
        StoredHUVolume(whole, TEST_CALIBRATION.native_to_hu)  # floats are not "stored"
    scan = Scan(hu=stored, spacing_mm=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(
        __import__("SimpleITK").GetArrayFromImage(scan.to_sitk()), whole)


def test_int16_files_are_kept_as_stored_and_read_as_before(tmp_path, native):
    aim = write_aim_with_identifiers(tmp_path / "scan.aim", native)
    kept, converted = io.read_scan(aim), io.read_scan(aim, keep_stored=False)
    assert isinstance(kept.hu, StoredHUVolume) and kept.hu.stored.dtype == np.int16
    assert isinstance(converted.hu, np.ndarray) and converted.hu.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(kept.hu), converted.hu)
    assert kept.metadata == converted.metadata
    nifti = tmp_path / "scan.nii.gz"
    io.write_scan(converted, nifti, dtype="int16")
    assert isinstance(io.read_scan(nifti).hu, StoredHUVolume)
    io.write_scan(converted, tmp_path / "float.nii.gz")  # float32 on disk: an array as ever
    assert isinstance(io.read_scan(tmp_path / "float.nii.gz").hu, np.ndarray)


def test_a_run_reads_the_stored_scan_slice_by_slice_with_the_same_results(
        tmp_path, pipeline_scans, tiny_model_folder, monkeypatch, caplog):
    """`hrpqct run` on an int16 scan gives what it gives on the converted float32 volume,
    and never converts the whole volume (the memory a full scan saves: 0.8 GiB)."""
    from HRpQCTPipeline.cli import main

    scan = pipeline_scans[0].scan
    args = ["run", str(scan), "--model", str(tiny_model_folder), "--classifier", "none",
            "--jobs", "1", "--progress", "none", "--units", "hu"]
    with caplog.at_level(logging.DEBUG, logger="HRpQCTCore.hu_volume"):
        assert main([*args, "--out", str(tmp_path / "stored")]) == 0
    assert not [r for r in caplog.records if "whole stored volume" in r.getMessage()]
    monkeypatch.setattr(io, "read_scan", functools.partial(io.read_scan, keep_stored=False))
    assert main([*args, "--out", str(tmp_path / "converted")]) == 0
    for name in ("scan0_regions.nii.gz", "scan0_regions.seg.nrrd"):
        np.testing.assert_array_equal(io.read_label_map(tmp_path / "stored" / name),
                                      io.read_label_map(tmp_path / "converted" / name))
    assert ((tmp_path / "stored" / "scan0_features.csv").read_text(encoding="utf-8")
            == (tmp_path / "converted" / "scan0_features.csv").read_text(encoding="utf-8"))

    def qc(folder):
        record = json.loads((folder / "scan0_qc.json").read_text(encoding="utf-8"))
        return {k: record[k] for k in ("regions", "motion", "confidence", "warnings")}

    assert qc(tmp_path / "stored") == qc(tmp_path / "converted")


def test_numpy_reductions_of_the_whole_go_slice_by_slice(native, stored, caplog):
    whole = TEST_CALIBRATION.native_to_hu(native)
    with caplog.at_level(logging.DEBUG, logger="HRpQCTCore.hu_volume"):
        assert np.min(stored) == whole.min() and np.max(stored) == whole.max()
        assert getattr(stored, "hu", None) is None  # not an ndarray attribute: no conversion
    assert not caplog.records
