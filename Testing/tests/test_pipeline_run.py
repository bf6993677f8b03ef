"""`hrpqct run`: the whole job for one scan, its report, and resuming."""

import json
import math
import re
import shutil

import numpy as np
import pytest

from HRpQCTPipeline.cli import main

REPORT_SECTIONS = ("warnings", "probability", "regions", "features", "images", "outputs",
                   "provenance")


def _record(folder):
    return json.loads((folder / "run.json").read_text(encoding="utf-8"))


def _stages(folder):
    return {k: v["status"] for k, v in _record(folder)["stages"].items()}


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "run.log"}


def test_run_segments_extracts_and_reports(tmp_path, pipeline_scans, tiny_model_folder,
                                           capsys):
    scan = pipeline_scans[0]
    out = tmp_path / "out"
    args = ["run", str(scan.scan), "--out", str(out), "--model", str(tiny_model_folder),
            "--classifier", "none", "--jobs", "1", "--progress", "none", "--units", "hu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "classification skipped: disabled" in printed
    for suffix in ("_regions.seg.nrrd", "_regions.nii.gz", "_segmentation_qc.json",
                   "_features.csv", "_qc.json", "_report.html", "_overlay.png",
                   "_profiles.png"):
        assert (out / f"scan0{suffix}").is_file(), suffix
    assert not (out / "scan0_probability.json").exists()
    assert (out / "run.log").read_text(encoding="utf-8").count("=== hrpqct") == 1
    assert _stages(out) == {"segmentation": "ran", "radiomics": "ran",
                            "classification": "skipped", "report": "ran"}
    page = (out / "scan0_report.html").read_text(encoding="utf-8")
    for section in REPORT_SECTIONS:
        assert f'id="{section}"' in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == ["scan0_overlay.png", "scan0_profiles.png"]
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in images)
    qc = json.loads((out / "scan0_qc.json").read_text(encoding="utf-8"))
    assert len(qc["regions"]) == 7 and len(qc["confidence"]["per_slice_foreground"]) == 3
    # the features CSV holds the basic set for the regions the (random) model produced
    header = (out / "scan0_features.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert "original_firstorder_Mean" in header and "original_shape2D_PixelSurface" in header


def test_run_resumes_skips_unchanged_and_redoes_changed(tmp_path, pipeline_scans,
                                                        tiny_classifiers, capsys):
    scan = pipeline_scans[1]
    local = tmp_path / "scan.nii.gz"
    shutil.copy(scan.scan, local)
    out = tmp_path / "out"
    base = ["run", str(local), "--out", str(out), "--regions", str(scan.truth), "--jobs", "1",
            "--progress", "none", "--units", "hu"]
    assert main([*base, "--classifier", str(tiny_classifiers["adipose"])]) == 0
    probability = json.loads((out / "scan_probability.json").read_text(encoding="utf-8"))
    assert 0.0 <= probability["probability"] <= 1.0 and probability["n_slices"] == 3
    assert probability["regions"] == ["adipose"] and "research use" in probability["caveat"]
    first = _mtimes(out)

    # same input and settings: nothing is recomputed, nothing rewritten but the record
    capsys.readouterr()
    assert main([*base, "--classifier", str(tiny_classifiers["adipose"])]) == 0
    assert "up to date" in capsys.readouterr().out
    assert set(_stages(out).values()) == {"provided", "reused"}
    again = _mtimes(out)
    assert {k: v for k, v in again.items() if k != "run.json"} == {
        k: v for k, v in first.items() if k != "run.json"}

    # another classifier: features and probability redone, the given regions kept
    assert main([*base, "--classifier", str(tiny_classifiers["myotendinous"])]) == 0
    assert _stages(out) == {"segmentation": "provided", "radiomics": "ran",
                            "classification": "ran", "report": "ran"}
    assert json.loads((out / "scan_probability.json").read_text(encoding="utf-8"))["regions"] == [
        "myotendinous"]

    # a changed scan file: everything depending on it is redone
    from HRpQCTCore.io import read_scan, write_scan

    changed = read_scan(local)
    changed = changed.with_array(np.asarray(changed.hu) + 10.0)
    write_scan(changed, local, dtype="int16")
    before = (out / "scan_features.csv").read_text(encoding="utf-8")
    assert main([*base, "--classifier", str(tiny_classifiers["myotendinous"])]) == 0
    assert _stages(out)["radiomics"] == "ran"
    assert (out / "scan_features.csv").read_text(encoding="utf-8") != before

    # an output edited by hand is not replaced silently when its step must be redone
    (out / "scan_probability.json").write_text("{}")
    assert main([*base, "--classifier", str(tiny_classifiers["adipose"])]) == 2
    assert (out / "scan_probability.json").read_text(encoding="utf-8") == "{}"
    assert main([*base, "--classifier", str(tiny_classifiers["adipose"]), "--overwrite"]) == 0
    probability = json.loads((out / "scan_probability.json").read_text(encoding="utf-8"))
    assert probability["regions"] == ["adipose"]


def test_run_refuses_foreign_files_and_missing_inputs(tmp_path, pipeline_scans):
    scan = pipeline_scans[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan0_features.csv").write_text("mine\n")
    args = ["run", str(scan.scan), "--out", str(out), "--regions", str(scan.truth),
            "--classifier", "none", "--jobs", "1", "--progress", "none"]
    assert main(args) == 2
    assert (out / "scan0_features.csv").read_text(encoding="utf-8") == "mine\n"
    assert main(["run", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o"),
                 "--classifier", "none", "--progress", "none"]) == 3
    assert main(["run", str(scan.scan), "--out", str(tmp_path / "o"), "--model",
                 str(tmp_path / "no_model"), "--progress", "none"]) == 6


def test_run_without_bundled_artefacts_skips_those_steps(tmp_path, pipeline_scans, capsys,
                                                        monkeypatch):
    """An installation without bundled model and classifier: the run says so and still
    reports the scan (the artefact names are pointed at nothing)."""
    from HRpQCTPipeline import pipeline
    from HRpQCTSegmentationEngine import bundled

    monkeypatch.setattr(bundled, "BUNDLED_MODEL", "no-such-model")
    monkeypatch.setattr(pipeline, "BUNDLED_CLASSIFIER", "no-such-classifier")
    out = tmp_path / "out"
    assert main(["run", str(pipeline_scans[0].scan), "--out", str(out), "--progress",
                 "none"]) == 0
    printed = capsys.readouterr().out
    assert "segmentation skipped" in printed and "classification skipped" in printed
    assert (out / "scan0_report.html").is_file() and (out / "scan0_overlay.png").is_file()
    assert not (out / "scan0_features.csv").exists()


def test_quality_warnings_catch_missing_fibula_small_regions_and_low_confidence():
    from HRpQCTPipeline import qc

    regions = np.zeros((4, 60, 60), dtype=np.uint8)
    regions[:, 5:55, 5:55] = 7
    regions[:, 10:40, 10:40] = 2
    regions[:, 10:40, 10:12] = 1
    regions[:2, 45:50, 45:50] = 6  # myotendinous only in half of the slices
    stats = qc.region_stats(regions, (0.5, 0.5, 0.5))
    by_key = {s.key: s for s in stats}
    assert by_key["tibial_trabecular"].volume_mm3 == pytest.approx((30 * 28) * 0.125 * 4)
    assert by_key["tibial_trabecular"].mean_area_mm2 == pytest.approx(30 * 28 * 0.25)
    confidence = qc.confidence_summary([0.9] * 4, [0.95, 0.5, 0.9, 0.92])
    warnings = qc.quality_warnings(stats, confidence=confidence, postprocess_warnings=[
        "The fibula was not found (mean cross-section 0.0 mm2 < 20 mm2): it may be outside "
        "the field of view."])
    codes = [w.code for w in warnings]
    assert "fibula_missing" in codes and "postprocess" not in codes  # said once, not twice
    assert "region_missing_slices" in codes and "low_confidence" in codes
    small = [w.message for w in warnings if w.code == "region_small"]
    assert any("Tibial cortical" in m for m in small)
    assert not any("Fibular" in m for m in small)


def test_region_stats_read_only_the_labelled_box_and_equal_the_whole_slices_bit_for_bit():
    from HRpQCTCore.hu_volume import StoredHUVolume
    from HRpQCTCore.regions import REGIONS
    from HRpQCTPipeline import qc

    rng = np.random.default_rng(3)
    regions = np.zeros((5, 70, 90), dtype=np.uint8)
    regions[:, 12:50, 20:81] = rng.integers(0, 8, (5, 38, 61))
    regions[2] = 0  # a slice without the leg
    stored = rng.integers(-2000, 6000, regions.shape).astype(np.int16)
    hu = StoredHUVolume(stored, lambda v: v.astype(np.float32) * np.float32(0.7) - 3)
    stats = {s.key: s for s in qc.region_stats(regions, (0.5, 0.25, 0.25), hu)}
    values = np.asarray(hu)
    for d in REGIONS:  # the definition: every voxel of every whole slice
        total = int((regions == d.label).sum())
        sums = sum(np.bincount(regions[z].ravel(), weights=values[z].astype(np.float64).ravel(),
                               minlength=8)[d.label] for z in range(5))
        assert stats[d.key].voxels == total
        assert stats[d.key].mean_hu == sums / total  # the same additions in the same order
        assert stats[d.key].leg_slices == 4
    assert qc.region_stats(np.zeros((0, 4, 4), np.uint8), (1, 1, 1))[0].voxels == 0
    empty = qc.region_stats(np.zeros((2, 4, 4), np.uint8), (1, 1, 1), hu[:2, :4, :4])
    assert empty[0].leg_slices == 0 and math.isnan(empty[0].mean_hu)


def test_motion_index_separates_still_and_moved_scans():
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTPipeline.qc import QCThresholds, motion_index

    values = {}
    for grade, seed in ((1, 1), (5, 2)):
        phantom = generate_phantom(PhantomParams(motion_grade=grade).small(n_slices=2),
                                   seed=seed)
        values[grade] = motion_index(phantom.scan.hu, phantom.regions,
                                     phantom.scan.spacing_mm)["median_hu"]
    limit = QCThresholds().max_streak_hu
    assert values[1] < limit < values[5]


def test_run_redoes_segmentation_when_its_qc_options_change(tmp_path, pipeline_scans,
                                                            tiny_model_folder):
    """The uncertainty method and the plausibility override are in the segmentation's key:
    a resumed run with another one does not keep the QC the earlier option recorded."""
    scan = pipeline_scans[0]
    out = tmp_path / "out"
    base = ["run", str(scan.scan), "--out", str(out), "--model", str(tiny_model_folder),
            "--classifier", "none", "--features", "none", "--no-report", "--jobs", "1",
            "--progress", "none", "--units", "hu", "--accept-unusual-scan"]

    def seg_qc():
        return json.loads((out / "scan0_segmentation_qc.json").read_text(encoding="utf-8"))

    assert main([*base, "--uncertainty", "none"]) == 0
    assert _stages(out)["segmentation"] == "ran"
    assert seg_qc()["uncertainty_method"] == "none"
    assert main([*base, "--uncertainty", "none"]) == 0
    assert _stages(out)["segmentation"] == "reused"
    assert main([*base, "--uncertainty", "margin"]) == 0
    assert _stages(out)["segmentation"] == "ran"
    assert seg_qc()["uncertainty_method"] == "margin"
    # without the override the (plausible) scan is checked and segmented again: results made
    # while the check was overridden are never kept for a run that did not override it
    assert main([arg for arg in base if arg != "--accept-unusual-scan"]
                + ["--uncertainty", "margin"]) == 0
    assert _stages(out)["segmentation"] == "ran"
