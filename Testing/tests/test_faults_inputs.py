"""Inputs that are wrong but look fine, malformed classifiers, and results that depend on a
failed step (issue #15): each is refused with its exit code and a message that says what is
wrong, or (for valid files that used to be refused) read correctly; nothing partial is left.

Every case builds its faulty input from a valid file made here (a small phantom, an AIM
written by the project's own writer, an ISQ packed by the test fixture, a classifier trained
by ``train-classifier``) by editing a few bytes or fields.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from _fixtures_io import TEST_CALIBRATION, make_hu_volume, write_minimal_isq

from HRpQCTCore.io import read_label_map, read_scan, write_label_map, write_scan, write_scan_aim
from HRpQCTCore.regions import REGIONS, regions_to_classes
from HRpQCTCore.scan import Scan
from HRpQCTPipeline.cli import main

TIBIA = [d.label for d in REGIONS if d.key.startswith("tibial")]


@dataclass
class Case:
    """One command line to run, what it must return and say, and what must not exist."""

    argv: list[str]
    code: int
    phrase: str
    absent: list[Path] = field(default_factory=list)


# --- builders of valid inputs --------------------------------------------------------------

def _phantom(request, index: int = 0):
    return request.getfixturevalue("pipeline_scans")[index]


def _scan_and_regions(request):
    item = _phantom(request)
    return read_scan(item.scan), read_label_map(item.truth)


def _write_regions(tmp: Path, name: str, labels: np.ndarray, scan: Scan) -> Path:
    return write_label_map(labels, scan, tmp / name)


def _aim(tmp: Path, name: str = "scan.aim") -> Path:
    """A calibrated int16 AIM written by the project's writer."""
    hu = make_hu_volume()
    scan = Scan(hu=hu, spacing_mm=(0.0607,) * 3, calibration=TEST_CALIBRATION)
    return write_scan_aim(scan, tmp / name)


def _isq(tmp: Path, name: str = "scan.isq") -> Path:
    native = np.rint(TEST_CALIBRATION.hu_to_native(make_hu_volume())).astype(np.int16)
    return write_minimal_isq(tmp / name, native, calibration=TEST_CALIBRATION, name="PATIENT")


