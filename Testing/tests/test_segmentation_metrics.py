"""IoU / F1 from label maps, aggregation over scans, and the tables."""

import json

import numpy as np
import pytest

from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTSegmentationEngine.metrics import (
    confusion_matrix,
    f1_from_confusion,
    format_class_table,
    format_comparison_table,
    iou_from_confusion,
    scores_from_labels,
    summarise_scores,
)


def masks():
    """Truth: class 1 in a 4 x 4 square (16 voxels). Prediction: the square shifted by one
    column (12 overlap, 4 FP, 4 FN) and 2 voxels of class 5 where truth is background."""
    truth = np.zeros((2, 10, 10), np.uint8)
    truth[0, 2:6, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[0, 2:6, 3:7] = 1
    pred[1, 0, 0:2] = 5
    return truth, pred


def test_hand_computed_scores():
    truth, pred = masks()
    conf = confusion_matrix(truth, pred, chunk_voxels=7)  # chunk edges mid-volume
    assert conf.dtype == np.int64 and conf.shape == (6, 6)
    assert conf.sum() == truth.size
    assert conf[1, 1] == 12 and conf[1, 0] == 4 and conf[0, 1] == 4 and conf[0, 5] == 2
    iou = iou_from_confusion(conf)
    f1 = f1_from_confusion(conf)
    assert iou[1] == pytest.approx(12 / 20)
    assert f1[1] == pytest.approx(24 / 32)
    assert iou[5] == 0.0 and f1[5] == 0.0  # predicted but absent: a real zero
    assert np.isnan(iou[2]) and np.isnan(f1[3])  # absent from both: undefined
    # Background: 184 true voxels, 6 of them predicted as 1 or 5; 4 class-1 voxels missed.
    assert iou[0] == pytest.approx(178 / (178 + 4 + 6))


def test_perfect_and_disjoint():
    labels = np.arange(6, dtype=np.uint8).repeat(4).reshape(2, 3, 4)
    perfect = scores_from_labels(labels, labels)
    np.testing.assert_array_equal(perfect.iou, np.ones(6))
    swapped = scores_from_labels(labels, (labels + 1) % 6)
    np.testing.assert_array_equal(swapped.f1, np.zeros(6))


def test_mean_and_sd_over_scans():
    truth, pred = masks()
    scan_a = scores_from_labels(truth, pred)  # class 1 IoU 0.6
    scan_b = scores_from_labels(truth, truth)  # class 1 IoU 1.0; class 5 absent (NaN)
    summary = summarise_scores([scan_a, scan_b])
    assert summary.n_scans == 2
    assert summary.iou_mean[1] == pytest.approx(0.8)
    assert summary.iou_sd[1] == pytest.approx(np.std([0.6, 1.0], ddof=1))
    assert summary.iou_mean[5] == 0.0 and summary.iou_sd[5] == 0.0  # one scan only
    assert np.isnan(summary.iou_mean[2])
    # Per-scan foreground means: a -> mean(IoU1 0.6, IoU5 0) = 0.3; b -> 1.0.
    assert summary.mean_iou[0] == pytest.approx(0.65)
    assert summary.mean_f1[0] == pytest.approx((0.75 / 2 + 1.0) / 2)
    as_json = json.loads(json.dumps(summary.to_dict()))
    assert as_json["classes"]["tibial_cortical"]["iou_mean"] == pytest.approx(0.8)
    assert as_json["classes"]["tibial_trabecular"]["iou_mean"] is None
    assert as_json["mean_iou"]["mean"] == pytest.approx(0.65)


def test_tables():
    truth, pred = masks()
    summary = summarise_scores([scores_from_labels(truth, pred),
                                scores_from_labels(truth, truth)])
    table = format_class_table(summary)
    lines = table.strip().splitlines()
    assert lines[0] == "| Class | IoU (%) | F1 / Dice (%) |"
    assert len(lines) == 2 + 5 + 1  # header, rule, five classes, mean
    assert "| Tibial cortical bone | 80.0 ± 28.3 | 87.5 ± 17.7 |" in table
    assert "| Tibial trabecular bone | n/a | n/a |" in table
    comparison = format_comparison_table({"SegFormer-B0": summary, "U-Net": summary})
    rows = comparison.strip().splitlines()
    assert rows[0].startswith("| Model | Tibial cortical bone IoU (%) |")
    assert rows[0].endswith("| Mean IoU (%) | Mean F1 (%) |")
    assert rows[2].startswith("| SegFormer-B0 | 80.0 ± 28.3 |")
    assert len(rows) == 4
    assert all(c.name in rows[0] for c in NETWORK_CLASSES[1:])


def test_bad_label_maps():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="7-region"):
        confusion_matrix(np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        confusion_matrix(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
