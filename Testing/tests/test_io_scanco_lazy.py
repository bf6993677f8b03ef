"""Scanco int16 voxels read slab by slab (lazy reads): the same bits as a whole-volume read.

``read_scan`` converts an uncompressed int16 AIM or ISQ to HU slab by slab from the file,
without holding the int16 volume beside the float32 result; here the result is compared with
AimIO's whole-volume read converted at once.
"""

import numpy as np
import pytest
from _fixtures_io import (
    TEST_CALIBRATION,
    make_hu_volume,
    write_aim_with_identifiers,
    write_minimal_isq,
)

from HRpQCTCore.errors import CorruptFileError
from HRpQCTCore.io import read_scan, readers, scanco

SHAPE = (19, 48, 40)  # 19 slices: slabs of 8, 8 and 3


def _native(shape=SHAPE) -> np.ndarray:
    hu = make_hu_volume(shape, seed=3)
    return np.rint(TEST_CALIBRATION.hu_to_native(hu)).astype(np.int16)


@pytest.fixture
def int16_aim(tmp_path):
    return write_aim_with_identifiers(tmp_path / "scan.aim", _native())


def test_lazy_aim_gives_the_voxels_aimio_reads(int16_aim):
    lazy = scanco.read_aim(int16_aim, lazy=True)
    whole = scanco.read_aim(int16_aim)
    assert lazy.array is None and lazy.voxels is not None
    assert whole.voxels is None and whole.array.dtype == np.int16
    assert lazy.shape == whole.shape == SHAPE
    voxels = lazy.voxels.read(0, SHAPE[0])
    assert voxels.dtype == np.int16
    np.testing.assert_array_equal(voxels, whole.array)
    np.testing.assert_array_equal(lazy.voxels.read(5, 9), whole.array[5:9])
    for name in ("spacing_mm", "origin_mm", "calibration", "kind", "facts"):
        assert getattr(lazy, name) == getattr(whole, name), name


@pytest.mark.parametrize("units", ["auto", "native", "density", "hu"])
def test_read_scan_of_an_aim_equals_converting_the_whole_volume(int16_aim, units):
    stored = scanco.read_aim(int16_aim).array
    expected = {"auto": TEST_CALIBRATION.native_to_hu, "native": TEST_CALIBRATION.native_to_hu,
                "density": TEST_CALIBRATION.density_to_hu,
                "hu": lambda a: np.asarray(a, dtype=np.float32)}[units](stored)
    scan = read_scan(int16_aim, units=units)
    assert scan.hu.dtype == np.float32 and scan.hu.flags.c_contiguous
    np.testing.assert_array_equal(scan.hu, expected)
    assert scan.metadata["dtype_on_disk"] == "int16"


@pytest.mark.parametrize("slab", [1, 3, 64])
def test_the_slab_size_does_not_change_the_result(int16_aim, monkeypatch, slab):
    expected = TEST_CALIBRATION.native_to_hu(scanco.read_aim(int16_aim).array)
    monkeypatch.setattr(readers, "_CONVERT_SLICES", slab)
    np.testing.assert_array_equal(read_scan(int16_aim).hu, expected)


def test_lazy_aim_with_a_latin1_log(tmp_path):
    path = write_aim_with_identifiers(tmp_path / "latin.aim", _native())
    data = bytearray(path.read_bytes())
    at = data.index(b"ISQ_TO_AIM")
    data[at:at + 6] = "Bjørn ".encode("latin-1")  # same length: the layout stays
    path.write_bytes(bytes(data))
    lazy = scanco.read_aim(path, lazy=True)
    assert lazy.voxels is not None  # the header was read from a cleaned copy
    assert lazy.calibration == TEST_CALIBRATION
    np.testing.assert_array_equal(read_scan(path).hu,
                                  TEST_CALIBRATION.native_to_hu(scanco.read_aim(path).array))


def test_isq_lazy_and_whole_reads_agree(tmp_path):
    path = write_minimal_isq(tmp_path / "scan.isq", _native(), calibration=TEST_CALIBRATION)
    lazy, whole = scanco.read_isq(path, lazy=True), scanco.read_isq(path)
    assert lazy.array is None and whole.voxels is None
    np.testing.assert_array_equal(lazy.voxels.read(0, SHAPE[0]), whole.array)
    np.testing.assert_array_equal(read_scan(path).hu, whole.calibration.native_to_hu(whole.array))


def test_types_only_aimio_reads_come_whole(tmp_path, aim_scan):
    mask = np.zeros(aim_scan.shape, np.int8)
    mask[:, 10:30, 10:50] = 1
    path = tmp_path / "mask.aim"
    scanco.write_aim(path, mask, aim_scan.spacing_mm, aim_scan.origin_mm, None)  # compressed
    volume = scanco.read_aim(path, lazy=True)
    assert volume.voxels is None
    np.testing.assert_array_equal(volume.array, mask)
    floats = tmp_path / "float.aim"
    scanco.write_aim(floats, aim_scan.hu, aim_scan.spacing_mm, aim_scan.origin_mm, None)
    volume = scanco.read_aim(floats, lazy=True)
    assert volume.voxels is None and volume.array.dtype == np.float32


def test_a_cut_int16_aim_is_still_refused(int16_aim):
    data = int16_aim.read_bytes()
    int16_aim.write_bytes(data[:len(data) - 1000])  # voxels missing at the end
    with pytest.raises(CorruptFileError, match="truncated"):  # AimIO's read says why
        scanco.read_aim(int16_aim, lazy=True)
    with pytest.raises(CorruptFileError):
        read_scan(int16_aim)


def test_voxels_beyond_the_end_of_the_file_are_refused(int16_aim):
    voxels = scanco.read_aim(int16_aim, lazy=True).voxels
    beyond = scanco.Int16Voxels(voxels.path, voxels.offset, (SHAPE[0] + 2, *SHAPE[1:]))
    with pytest.raises(CorruptFileError, match="truncated"):
        beyond.read(SHAPE[0], SHAPE[0] + 2)