def _patch(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def _aim_log_offset(path: Path, text: bytes) -> int:
    offset = path.read_bytes().find(text)
    assert offset > 0, text
    return offset


def _aim_element_size_offset(path: Path) -> int:
    """Where the AIM v030 header keeps the element size (int64 nm: 60700 for 0.0607 mm)."""
    offset = path.read_bytes().find(struct.pack("<3q", 60700, 60700, 60700))
    assert offset > 0
    return offset


def _noisy_hu(sd: float) -> np.ndarray:
    """The I/O fixture's leg (100 HU noise) with noise raised to ``sd`` HU."""
    hu = make_hu_volume(seed=3)
    extra = np.random.default_rng(9).normal(0, math.sqrt(sd**2 - 100.0**2), hu.shape)
    return (hu + extra).astype(np.float32)


# --- class A: inputs that are wrong but look fine ---------------------------------------------

def truncated_region_map_radiomics(request, tmp):
    scan = _phantom(request)
    data = Path(scan.truth).read_bytes()
    cut = tmp / "regions.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp / "f.csv"
    return Case(["radiomics", str(scan.scan), str(cut), "-o", str(out), "--regions",
                 "adipose", "--jobs", "1", "--progress", "none"], 3, "truncated", [out])


def truncated_region_map_run(request, tmp):
    scan = _phantom(request)
    raw = gzip.decompress(Path(scan.truth).read_bytes())
    cut = tmp / "regions.nii.gz"
    cut.write_bytes(gzip.compress(raw)[:-200])  # the deflate stream's end is missing
    out = tmp / "out"
    return Case(["run", str(scan.scan), "--out", str(out), "--regions", str(cut),
                 "--classifier", "none", "--progress", "none"], 3, "truncated",
                [out / "scan0_features.csv", out / "scan0_report.html"])


def _moved_map(request, tmp, **change):
    scan, regions = _scan_and_regions(request)
    other = Scan(hu=scan.hu, spacing_mm=change.get("spacing_mm", scan.spacing_mm),
                 origin_mm=change.get("origin_mm", scan.origin_mm),
                 direction=change.get("direction", scan.direction))
    path = _write_regions(tmp, "moved.nii.gz", regions, other)
    out = tmp / "f.csv"
    return Case(["radiomics", str(_phantom(request).scan), str(path), "-o", str(out),
                 "--jobs", "1", "--progress", "none"], 3, "another grid", [out])


def region_map_other_spacing(request, tmp):
    case = _moved_map(request, tmp, spacing_mm=(0.3, 0.3, 0.3))
    case.phrase = "spacing (0.3"
    return case


def region_map_other_origin(request, tmp):
    case = _moved_map(request, tmp, origin_mm=(5.0, 0.0, 0.0))
    case.phrase = "origin (5"
    return case


def region_map_other_direction(request, tmp):
    c, s = math.cos(0.3), math.sin(0.3)
    case = _moved_map(request, tmp, direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    case.phrase = "direction ("
    return case


def region_map_other_grid_seg_nrrd(request, tmp):
    scan, regions = _scan_and_regions(request)
    other = Scan(hu=scan.hu, spacing_mm=(0.5, 0.2428, 0.2428), origin_mm=scan.origin_mm)
    path = _write_regions(tmp, "moved.seg.nrrd", regions, other)
    out = tmp / "out"
    return Case(["run", str(_phantom(request).scan), "--out", str(out), "--regions",
                 str(path), "--classifier", "none", "--progress", "none"], 3, "another grid",
                [out / "scan0_features.csv"])


def classes_other_grid_postprocess(request, tmp):
    scan, regions = _scan_and_regions(request)
    other = Scan(hu=scan.hu, spacing_mm=scan.spacing_mm, origin_mm=(0.0, 0.0, 3.0))
    path = _write_regions(tmp, "classes.nii.gz", regions_to_classes(regions), other)
    out = tmp / "r.nii.gz"
    return Case(["postprocess", str(_phantom(request).scan), str(path), str(out),
                 "--progress", "none"], 3, "another grid", [out])


def _zero_pixdim(path: Path) -> Path:
    header = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<3f", header, 80, 0.0, 0.0, 0.0)  # pixdim[1..3]
    path.write_bytes(gzip.compress(bytes(header)))
    return path


def scan_pixdim_zero(request, tmp):
    src = tmp / "scan.nii.gz"
    shutil.copy(_phantom(request).scan, src)
    out = tmp / "out.nii.gz"
    return Case(["convert", str(_zero_pixdim(src)), str(out)], 4, "has no voxel size", [out])


def region_map_pixdim_zero(request, tmp):
    path = tmp / "regions.nii.gz"
    shutil.copy(_phantom(request).truth, path)
    out = tmp / "f.csv"
    return Case(["radiomics", str(_phantom(request).scan), str(_zero_pixdim(path)), "-o",
                 str(out), "--jobs", "1", "--progress", "none"], 4, "has no voxel size", [out])


def _tiny_voxels(request, tmp) -> tuple[Path, Path]:
    scan, regions = _scan_and_regions(request)
    tiny = Scan(hu=scan.hu, spacing_mm=(1e-9,) * 3)
    return (write_scan(tiny, tmp / "tiny.nii.gz", dtype="int16"),
            _write_regions(tmp, "classes.nii.gz", regions_to_classes(regions), tiny))


def segment_tiny_voxels(request, tmp):
    scan, _ = _tiny_voxels(request, tmp)
    out = tmp / "regions.nii.gz"
    model = request.getfixturevalue("tiny_model_folder")
    return Case(["segment", str(scan), str(out), "--model", str(model), "--units", "hu",
                 "--progress", "none"], 4, "Not enough memory for post-processing", [out])


def postprocess_tiny_voxels(request, tmp):
    scan, classes = _tiny_voxels(request, tmp)
    out = tmp / "regions.nii.gz"
    return Case(["postprocess", str(scan), str(classes), str(out), "--units", "hu",
                 "--progress", "none"], 4, "Not enough memory", [out])


def resample_to_tiny_voxels(request, tmp):
    out = tmp / "fine.nii.gz"
    return Case(["convert", str(_phantom(request).scan), str(out), "--resample-mm", "0.0001"],
                2, "Not enough memory for resampling to 0.0001", [out])


def postprocess_unknown_labels(request, tmp):
    scan, regions = _scan_and_regions(request)
    classes = regions_to_classes(regions)
    classes[0, :5, :5] = 9
    path = _write_regions(tmp, "classes.nii.gz", classes, scan)
    out = tmp / "r.nii.gz"
    return Case(["postprocess", str(_phantom(request).scan), str(path), str(out),
                 "--progress", "none"], 3, "label values no class has (9)", [out])


def postprocess_given_regions(request, tmp):
    out = tmp / "r.nii.gz"
    item = _phantom(request)
    return Case(["postprocess", str(item.scan), str(item.truth), str(out), "--progress",
                 "none"], 3, "looks like a 7-region map", [out])


def classify_features_is_a_scan(request, tmp):
    model = request.getfixturevalue("tiny_classifiers")["adipose"]
    out = tmp / "p.csv"
    return Case(["classify", str(model), "--features", str(_phantom(request).scan), "-o",
                 str(out)], 3, "it looks like a gzip-compressed file", [out])


def train_labels_is_a_scan(request, tmp):
    model = request.getfixturevalue("tiny_classifiers")["adipose"]
    out = tmp / "c.json"
    return Case(["train-classifier", str(model.parent / "adipose_train.csv"), "--labels",
                 str(_phantom(request).scan), "--regions", "adipose", "-o", str(out)], 3,
                "Labels file", [out])


def feature_value_not_a_number(request, tmp):
    model = request.getfixturevalue("tiny_classifiers")["adipose"]
    lines = (model.parent / "adipose_train.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    column = header.index("original_firstorder_Mean")
    cells = lines[3].split(",")
    cells[column] = "12,5".replace(",", ";")  # a decimal comma gone wrong
    lines[3] = ",".join(cells)
    table = tmp / "features.csv"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp / "p.csv"
    return Case(["classify", str(model), "--features", str(table), "-o", str(out)], 3,
                "line 4, column 'original_firstorder_Mean': '12;5' is not a number", [out])


def segment_cuda_without_cuda(request, tmp):
    _skip_if_cuda()
    out = tmp / "r.nii.gz"
    model = request.getfixturevalue("tiny_model_folder")
    return Case(["segment", str(_phantom(request).scan), str(out), "--model", str(model),
                 "--device", "cuda", "--progress", "none"], 2, "CUDA is not available", [out])


def run_unknown_device(request, tmp):
    out = tmp / "out"
    model = request.getfixturevalue("tiny_model_folder")
    return Case(["run", str(_phantom(request).scan), "--out", str(out), "--model", str(model),
                 "--device", "tpu9", "--classifier", "none", "--progress", "none"], 2,
                "Cannot use --device tpu9", [out / "scan0_regions.nii.gz"])


def batch_manifest_is_a_scan(request, tmp):
    out = tmp / "out"
    return Case(["batch", str(_phantom(request).scan), "--out", str(out), "--progress",
                 "none"], 3, "Manifest", [out / "cohort_summary.csv"])


def training_manifest_is_a_scan(request, tmp):
    out = tmp / "model"
    return Case(["train-segmenter", "--manifest", str(_phantom(request).scan), "--out",
                 str(out)], 3, "Training manifest", [out])


def evaluation_manifest_is_a_scan(request, tmp):
    out = tmp / "scores.json"
    return Case(["evaluate-segmentation", str(_phantom(request).truth), "--json", str(out)],
                3, "is not a CSV text file", [out])


def aim_latin1_patient_name(request, tmp):
    path = _aim(tmp)
    # the writer's log has "Created by": make it a Latin-1 name as a scanner export would
    offset = _aim_log_offset(path, b"HRpQCTSegmenter")
    _patch(path, offset, "Bjørn ".encode("latin-1"))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 0, "in native units (header")


def aim_micro_sign_in_log(request, tmp):
    path = _aim(tmp)
    offset = _aim_log_offset(path, b"mg HA/ccm")
    _patch(path, offset, "µg HA/cc".encode("latin-1"))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 0, "calibration: header")


def isq_latin1_patient_name(request, tmp):
    path = _patch(_isq(tmp), 128, "Søren".encode("latin-1"))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 0, "in native units (header")


