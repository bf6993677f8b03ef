"""CSV export and the radiomics commands end to end through ``hrpqct``."""

import csv

import numpy as np
import pytest

from HRpQCTPipeline.cli import main
from HRpQCTRadiomicsEngine.extraction import FeatureTable, RegionFeatures
from HRpQCTRadiomicsEngine.settings import load_settings
from HRpQCTRadiomicsEngine.table import ID_COLUMNS, LONG_COLUMNS, read_feature_csv


def _write_inputs(tmp_path, scan):
    import SimpleITK as sitk

    dz, dy, dx = scan.spacing_mm
    image = sitk.GetImageFromArray(scan.hu.astype(np.int16))
    image.SetSpacing((dx, dy, dz))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    labels = sitk.GetImageFromArray(scan.regions)
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "regions.nii.gz"))
    return tmp_path / "scan.nii.gz", tmp_path / "regions.nii.gz"


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_radiomics_command_wide_and_long(tmp_path, radiomics_scan):
    scan, regions = _write_inputs(tmp_path, radiomics_scan)
    out = tmp_path / "features.csv"
    args = ["radiomics", str(scan), str(regions), "-o", str(out), "--slices", "1:2",
            "--regions", "skin,fibular_trabecular", "--jobs", "1", "--progress", "none",
            "--subject", "sub-01", "--units", "hu"]
    assert main(args) == 0
    rows = _rows(out)
    header = list(rows[0])
    assert tuple(header[:len(ID_COLUMNS)]) == ID_COLUMNS
    assert len(header) == len(ID_COLUMNS) + 939
    by_region = {r["region"]: r for r in rows}
    assert by_region["skin"]["status"] == "skipped" and by_region["skin"]["reason"]
    assert by_region["skin"]["original_firstorder_Mean"] == ""
    ok = by_region["fibular_trabecular"]
    assert ok["status"] == "ok" and ok["scan"] == "scan" and ok["subject"] == "sub-01"
    assert ok["slice"] == "1" and ok["settings"] == "paper"
    assert ok["settings_sha256"] == load_settings("paper").sha256
    assert int(ok["voxel_count"]) == int((radiomics_scan.regions[1] == 4).sum())
    assert float(ok["original_firstorder_Mean"]) == pytest.approx(
        radiomics_scan.hu[1][radiomics_scan.regions[1] == 4].mean(), rel=1e-6)
    # existing output is protected; --overwrite replaces it atomically (no temp files left)
    assert main(args) == 2
    assert main([*args, "--overwrite", "--long"]) == 0
    long_rows = _rows(out)
    assert tuple(long_rows[0]) == LONG_COLUMNS
    assert len(long_rows) == 939 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "features.csv", "regions.nii.gz", "scan.nii.gz"]


def _synthetic_tables(n_subjects=12, slices=6, seed=0):
    """Feature tables with real pyradiomics names: 'Mean' separates the groups."""
    rng = np.random.default_rng(seed)
    provenance = load_settings("paper").provenance()
    labels = {}
    tables = []
    for s in range(n_subjects):
        subject = f"sub-{s:02d}"
        labels[subject] = s % 2
        rows = []
        for z in range(slices):
            mean = 100.0 - 60.0 * labels[subject] + rng.normal(0, 15)
            features = {"original_firstorder_Mean": mean,
                        "original_firstorder_Median": rng.normal(0, 1),
                        "original_glcm_Contrast": rng.normal(5, 1)}
            rows.append(RegionFeatures(z, 7, 500, "ok", "", features))
        rows.append(RegionFeatures(slices, 7, 3, "skipped", "too small"))
        tables.append(FeatureTable(rows, list(rows[0].features), "slice", provenance,
                                   scan=f"scan-{s:02d}", subject=subject))
    return tables, labels


