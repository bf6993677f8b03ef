"""Feature selection, subject-grouped evaluation, saved classifiers, bad input."""

import json

import numpy as np
import pytest

from HRpQCTCore.errors import ArtefactError, HRpQCTError
from HRpQCTRadiomicsEngine.classification import (
    Dataset,
    binary_metrics,
    check_no_leakage,
    check_training_data,
    cross_validate,
    grouped_splits,
    train_classifier,
)
from HRpQCTRadiomicsEngine.model_io import load_classifier, save_classifier
from HRpQCTRadiomicsEngine.selection import PaperFeatureSelector
from HRpQCTRadiomicsEngine.settings import load_settings


def test_selection_steps_on_constructed_data():
    rng = np.random.default_rng(0)
    n = 200
    y = np.repeat([0, 1], n // 2)
    informative = y + rng.normal(0, 0.5, n)
    X = np.column_stack([
        np.full(n, 3.0),                      # 0 constant -> variance step
        informative,                          # 1 informative
        2 * informative + 5,                  # 2 perfect copy of 1 -> correlation step
        rng.normal(0, 1, n),                  # 3-6 noise
        rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
        np.r_[np.zeros(n - 1), 1.0],          # 7 one outlier: scaled variance ~0.005
    ])
    sel = PaperFeatureSelector().fit(X, y)
    assert not sel.variance_support_[0] and not sel.variance_support_[7]
    assert sel.variance_support_[1:7].all()
    assert sel.correlation_support_[1] != sel.correlation_support_[2]  # one of the pair
    assert sel.correlation_support_[3:7].all()
    assert sel.get_support()[1] or sel.get_support()[2]
    kept = sel.get_support(indices=True)
    assert set(kept) <= {1, 2, 3, 4, 5, 6} and len(kept) <= 3
    assert sel.transform(X).shape == (n, len(kept))


def _subject_data(n_subjects=24, slices=8, seed=0, subject_signal=True, label_signal=0.0):
    """Each subject has its own feature offset; labels are random per subject."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n_subjects // 2))
    rng.shuffle(labels)
    X, y, groups = [], [], []
    for s in range(n_subjects):
        offset = rng.normal(0, 3, 6) if subject_signal else 0
        for _ in range(slices):
            row = offset + rng.normal(0, 0.3, 6)
            row[0] += label_signal * labels[s]
            X.append(row)
            y.append(labels[s])
            groups.append(f"sub-{s:02d}")
    names = [f"adipose:f{i}" for i in range(6)]
    return Dataset(np.array(X), np.array(y), np.array(groups, dtype=object), names,
                   [(g, str(i)) for i, g in enumerate(groups)])


def test_grouped_folds_never_share_subjects_and_ungrouped_would():
    data = _subject_data()
    grouped = grouped_splits(data.y, data.groups, 4)
    check_no_leakage(grouped, data.groups)
    for train, test in grouped:
        assert not set(data.groups[train]) & set(data.groups[test])
    ungrouped = grouped_splits(data.y, data.groups, 4, grouped=False)
    with pytest.raises(RuntimeError, match="leakage"):
        check_no_leakage(ungrouped, data.groups)


def test_subject_identity_does_not_inflate_grouped_cv():
    """Labels carry no signal, subjects do: only leaky CV could look good."""
    data = _subject_data(slices=24)
    oof_grouped, _ = cross_validate(data, "knn", n_splits=4)
    oof_leaky, _ = cross_validate(data, "knn", n_splits=4, grouped=False)
    auc_grouped = binary_metrics(data.y, oof_grouped)["auroc"]
    auc_leaky = binary_metrics(data.y, oof_leaky)["auroc"]
    # Ungrouped folds put slices of one subject on both sides: the model recognises the
    # subject, not the disease, and looks good. Grouped folds stay at chance.
    assert auc_leaky > 0.75
    assert auc_grouped < 0.6
    assert auc_leaky - auc_grouped > 0.25


def test_metrics_by_hand():
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.2, 0.6]))
    assert m["accuracy"] == 0.5 and m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["f1"] == 0.5 and m["auroc"] == 0.75


@pytest.mark.parametrize("kind", ["logistic", "random_forest"])
def test_saved_classifier_round_trip(tmp_path, kind):
    data = _subject_data(subject_signal=False, label_signal=1.5)
    result = train_classifier(data, ["adipose"], kind, cv_folds=3, n_boot=50)
    assert result.report["test"]["patient"]["metrics"]["n"] >= 4
    test_subjects = set(result.report["subjects"]["test"])
    assert not test_subjects & set(result.report["subjects"]["train"])
    path = save_classifier(tmp_path / "model.json", result, load_settings("paper"))
    saved = load_classifier(path)
    columns = [data.feature_names.index(n) for n in saved.features]
    X = data.X[:, columns]
    assert np.array_equal(saved.predict_proba(X), result.predict_proba(X))
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["output"] == "osteoporosis probability"
    assert "not a diagnosis" in payload["caveat"]
    assert payload["radiomics_settings"]["sha256"] == load_settings("paper").sha256
    if kind == "logistic":
        assert len(payload["model"]["coefficients"]) == len(saved.features)
    else:
        assert (tmp_path / "model.skops").is_file()


def test_tampered_classifier_is_refused(tmp_path):
    data = _subject_data(subject_signal=False, label_signal=1.5)
    result = train_classifier(data, ["adipose"], cv_folds=2, n_boot=10)
    path = save_classifier(tmp_path / "m.json", result, load_settings("paper"))
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["model"]["intercept"] += 1.0
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtefactError, match="checksum"):
        load_classifier(path)


def test_bad_inputs(tmp_path):
    data = _subject_data(subject_signal=False, label_signal=1.5)
    result = train_classifier(data, ["adipose"], cv_folds=2, n_boot=10)
    saved = load_classifier(save_classifier(tmp_path / "m.json", result,
                                            load_settings("paper")))
    with pytest.raises(HRpQCTError, match="lack"):
        saved.predict_proba(data.X[:, :1], feature_names=["adipose:nothing"])
    X = data.X[:, [data.feature_names.index(n) for n in saved.features]].copy()
    X[0, 0] = np.nan
    with pytest.raises(HRpQCTError, match="NaN"):
        saved.predict_proba(X)
    one_class = Dataset(data.X, np.zeros_like(data.y), data.groups, data.feature_names,
                        data.sample_ids)
    with pytest.raises(HRpQCTError, match="both"):
        check_training_data(one_class)