def isq_negative_data_offset(request, tmp):
    path = _patch(_isq(tmp), 508, struct.pack("<i", -4))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out), "--units", "native", "--mu-scaling", "8192",
                 "--mu-water", "0.2409"], 3, "negative data offset", [out])


def isq_data_offset_minus_one(request, tmp):
    # -1 would make the voxels start at byte 0: the header read as voxels
    path = _patch(_isq(tmp), 508, struct.pack("<i", -1))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out), "--units", "native", "--mu-scaling", "8192",
                 "--mu-water", "0.2409"], 3, "negative data offset (-1 blocks", [out])


def isq_negative_physical_size(request, tmp):
    path = _patch(_isq(tmp), 56, struct.pack("<i", -3885))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 4, "negative voxel size", [out])


def aim_negative_element_size(request, tmp):
    path = _aim(tmp)
    _patch(path, _aim_element_size_offset(path), struct.pack("<q", -60700))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 4, "negative voxel size (element size "
                "-0.0607", [out])


def aim_zero_element_size(request, tmp):
    path = _aim(tmp)
    _patch(path, _aim_element_size_offset(path), struct.pack("<3q", 0, 0, 0))
    out = tmp / "scan.nii.gz"
    return Case(["convert", str(path), str(out)], 4, "has no voxel size (element size 0",
                [out])


