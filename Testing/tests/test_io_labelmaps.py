"""One label-map reader and writer: Slicer ``.seg.nrrd`` and images, with the same checks."""

import numpy as np
import pytest

from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTCore.io import (
    compound_suffix,
    label_map_format,
    read_label_map,
    write_label_map,
)
from HRpQCTCore.io.segnrrd import read_seg_nrrd
from HRpQCTCore.regions import NETWORK_CLASSES, REGIONS


def _region_labels(shape):
    return (np.arange(int(np.prod(shape))) % (len(REGIONS) + 1)).reshape(shape).astype(np.uint8)


@pytest.mark.parametrize("name, suffix", [
    ("scan.nii.gz", ".nii.gz"), ("REGIONS.SEG.NRRD", ".SEG.NRRD"), ("a.b.nrrd", ".nrrd"),
    ("weights.tar.gz", ".tar.gz"), ("SCAN.AIM;1", ".AIM;1"), ("folder", ""),
])
def test_compound_suffix_keeps_two_part_endings_whole(name, suffix):
    assert compound_suffix(f"some/dir/{name}") == suffix


@pytest.mark.parametrize("name", ["r.seg.nrrd", "r.nii.gz", "r.nii", "r.nrrd", "r.mha"])
def test_write_then_read_gives_the_labels_back(tmp_path, hu_scan, name):
    labels = _region_labels(hu_scan.shape)
    path = write_label_map(labels, hu_scan, tmp_path / name)
    back = read_label_map(path, hu_scan)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(read_label_map(path, hu_scan.shape), labels)


def test_a_seg_nrrd_gets_the_segments_asked_for(tmp_path, hu_scan):
    path = tmp_path / "r.seg.nrrd"
    write_label_map(_region_labels(hu_scan.shape), hu_scan, path)
    assert [s.segment_id for s in read_seg_nrrd(path)[1].segments] == [d.key for d in REGIONS]
    classes = np.zeros(hu_scan.shape, np.uint8)
    write_label_map(classes, hu_scan, path, segments=NETWORK_CLASSES[1:])
    assert ([s.segment_id for s in read_seg_nrrd(path)[1].segments]
            == [d.key for d in NETWORK_CLASSES[1:]])


def test_the_reader_checks_existence_grid_and_values(tmp_path, hu_scan):
    with pytest.raises(InputFileError, match=r"Region label map .* does not exist"):
        read_label_map(tmp_path / "missing.nii.gz", name="Region label map")
    path = write_label_map(_region_labels(hu_scan.shape), hu_scan, tmp_path / "r.nii.gz")
    with pytest.raises(InputFileError, match="share one grid"):
        read_label_map(path, (1, 2, 3))
    with pytest.raises(InputFileError, match=r"integer labels 0\.\.5: a hint"):
        read_label_map(path, hu_scan, max_label=5, hint="a hint")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputFileError, match="Cannot read label map"):
        read_label_map(tmp_path / "junk.nii.gz")


def test_label_map_format_names_the_endings_it_knows(tmp_path):
    assert label_map_format(tmp_path / "R.NII.GZ") == ".nii.gz"
    with pytest.raises(HRpQCTError, match=r"Cannot tell the output format.*\.seg\.nrrd"):
        label_map_format(tmp_path / "r.tif")
