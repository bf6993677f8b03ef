"""The Segmenter's "Improve the model" flow: corrected slices -> training set -> fine-tuning
in the real child process -> the new folder loads and segments."""

import csv

import numpy as np
import pytest

from HRpQCTCore.background.process import JobState
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan
from HRpQCTSegmenterLib import improve

pytest_plugins = ["_fixtures_segmentation"]


def _scan_and_regions(n_slices=6, size=64):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    regions = np.where(r < size * 0.15, 1, np.where(r < size * 0.35, 7, 0)).astype(np.uint8)
    regions = np.repeat(regions[None], n_slices, axis=0)
    hu = np.select([regions == 1, regions == 7], [1800.0, -100.0], -1000.0).astype(np.float32)
    return Scan(hu, (0.5, 0.25, 0.25)), regions


def test_corrected_slices_are_the_ones_that_differ():
    original = np.zeros((5, 4, 4), np.uint8)
    edited = original.copy()
    edited[1, 0, 0] = 2
    edited[3] = 7
    assert improve.corrected_slices(edited, original) == [1, 3]


def test_adding_a_segmentation_writes_scan_labels_and_a_manifest_row(tmp_path):
    scan, regions = _scan_and_regions()
    original = regions.copy()
    corrected = regions.copy()
    corrected[[2, 3, 4], 30:34, 30:34] = 7
    with pytest.raises(HRpQCTError, match="No slice differs"):
        improve.add_to_training_set(tmp_path, scan, original, "s1", original)
    row = improve.add_to_training_set(tmp_path, scan, corrected, "s1", original)
    assert row["slices"] == "2-4"
    improve.add_to_training_set(tmp_path, scan, corrected, "s1", original)  # replaces the row
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and (tmp_path / rows[0]["labels"]).is_file()
    command = improve.fine_tune_command(tmp_path, None, tmp_path / "out", python="py")
    assert command[:4] == ["py", "-m", "HRpQCTPipeline", "train-segmenter"]
    assert "bundled" in command and "machine" in command


@pytest.mark.slow
def test_fine_tune_in_the_child_process_then_segment(tmp_path, tiny_preprocessing):
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.model_card import model_identity
    from HRpQCTSegmenterLib.parameters import SegmenterParameters

    parent = save_model(build_model("b0", seed=5), tmp_path / "parent",
                        preprocessing=tiny_preprocessing)
    scan, regions = _scan_and_regions()
    corrected = regions.copy()
    corrected[[1, 2, 3], 4:10, 4:10] = 7
    improve.add_to_training_set(tmp_path / "set", scan, corrected, "s1", regions)
    out = tmp_path / "child"
    process = improve.start_fine_tuning(
        tmp_path / "set", parent, out, device="cpu",
        extra=["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
               "--crop-px", "32", "--warmup-steps", "1"])
    state = process.wait(300)
    assert state == JobState.SUCCEEDED, process.failure_message()
    assert model_identity(out)["parent"]["name"] == "parent"
    seg = run_segmentation(scan.hu, out, device="cpu")
    assert seg.labels.shape == scan.hu.shape
    params = improve.parameters_for_model(SegmenterParameters(), out)
    assert params.model == "folder" and params.model_folder == str(out)