def hu_with_heavy_noise(request, tmp):
    src = write_scan(Scan(hu=_noisy_hu(250.0), spacing_mm=(0.0607,) * 3), tmp / "ct.nii.gz")
    assert np.percentile(_noisy_hu(250.0), 0.5) < -1500  # what the old tail check refused
    return Case(["convert", str(src), str(tmp / "out.nii.gz")], 0,
                "hu units (assumed (value range plausible for HU)")


def native_with_heavy_noise(request, tmp):
    native = TEST_CALIBRATION.hu_to_native(_noisy_hu(250.0))
    src = write_scan(Scan(hu=native, spacing_mm=(0.0607,) * 3), tmp / "native.nii.gz")
    out = tmp / "out.nii.gz"
    return Case(["convert", str(src), str(out)], 5, "do not look like HU", [out])


def density_with_heavy_noise(request, tmp):
    density = TEST_CALIBRATION.hu_to_density(_noisy_hu(250.0))
    src = write_scan(Scan(hu=density, spacing_mm=(0.0607,) * 3), tmp / "density.nii.gz")
    out = tmp / "out.nii.gz"
    return Case(["convert", str(src), str(out)], 5, "lowest histogram peak (air, in HU data) "
                "-", [out])


# --- class B: classifier and model files -------------------------------------------------------