def test_train_and_classify_commands(tmp_path, radiomics_scan):
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    tables, labels = _synthetic_tables()
    features = write_feature_csv(tmp_path / "train.csv", tables)
    with open(tmp_path / "labels.csv", "w") as fh:
        fh.write("subject_id,osteoporosis\n")
        fh.writelines(f"{k},{v}\n" for k, v in labels.items())
    model = tmp_path / "model.json"
    assert main(["train-classifier", str(features), "--labels", str(tmp_path / "labels.csv"),
                 "--regions", "adipose", "-o", str(model), "--report",
                 str(tmp_path / "report.json"), "--cv", "3", "--bootstrap", "20",
                 "--test-fraction", "0.25"]) == 0
    assert model.is_file() and (tmp_path / "report.json").is_file()

    predictions = tmp_path / "pred.csv"
    assert main(["classify", str(model), "--features", str(features), "-o",
                 str(predictions)]) == 0
    rows = _rows(predictions)
    assert {r["level"] for r in rows} == {"image", "subject"}
    assert len([r for r in rows if r["level"] == "subject"]) == 12
    assert all(0 <= float(r["osteoporosis_probability"]) <= 1 for r in rows)

    # prediction mode straight from a scan: only the model's features are extracted
    scan, regions = _write_inputs(tmp_path, radiomics_scan)
    assert main(["classify", str(model), "--scan", str(scan), "--regions-map", str(regions),
                 "-o", str(tmp_path / "scan_pred.csv"), "--jobs", "1", "--progress", "none",
                 "--units", "hu"]) == 0
    scan_rows = _rows(tmp_path / "scan_pred.csv")
    assert [r["level"] for r in scan_rows].count("image") == 3
    assert scan_rows[-1]["subject"] == "scan"

    # what the Slicer module runs: features (only the model's) and the probability as JSON
    import json

    probabilities = tmp_path / "p.json"
    assert main(["radiomics", str(scan), str(regions), "-o", str(tmp_path / "f.csv"),
                 "--classifier", str(model), "--classifier-features", "--probabilities",
                 str(probabilities), "--jobs", "1", "--progress", "none", "--units",
                 "hu"]) == 0
    result = json.loads(probabilities.read_text())
    [entry] = result["classifiers"]
    assert entry["classifier"] == "model.json" and entry["slices_used"] == 3
    assert entry["probability"] == float(scan_rows[-1]["osteoporosis_probability"])
    assert result["overall"]["probability"] == entry["probability"]
    assert "research use only" in result["caveat"].lower()
    from HRpQCTRadiomicsEngine.model_io import load_classifier

    wanted = {name.split(":", 1)[1] for name in load_classifier(model).features}
    assert set(read_feature_csv(tmp_path / "f.csv").feature_names) == wanted  # only those
    assert main(["radiomics", str(scan), str(regions), "-o", str(tmp_path / "g.csv"),
                 "--classifier", str(model)]) == 2  # no --probabilities: refused


def test_radiomics_withholds_the_probability_when_the_regions_fail_qc(tmp_path,
                                                                        radiomics_scan):
    # The Slicer module's prediction mode runs this command: a segmentation without the
    # tibia (an edit gone wrong) must not give a number, as `hrpqct run` would not.
    import json
    from dataclasses import replace

    from HRpQCTCore.regions import region_by_name
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    tables, labels = _synthetic_tables()
    features = write_feature_csv(tmp_path / "train.csv", tables)
    (tmp_path / "labels.csv").write_text(
        "subject_id,osteoporosis\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    model = tmp_path / "model.json"
    assert main(["train-classifier", str(features), "--labels", str(tmp_path / "labels.csv"),
                 "--regions", "adipose", "-o", str(model), "--cv", "3", "--bootstrap", "20",
                 "--test-fraction", "0.25"]) == 0
    no_tibia = radiomics_scan.regions.copy()
    for name in ("tibial_cortical", "tibial_trabecular"):
        no_tibia[no_tibia == region_by_name(name).label] = 0
    scan, regions = _write_inputs(tmp_path, replace(radiomics_scan, regions=no_tibia))
    probabilities = tmp_path / "p.json"
    assert main(["radiomics", str(scan), str(regions), "-o", str(tmp_path / "f.csv"),
                 "--classifier", str(model), "--classifier-features", "--probabilities",
                 str(probabilities), "--jobs", "1", "--progress", "none", "--units",
                 "hu"]) == 0
    result = json.loads(probabilities.read_text())
    [entry] = result["classifiers"]
    assert entry["probability"] is None and entry["withheld"] is True
    assert "tibia_missing" in entry["withheld_reason"]
    assert result["overall"]["probability"] is None and result["overall"]["withheld"]

    # hrpqct classify --scan: the same region map gives empty probability cells and the reason
    predictions = tmp_path / "pred.csv"
    assert main(["classify", str(model), "--scan", str(scan), "--regions-map", str(regions),
                 "-o", str(predictions), "--jobs", "1", "--units", "hu"]) == 0
    rows = _rows(predictions)
    assert rows and all(r["osteoporosis_probability"] == "" for r in rows)
    assert all("tibia_missing" in r["withheld_reason"] for r in rows)


def test_train_refuses_one_class_and_foreign_settings(tmp_path):
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    tables, labels = _synthetic_tables(n_subjects=6)
    features = write_feature_csv(tmp_path / "train.csv", tables)
    with open(tmp_path / "labels.csv", "w") as fh:
        fh.write("subject_id,osteoporosis\n")
        fh.writelines(f"{k},1\n" for k in labels)
    base = ["train-classifier", str(features), "--labels", str(tmp_path / "labels.csv"),
            "--regions", "adipose", "-o", str(tmp_path / "m.json")]
    assert main(base) == 2  # one class only
    assert main([*base, "--preset", "complete"]) == 2  # features made with other settings
    assert not (tmp_path / "m.json").exists()
    rows = read_feature_csv(features)
    assert rows.values.shape == (6 * 7, 3) and np.isnan(rows.values[rows.where(
        status="skipped")]).all()
