"""`hrpqct segment`, `postprocess`, `train-segmenter`, `evaluate-segmentation` end to end."""

import csv
import json

import numpy as np
import pytest

from HRpQCTCore.io import read_scan, write_label_map, write_scan
from HRpQCTCore.io.segnrrd import read_seg_nrrd
from HRpQCTCore.regions import REGIONS, region_by_name
from HRpQCTPipeline.cli import main


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """A small phantom written as a user would have it: scan, 5-class and 7-region truth."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    folder = tmp_path_factory.mktemp("phantom")
    phantom = generate_phantom(PhantomParams().small(128, 4), 5)
    scan = folder / "scan.nii.gz"
    classes = folder / "classes.nii.gz"
    regions = folder / "regions.nii.gz"
    write_scan(phantom.scan, scan)
    write_label_map(phantom.classes, phantom.scan, classes)
    write_label_map(phantom.regions, phantom.scan, regions)
    return {"scan": scan, "classes": classes, "regions": regions, "phantom": phantom}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random B0 with a small preprocessing: fast; its predictions are noise."""
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    folder = tmp_path_factory.mktemp("model")
    save_model(build_model("b0", seed=3).eval(), folder,
               preprocessing=PreprocessingConfig(crop_yx=(128, 128), input_yx=(64, 64)))
    return folder


def test_postprocess_truth_classes_gives_seven_regions_in_a_seg_nrrd(phantom_files, tmp_path):
    out = tmp_path / "regions.seg.nrrd"
    rings = tmp_path / "rings.nii.gz"
    assert main(["postprocess", str(phantom_files["scan"]), str(phantom_files["classes"]),
                 str(out), "--rings", str(rings), "--progress", "none"]) == 0
    labels, info = read_seg_nrrd(out)
    assert [s.name for s in info.segments] == [r.name for r in REGIONS]
    truth = phantom_files["phantom"].regions
    # bone comes through unchanged from the truth classes
    for label in (1, 2, 3, 4):
        assert np.array_equal(labels == label, truth == label)
    assert read_scan(rings, units="hu").hu.max() >= 1


def test_keep_surfaces_switches_the_surface_refinement_off(tmp_path):
    """A prediction whose leg is 2 pixels too big: refined by default, kept on request."""
    from scipy import ndimage as ndi

    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.postprocess import DEFAULT, postprocess

    # 0.24 mm pixels: fine enough for the 0.75 mm band of the skin surface to span 3 pixels
    phantom = generate_phantom(PhantomParams().small(400, 2), 5)
    scan_path = tmp_path / "scan.nii.gz"
    write_scan(phantom.scan, scan_path)
    classes = phantom.classes.copy()
    grown = np.stack([ndi.binary_dilation(p > 0, iterations=2) for p in classes])
    classes[grown & (classes == 0)] = 5
    classes_path = tmp_path / "grown.nii.gz"
    write_label_map(classes, phantom.scan, classes_path)
    outputs = {}
    for name, extra in (("default", []), ("kept", ["--keep-surfaces"])):
        outputs[name] = tmp_path / f"{name}.nii.gz"
        assert main(["postprocess", str(scan_path), str(classes_path),
                     str(outputs[name]), "--progress", "none", *extra]) == 0
    scan = read_scan(scan_path)
    for name, config in (("default", DEFAULT), ("kept", DEFAULT.without_surface_refinement())):
        expected = postprocess(classes, scan.hu, scan.spacing_mm, config).regions
        np.testing.assert_array_equal(read_scan(outputs[name], units="hu").hu, expected)
    leg_truth = phantom.classes > 0
    errors = {name: np.count_nonzero((read_scan(path, units="hu").hu > 0) != leg_truth)
              for name, path in outputs.items()}
    assert errors["default"] < errors["kept"] / 3