def _rehashed(request, tmp, change) -> Path:
    """The adipose classifier with ``change(payload)`` applied and its checksum redone."""
    from HRpQCTRadiomicsEngine.model_io import _canonical

    source = request.getfixturevalue("tiny_classifiers")["adipose"]
    payload = json.loads(source.read_text(encoding="utf-8"))
    payload.pop("sha256")
    change(payload)
    payload["sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    path = tmp / "edited.json"
    path.write_text(json.dumps(payload, allow_nan=True), encoding="utf-8")
    return path


def _classify_case(request, tmp, change, phrase: str) -> Case:
    model = _rehashed(request, tmp, change)
    table = request.getfixturevalue("tiny_classifiers")["adipose"].parent / "adipose_train.csv"
    out = tmp / "p.csv"
    return Case(["classify", str(model), "--features", str(table), "-o", str(out)], 6, phrase,
                [out])


def classifier_without_features(request, tmp):
    return _classify_case(request, tmp, lambda p: p.pop("features"), "'features' is not")


def classifier_model_is_a_string(request, tmp):
    return _classify_case(request, tmp, lambda p: p.update(model="logistic"),
                          "'model' is not an object")


def classifier_string_coefficients(request, tmp):
    def change(p):
        p["model"]["coefficients"] = [str(c) for c in p["model"]["coefficients"]]
    return _classify_case(request, tmp, change, "'coefficients' holds")


def classifier_zero_scale(request, tmp):
    def change(p):
        p["model"]["scaler_scale"][0] = 0.0
    return _classify_case(request, tmp, change, "not positive finite numbers")


def classifier_threshold_text(request, tmp):
    return _classify_case(request, tmp, lambda p: p.update(threshold="abc"),
                          "'threshold' 'abc' is not a number")


def classifier_nan_coefficient(request, tmp):
    def change(p):
        p["model"]["coefficients"][0] = float("nan")
    return _classify_case(request, tmp, change, "'coefficients' holds 1 value")


def classifier_fewer_coefficients(request, tmp):
    def change(p):
        p["model"]["coefficients"] = p["model"]["coefficients"][:-1]
    return _classify_case(request, tmp, change, "'coefficients' has")


def _skops_reference(name: str, data: bytes):
    def change(p):
        p["kind"] = "svm"
        p["model"] = {"kind": "svm", "file": name,
                      "file_sha256": hashlib.sha256(data).hexdigest(), "trusted_types": []}
    return change


def classifier_skops_holds_pickle(request, tmp):
    import pickle

    data = pickle.dumps({"not": "a model"})
    (tmp / "model.skops").write_bytes(data)
    return _classify_case(request, tmp, _skops_reference("model.skops", data),
                          "is not a skops file")


def classifier_skops_outside_its_folder(request, tmp):
    data = b"whatever"
    (tmp.parent / "outside.skops").write_bytes(data)
    return _classify_case(request, tmp, _skops_reference("../outside.skops", data),
                          "is not a plain file name next to the classifier")


def _fake_resources(monkeypatch, tmp: Path, package: str, name: str, file: Path) -> None:
    """Make ``package``'s artefact manifest list ``name`` as ``file`` with a wrong SHA256."""
    from HRpQCTCore import artefacts

    folder = tmp / f"resources_{package}"
    folder.mkdir()
    shutil.copy(file, folder / file.name)
    (folder / "fake-artefacts.json").write_text(json.dumps({"artefacts": [
        {"name": name, "file": file.name, "sha256": "0" * 64, "kind": "test"}]}),
        encoding="utf-8")
    real = artefacts._resources_dir
    monkeypatch.setattr(artefacts, "_resources_dir",
                        lambda p: folder if p == package else real(p))


def tampered_bundled_classifier(request, tmp):
    from HRpQCTRadiomicsEngine.model_io import BUNDLED_CLASSIFIER

    item = _phantom(request)
    _fake_resources(request.getfixturevalue("monkeypatch"), tmp, "HRpQCTRadiomicsEngine",
                    BUNDLED_CLASSIFIER, request.getfixturevalue("tiny_classifiers")["adipose"])
    out = tmp / "out"
    return Case(["run", str(item.scan), "--out", str(out), "--regions", str(item.truth),
                 "--progress", "none", "--jobs", "1"], 6, "fails its checksum",
                [out / "scan0_probability.json", out / "scan0_features.csv"])


def tampered_bundled_model(request, tmp):
    from HRpQCTSegmentationEngine.bundled import BUNDLED_MODEL

    item = _phantom(request)
    model_json = request.getfixturevalue("tiny_model_folder") / "hrpqct_model.json"
    _fake_resources(request.getfixturevalue("monkeypatch"), tmp, "HRpQCTSegmentationEngine",
                    BUNDLED_MODEL, model_json)
    out = tmp / "out"
    return Case(["run", str(item.scan), "--out", str(out), "--classifier", "none",
                 "--progress", "none"], 6, "fails its checksum",
                [out / "scan0_regions.nii.gz", out / "scan0_features.csv"])


# --- class C: results that depend on a failed step -----------------------------------------------

def _without_tibia(request, tmp) -> Path:
    scan, regions = _scan_and_regions(request)
    regions = regions.copy()
    regions[np.isin(regions, TIBIA)] = 0  # the tibia "not found", as at a wrong voxel size
    return _write_regions(tmp, "no_tibia.nii.gz", regions, scan)


def probability_withheld_without_tibia(request, tmp):
    item = _phantom(request)
    model = request.getfixturevalue("tiny_classifiers")["adipose"]
    out = tmp / "out"
    return Case(["run", str(item.scan), "--out", str(out), "--regions",
                 str(_without_tibia(request, tmp)), "--classifier", str(model), "--jobs", "1",
                 "--progress", "none"], 0, "osteoporosis probability withheld: quality "
                "control failed for the regions the classifier uses (tibia_missing)")


CASES = [
    truncated_region_map_radiomics, truncated_region_map_run, region_map_other_spacing,
    region_map_other_origin, region_map_other_direction, region_map_other_grid_seg_nrrd,
    classes_other_grid_postprocess, scan_pixdim_zero, region_map_pixdim_zero,
    segment_tiny_voxels, postprocess_tiny_voxels, resample_to_tiny_voxels,
    postprocess_unknown_labels, postprocess_given_regions, classify_features_is_a_scan,
    train_labels_is_a_scan, feature_value_not_a_number, segment_cuda_without_cuda,
    run_unknown_device, batch_manifest_is_a_scan, training_manifest_is_a_scan,
    evaluation_manifest_is_a_scan, aim_latin1_patient_name, aim_micro_sign_in_log,
    isq_latin1_patient_name, isq_negative_data_offset, isq_data_offset_minus_one,
    isq_negative_physical_size, aim_negative_element_size, aim_zero_element_size,
    hu_with_heavy_noise, native_with_heavy_noise, density_with_heavy_noise,
    classifier_without_features, classifier_model_is_a_string, classifier_string_coefficients,
    classifier_zero_scale, classifier_threshold_text, classifier_nan_coefficient,
    classifier_fewer_coefficients, classifier_skops_holds_pickle,
    classifier_skops_outside_its_folder, tampered_bundled_classifier, tampered_bundled_model,
    probability_withheld_without_tibia,
]


def _skip_if_cuda() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the case needs a machine without it")


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_fault_gives_its_exit_code_and_message(build, request, tmp_path, capsys):
    case = build(request, tmp_path)
    code = main(["--quiet", *case.argv])
    captured = capsys.readouterr()
    said = " ".join((captured.err + captured.out).split())
    assert code == case.code, said
    assert " ".join(case.phrase.split()) in said
    assert "Traceback" not in said
    for path in case.absent:
        assert not path.exists(), f"{path} was left behind"
    if case.code:
        # nothing partial: no temporary files of an interrupted atomic write either
        leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith("~")]
        assert leftovers == []


