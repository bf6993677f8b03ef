"""Three classes (normal / osteopenia / osteoporosis): cohort, training, files, prediction.

Binary behaviour must stay as it was; the binary tests elsewhere check it in detail, these
check the points where the two paths meet (default cohort, version 1 files, outputs).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from HRpQCTCore.errors import ArtefactError, HRpQCTError
from HRpQCTPipeline.cli import main
from HRpQCTRadiomicsEngine.classification import (
    DIAGNOSIS_CLASSES,
    Dataset,
    class_order,
    evaluate,
    multiclass_metrics,
    train_classifier,
)
from HRpQCTRadiomicsEngine.extraction import FeatureTable, RegionFeatures
from HRpQCTRadiomicsEngine.model_io import (
    MULTICLASS_FORMAT_VERSION,
    _canonical,
    load_classifier,
    save_classifier,
)
from HRpQCTRadiomicsEngine.selection import PaperFeatureSelector
from HRpQCTRadiomicsEngine.settings import load_settings

CLASSES = list(DIAGNOSIS_CLASSES)


def _three_class_data(n_subjects=30, slices=3, seed=0) -> Dataset:
    """f0 rises with severity, f1 separates osteopenia; the rest is noise."""
    rng = np.random.default_rng(seed)
    y_subject = np.arange(n_subjects) % 3
    X, y, groups = [], [], []
    for s in range(n_subjects):
        for _ in range(slices):
            row = rng.normal(0, 1, 8)
            row[0] += 2.0 * y_subject[s]
            row[1] += 2.5 * (y_subject[s] == 1)
            X.append(row)
            y.append(y_subject[s])
            groups.append(f"sub-{s:02d}")
    return Dataset(np.array(X), np.array(y), np.array(groups, dtype=object),
                   [f"adipose:f{i}" for i in range(8)],
                   [(g, str(i)) for i, g in enumerate(groups)], CLASSES)


def test_class_order_is_by_severity_then_sorted():
    assert class_order(["osteoporosis", "normal", "osteopenia", "normal"]) == CLASSES
    assert class_order(["b", "osteoporosis", "a"]) == ["osteoporosis", "a", "b"]


def test_multiclass_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.1, .1, .8],
                  [.5, .2, .3]])
    m = multiclass_metrics(y, p, CLASSES)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["sensitivity_normal"] == 0.5 and m["sensitivity_osteopenia"] == 1.0
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert np.allclose(np.sum(m["confusion_rate"], axis=1), 1.0)
    assert m["auroc"] == pytest.approx(np.mean([m[f"auroc_{c}"] for c in CLASSES]))
    # bootstrap intervals over subjects: scalars, and one interval per confusion cell
    result = evaluate(y, p, np.array(list("abcdef"), dtype=object), n_boot=30,
                      class_names=CLASSES)
    ci = result["patient"]["ci95"]
    assert len(ci["auroc"]) == 2 and len(ci["confusion_rate"]) == 3
    assert all(len(cell) == 2 for row in ci["confusion_rate"] for cell in row)


def test_selection_with_three_classes_keeps_the_union_of_one_vs_rest_lasso():
    data = _three_class_data()
    selector = PaperFeatureSelector().fit(data.X, data.y, groups=data.groups)
    assert selector.lasso_coef_.shape[0] == 3 and len(selector.alphas_) == 3
    kept = set(selector.get_support(indices=True))
    assert {0, 1} <= kept  # f1 only separates the middle class: kept by its indicator


def test_binary_selection_is_unchanged_by_the_multiclass_path():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 10))
    y = (X[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    selector = PaperFeatureSelector().fit(X, y)
    assert selector.lasso_coef_.ndim == 1 and not hasattr(selector, "alphas_")


@pytest.mark.parametrize("kind", ["logistic", "random_forest"])
def test_three_class_training_and_file_round_trip(tmp_path, kind):
    data = _three_class_data()
    result = train_classifier(data, ["adipose"], kind, cv_folds=3, n_boot=30)
    assert result.class_names == CLASSES
    test = result.report["test"]["patient"]
    assert test["metrics"]["classes"] == CLASSES
    assert np.array(test["metrics"]["confusion"]).shape == (3, 3)
    assert "sensitivity_osteopenia" in result.report["cross_validation"]["patient"]["ci95"]
    path = save_classifier(tmp_path / "m.json", result, load_settings("paper"))
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["format_version"] == MULTICLASS_FORMAT_VERSION
    assert payload["class_names"] == CLASSES and payload["output"] == "class probabilities"
    saved = load_classifier(path)
    assert saved.class_names == CLASSES and saved.osteoporosis_index() == 2
    columns = [data.feature_names.index(n) for n in saved.features]
    X = data.X[:, columns]
    matrix = saved.predict_class_proba(X)
    assert matrix.shape == (len(X), 3) and np.allclose(matrix.sum(axis=1), 1.0)
    assert np.allclose(matrix, result.predict_proba(X))
    assert np.array_equal(saved.predict_proba(X), matrix[:, 2])
    if kind == "logistic":
        assert np.array(payload["model"]["coefficients"]).shape == (3, len(saved.features))


@pytest.fixture(scope="module")
def trained():
    """One small three-class logistic model for the file-validation tests."""
    return train_classifier(_three_class_data(), ["adipose"], cv_folds=2, n_boot=5)


def _rewrite(path, change) -> None:
    """Edit a classifier file and give it a matching checksum (a forged, not damaged, file)."""
    import hashlib

    payload = json.loads(path.read_text(encoding="utf-8"))
    payload.pop("sha256")
    change(payload)
    payload["sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    path.write_text(json.dumps(payload), encoding="utf-8")


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("class_names"), "class_names"),
    (lambda p: p.update(class_names=["normal", "normal", "osteoporosis"]), "twice"),
    (lambda p: p.update(class_names=["normal", "osteoporosis"]), "at least 3"),
    (lambda p: p.update(class_names=["normal", 3, "osteoporosis"]), "class_names"),
    (lambda p: p.update(format_version=1), "version 1"),
    (lambda p: p.update(output="osteoporosis probability"), "output"),
    (lambda p: p["model"]["coefficients"].pop(), "3 rows"),
    (lambda p: p["model"]["coefficients"][1].append(0.0), "coefficients\\[1\\]"),
    (lambda p: p["model"]["coefficients"][2].__setitem__(0, float("nan")), "finite"),
    (lambda p: p["model"].update(intercept=[0.0, 1.0]), "intercept"),
    (lambda p: p["model"].update(intercept=1.0), "intercept"),
    (lambda p: p["model"].update(classes=[0, 1]), "classes"),
])
def test_malformed_three_class_files_are_refused(tmp_path, trained, change, message):
    result = trained
    path = save_classifier(tmp_path / "m.json", result, load_settings("paper"))
    _rewrite(path, change)
    with pytest.raises(ArtefactError, match=message):
        load_classifier(path)


def test_a_binary_file_with_class_names_is_refused(tmp_path):
    from test_radiomics_selection_classification import _subject_data

    result = train_classifier(_subject_data(subject_signal=False, label_signal=1.5),
                              ["adipose"], cv_folds=2, n_boot=5)
    path = save_classifier(tmp_path / "b.json", result, load_settings("paper"))
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["format_version"] == 1 and "class_names" not in payload
    assert load_classifier(path).class_names is None
    _rewrite(path, lambda p: p.update(class_names=CLASSES))
    with pytest.raises(ArtefactError, match="version 1"):
        load_classifier(path)


def test_training_refuses_a_missing_class():
    data = _three_class_data()
    keep = np.flatnonzero(data.y != 1)
    with pytest.raises(HRpQCTError, match="osteopenia"):
        train_classifier(data.subset(keep), ["adipose"], cv_folds=2, n_boot=5)


# --- the commands ---------------------------------------------------------------------------

def _tables(n_subjects=18, slices=4, seed=0):
    rng = np.random.default_rng(seed)
    provenance = load_settings("paper").provenance()
    labels, tables = {}, []
    for s in range(n_subjects):
        subject = f"sub-{s:02d}"
        k = s % 3
        labels[subject] = CLASSES[k]
        rows = []
        for z in range(slices):
            features = {"original_firstorder_Mean": 100.0 - 50.0 * k + rng.normal(0, 10),
                        "original_firstorder_Median": rng.normal(0, 1),
                        "original_glcm_Contrast": 5.0 + 4.0 * (k == 1) + rng.normal(0, 1)}
            rows.append(RegionFeatures(z, 7, 500, "ok", "", features))
        tables.append(FeatureTable(rows, list(rows[0].features), "slice", provenance,
                                   scan=f"scan-{s:02d}", subject=subject))
    return tables, labels


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def three_class_model(tmp_path):
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    tables, labels = _tables()
    features = write_feature_csv(tmp_path / "train.csv", tables)
    (tmp_path / "manifest.csv").write_text(
        "subject_id,osteoporosis,diagnosis\n"
        + "".join(f"{k},{int(v == 'osteoporosis')},{v}\n" for k, v in labels.items()))
    model = tmp_path / "three.json"
    assert main(["train-classifier", str(features), "--labels", str(tmp_path / "manifest.csv"),
                 "--regions", "adipose", "-o", str(model), "--cv", "3", "--bootstrap", "20",
                 "--test-fraction", "0.34", "--report", str(tmp_path / "r.json")]) == 0
    return model, features, tmp_path / "manifest.csv"


def test_train_classifier_picks_the_diagnosis_column_and_classify_gives_three(
        capsys, tmp_path, three_class_model):
    model, features, manifest = three_class_model
    assert "macro AUROC" in capsys.readouterr().out
    assert load_classifier(model).class_names == CLASSES
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["classes"] == CLASSES
    out = tmp_path / "pred.csv"
    assert main(["classify", str(model), "--features", str(features), "-o", str(out)]) == 0
    rows = _csv(out)
    assert list(rows[0])[4:] == [f"{c}_probability" for c in CLASSES]
    subjects = [r for r in rows if r["level"] == "subject"]
    assert len(subjects) == 18
    for r in rows:
        assert sum(float(r[f"{c}_probability"]) for c in CLASSES) == pytest.approx(1.0)
    # --target osteoporosis on the same manifest: the binary model, as before
    binary = tmp_path / "binary.json"
    assert main(["train-classifier", str(features), "--labels", str(manifest), "--target",
                 "osteoporosis", "--regions", "adipose", "-o", str(binary), "--cv", "3",
                 "--bootstrap", "10", "--test-fraction", "0.34"]) == 0
    assert load_classifier(binary).class_names is None


def test_scan_probabilities_give_every_class_and_withhold_them_all(three_class_model):
    from HRpQCTPipeline.commands.radiomics import scan_probabilities
    from HRpQCTPipeline.qc import QCWarning
    from HRpQCTRadiomicsEngine.table import read_feature_csv

    model, features, _ = three_class_model
    classifier = load_classifier(model)
    rows = read_feature_csv(features)
    keep = [i for i, ids in enumerate(rows.ids) if ids["subject"] == "sub-04"]
    rows.ids = [rows.ids[i] for i in keep]
    rows.values = rows.values[keep]
    result = scan_probabilities([classifier], rows)
    [entry] = result["classifiers"]
    classes = entry["class_probabilities"]
    assert list(classes) == CLASSES and sum(classes.values()) == pytest.approx(1.0)
    assert entry["probability"] == classes["osteoporosis"]
    assert "research use only" in result["caveat"].lower()
    warning = QCWarning("tibia_missing", "no tibia")  # scan-wide: withholds every classifier
    withheld = scan_probabilities([classifier], rows, [warning])
    [entry] = withheld["classifiers"]
    assert entry["withheld"] and entry["probability"] is None
    assert entry["class_probabilities"] == dict.fromkeys(CLASSES)
    assert withheld["overall"]["probability"] is None


def test_probability_report_shows_every_class():
    from HRpQCTPipeline.report import _class_probability_table

    html = _class_probability_table({"normal": 0.2, "osteopenia": 0.3, "osteoporosis": 0.5})
    assert html.count("<tr>") == 4 and "osteopenia" in html and "0.50" in html
    assert _class_probability_table(None) == ""


# --- the cohort -----------------------------------------------------------------------------

def test_three_class_cohort_follows_the_t_score_cut_offs():
    from HRpQCTPhantom.cohort import diagnosis_from_t_score, sample_cohort

    subjects = sample_cohort(30, seed=5, n_classes=3, n_slices=4, field_px=200, voxel_mm=0.5)
    assert [s.diagnosis for s in subjects].count("osteopenia") == 10
    for s in subjects:
        assert s.diagnosis == diagnosis_from_t_score(s.t_score)
        assert s.osteoporosis == int(s.diagnosis == "osteoporosis")
    mean_h = {c: np.mean([s.bone_health for s in subjects if s.diagnosis == c])
              for c in CLASSES}
    assert mean_h["normal"] > mean_h["osteopenia"] > mean_h["osteoporosis"]
    assert diagnosis_from_t_score(-1.0) == "normal"
    assert diagnosis_from_t_score(-2.5) == "osteoporosis"
    with pytest.raises(ValueError):
        sample_cohort(3, seed=0, n_classes=4)


#: Fingerprints of ``sample_cohort(12, seed=1000)`` and of the manifest of
#: ``generate_cohort(2, out, 3, n_slices=2, field_px=200, voxel_mm=0.4856)`` computed with
#: the cohort code before three classes existed: the default must not change by one bit.
_DEFAULT_SUBJECTS_SHA256 = "d2ffbf91dff81c1fbbf6adfe493c0fcb5d6954583d7435b0fc4fb2ddebabdc54"
_DEFAULT_MANIFEST_SHA256 = "1e4be788c115e9632be5781febfd41e8dd30114e4b6b91db1febfdbf39ad0a29"


def _params_as_before(params) -> dict:
    """Parameters as the fingerprint knew them: fields added since (another site's HU
    calibration) must hold their neutral defaults, and are left out."""
    values = params.to_dict()
    assert values.pop("calibration_scale") == 1.0
    assert values.pop("calibration_offset_hu") == 0.0
    return values


def test_the_default_cohort_is_exactly_what_it_was(tmp_path):
    import hashlib

    from HRpQCTPhantom.cohort import generate_cohort, sample_cohort

    subjects = sample_cohort(12, seed=1000)
    fingerprint = repr([(s.subject_id, s.age, s.sex, s.osteoporosis, s.bone_health, s.seed,
                         sorted(_params_as_before(s.params).items())) for s in subjects])
    assert hashlib.sha256(fingerprint.encode()).hexdigest() == _DEFAULT_SUBJECTS_SHA256
    assert all(s.diagnosis is None for s in subjects)
    manifest = generate_cohort(2, tmp_path / "c", 3, n_slices=2, field_px=200, voxel_mm=0.4856)
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == _DEFAULT_MANIFEST_SHA256
    header = manifest.read_text().splitlines()[0]
    assert "diagnosis" not in header


def test_cli_three_class_cohort_writes_the_diagnosis_column(tmp_path):
    out = tmp_path / "c3"
    assert main(["cohort", str(out), "--subjects", "3", "--classes", "3", "--small",
                 "--field-px", "200", "--voxel-mm", "0.4856", "--slices", "2", "--seed", "3",
                 "--progress", "none"]) == 0
    rows = _csv(out / "manifest.csv")
    assert list(rows[0])[3:6] == ["osteoporosis", "diagnosis", "t_score"]
    assert sorted(r["diagnosis"] for r in rows) == sorted(CLASSES)
    assert all(r["osteoporosis"] == str(int(r["diagnosis"] == "osteoporosis")) for r in rows)
    truth = json.loads((out / rows[0]["truth_path"]).read_text())
    assert truth["subject"]["diagnosis"] == rows[0]["diagnosis"]


def test_pipeline_probability_record_holds_every_class(tmp_path, three_class_model):
    from HRpQCTPipeline.pipeline import _classify, _withhold
    from HRpQCTPipeline.qc import QCWarning

    model, features, _ = three_class_model
    classifier = load_classifier(model)
    paths = {"features": features, "probability": tmp_path / "p.json"}
    info = _classify(classifier, paths, "scan-04", "sub-04")
    assert list(info["class_probabilities"]) == CLASSES
    assert info["probability"] == info["class_probabilities"]["osteoporosis"]
    assert json.loads(paths["probability"].read_text())["class_probabilities"] == \
        info["class_probabilities"]
    withheld = _withhold(classifier, paths, "scan-04", "sub-04",
                         [QCWarning("tibia_missing", "no tibia")])
    assert withheld["probability"] is None
    assert withheld["class_probabilities"] == dict.fromkeys(CLASSES)