def test_the_soft_tissue_split_follows_the_scan_unless_fixed_on_request(tmp_path):
    """A scan 150 HU brighter than its scanner's nominal soft tissue: the default split follows
    the scan's own fat and muscle levels; ``--fixed-soft-tissue-split`` keeps -50 HU."""
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.postprocess import DEFAULT, postprocess

    phantom = generate_phantom(PhantomParams().small(400, 2), 6)
    phantom.scan.hu[...] = phantom.scan.hu + 150
    scan_path, classes_path = tmp_path / "scan.nii.gz", tmp_path / "classes.nii.gz"
    write_scan(phantom.scan, scan_path)
    write_label_map(phantom.classes, phantom.scan, classes_path)
    outputs = {}
    for name, extra in (("default", []), ("fixed", ["--fixed-soft-tissue-split"])):
        outputs[name] = tmp_path / f"{name}.nii.gz"
        # (the offset air no longer looks like HU, so the units are given)
        assert main(["postprocess", str(scan_path), str(classes_path), str(outputs[name]),
                     "--units", "hu", "--progress", "none", *extra]) == 0
    scan = read_scan(scan_path, units="hu")
    for name, config in (("default", DEFAULT), ("fixed", DEFAULT.with_fixed_split())):
        expected = postprocess(phantom.classes, scan.hu, scan.spacing_mm, config).regions
        np.testing.assert_array_equal(read_scan(outputs[name], units="hu").hu, expected)
    fat = region_by_name("adipose").label
    truth = phantom.regions == fat
    found = {name: read_scan(path, units="hu").hu == fat for name, path in outputs.items()}
    overlap = {name: 2 * (f & truth).sum() / (f.sum() + truth.sum()) for name, f in found.items()}
    assert overlap["default"] > 0.85 > overlap["fixed"] + 0.2


def test_existing_output_is_never_replaced_without_overwrite(phantom_files, tmp_path, capsys):
    out = tmp_path / "regions.nii.gz"
    out.write_bytes(b"my edited segmentation")
    code = main(["postprocess", str(phantom_files["scan"]), str(phantom_files["classes"]),
                 str(out), "--progress", "none"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"my edited segmentation"
    assert main(["postprocess", str(phantom_files["scan"]), str(phantom_files["classes"]),
                 str(out), "--progress", "none", "--overwrite"]) == 0


def test_segment_with_a_model_folder_writes_labels_and_qc(phantom_files, tiny_model, tmp_path):
    out = tmp_path / "classes.nii.gz"
    qc = tmp_path / "qc.json"
    assert main(["segment", str(phantom_files["scan"]), str(out), "--model", str(tiny_model),
                 "--classes-only", "--qc-json", str(qc), "--device", "cpu",
                 "--engine", "torch", "--progress", "none",
                 # 0.76 mm voxels (a fast toy phantom) are no HR-pQCT scan
                 "--accept-unusual-scan"]) == 0
    labels = read_scan(out, units="hu").hu
    assert labels.shape == phantom_files["phantom"].scan.shape
    assert labels.max() <= 5
    report = json.loads(qc.read_text(encoding="utf-8"))
    assert len(report["slice_confidence"]) == 4


def test_segment_without_a_model_says_what_to_do(phantom_files, tmp_path, capsys):
    code = main(["segment", str(phantom_files["scan"]), str(tmp_path / "x.nii.gz"),
                 "--model", str(tmp_path / "missing"), "--progress", "none"])
    assert code == 6
    assert "train-segmenter" in capsys.readouterr().err


def test_segment_rejects_an_unknown_output_format(phantom_files, tiny_model, tmp_path, capsys):
    code = main(["segment", str(phantom_files["scan"]), str(tmp_path / "x.png"),
                 "--model", str(tiny_model), "--progress", "none"])
    assert code == 2
    assert ".seg.nrrd" in capsys.readouterr().err


def test_evaluate_segmentation_prints_the_table_and_writes_json(phantom_files, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prediction", "truth"])
        writer.writerow([phantom_files["classes"], phantom_files["regions"]])
    scores = tmp_path / "scores.json"
    assert main(["evaluate-segmentation", str(pairs), "--json", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert "Tibial cortical" in printed or "tibial_cortical" in printed
    data = json.loads(scores.read_text(encoding="utf-8"))
    # The truth's own classes against its 7-region map (collapsed to 5 classes): perfect.
    assert data["n_scans"] == 1
    assert data["mean_iou"]["mean"] == pytest.approx(1.0)
    assert data["classes"]["soft_tissue"]["f1_mean"] == pytest.approx(1.0)


def test_train_segmenter_refuses_a_non_empty_output_and_needs_two_subjects(
        phantom_files, tmp_path, capsys):
    manifest = tmp_path / "train.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject", "image", "labels"])
        writer.writerow(["a", phantom_files["scan"], phantom_files["classes"]])
    out = tmp_path / "model"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["train-segmenter", "--manifest", str(manifest), "--out", str(out),
                 "--progress", "none"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train-segmenter", "--manifest", str(manifest), "--out", str(tmp_path / "m2"),
                 "--progress", "none"]) == 2
    assert "two subjects" in capsys.readouterr().err