# --- what a withheld probability looks like everywhere ------------------------------------------

def test_withheld_probability_is_withheld_in_json_report_and_cohort_table(
        request, tmp_path, tiny_classifiers, pipeline_scans, capsys):
    item = pipeline_scans[0]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"scan,scan_id,regions\n{item.scan},bad,"
                        f"{_without_tibia(request, tmp_path)}\n{item.scan},good,{item.truth}\n",
                        encoding="utf-8")
    out = tmp_path / "cohort"
    assert main(["--quiet", "batch", str(manifest), "--out", str(out), "--classifier",
                 str(tiny_classifiers["adipose"]), "--jobs", "1", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "bad: " in printed and "probability withheld (QC)" in printed
    bad = json.loads((out / "bad" / "bad_probability.json").read_text(encoding="utf-8"))
    assert bad["probability"] is None and bad["withheld"] is True
    assert "tibia_missing" in bad["withheld_reason"] and "per_slice" not in bad
    good = json.loads((out / "good" / "good_probability.json").read_text(encoding="utf-8"))
    assert 0.0 <= good["probability"] <= 1.0 and "withheld" not in good
    page = (out / "bad" / "bad_report.html").read_text(encoding="utf-8")
    assert "Withheld" in page and "tibia_missing" in page
    import csv

    with open(out / "cohort_summary.csv", newline="", encoding="utf-8") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    assert rows["bad"]["osteoporosis_probability"] == ""
    assert "tibia_missing" in rows["bad"]["probability_withheld"]
    assert rows["good"]["probability_withheld"] == ""
    assert float(rows["good"]["osteoporosis_probability"]) >= 0.0
    assert "withheld (QC)" in (out / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("warning,regions,blocks", [
    ({"code": "tibia_missing", "message": "", "regions": ["tibial_cortical"]}, ["adipose"],
     True),
    ({"code": "low_confidence", "message": ""}, ["adipose"], True),
    ({"code": "motion", "message": ""}, ["adipose"], False),
    ({"code": "region_small", "message": "", "regions": ["adipose"]}, ["adipose"], True),
    ({"code": "region_small", "message": "", "regions": ["adipose"]}, ["myotendinous"],
     False),
    ({"code": "postprocess", "message": "", "regions": ["fibular_cortical"]},
     ["skin", "adipose"], False),
])
def test_which_warnings_withhold_a_probability(warning, regions, blocks):
    from HRpQCTPipeline.qc import classification_blockers

    assert bool(classification_blockers([warning], regions)) is blocks


@pytest.mark.slow
def test_regions_without_the_tibia_get_no_probability(tmp_path, pipeline_scans, capsys):
    """The issue's case: the tibia lost (then: the bundled model at 0.24 mm, before scans were
    resampled to the model's voxel size; here a region map without it, as a bad correction
    would leave), the bundled classifier still gave 1.000."""
    import SimpleITK as sitk

    from HRpQCTCore.regions import region_by_name

    truth = sitk.ReadImage(str(pipeline_scans[0].truth))
    labels = sitk.GetArrayFromImage(truth)
    for name in ("tibial_cortical", "tibial_trabecular"):
        labels[labels == region_by_name(name).label] = 0
    no_tibia = sitk.GetImageFromArray(labels)
    no_tibia.CopyInformation(truth)
    regions = tmp_path / "no_tibia.nii.gz"
    sitk.WriteImage(no_tibia, str(regions))
    out = tmp_path / "out"
    assert main(["run", str(pipeline_scans[0].scan), "--regions", str(regions), "--out",
                 str(out), "--jobs", "1", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "tibia_missing" in printed and "probability withheld" in printed
    assert "osteoporosis probability 0." not in printed and "probability 1.000" not in printed
    info = json.loads((out / "scan0_probability.json").read_text(encoding="utf-8"))
    assert info["probability"] is None and info["withheld"] is True
