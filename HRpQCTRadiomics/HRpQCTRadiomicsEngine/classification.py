"""Osteoporosis classifiers on radiomic features, evaluated without subject leakage.

A sample is one scan slice (the features of the chosen regions side by side,
``<region>:<feature>``), but slices of one subject are not independent: every split
(cross-validation folds, the held-out test) is grouped by subject, :func:`check_no_leakage`
asserts it for every fold, and the bootstrap intervals resample subjects, at image level
and at patient level (slice probabilities averaged per subject) alike.

Several classes (``Dataset.class_names``, e.g. normal / osteopenia / osteoporosis from
``hrpqct cohort --classes 3``): the same pipeline with multinomial models (every model kind
handles several classes in scikit-learn), probabilities ``(samples, classes)``, and
:func:`multiclass_metrics` (macro one-vs-rest AUROC, per-class sensitivity, confusion
matrix) with the same subject bootstrap.

Results on synthetic phantoms say nothing about patients: the outputs are an "osteoporosis
probability" for research use only, not a diagnosis.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from HRpQCTCore.errors import HRpQCTError, InvalidDataError
from HRpQCTCore.regions import region_by_name
from HRpQCTRadiomicsEngine.table import FeatureRows

if TYPE_CHECKING:  # selection imports scikit-learn: only where a pipeline is built
    from HRpQCTRadiomicsEngine.selection import PaperFeatureSelector

__all__ = [
    "MODEL_KINDS",
    "DEFAULT_MODEL",
    "CAVEAT",
    "Dataset",
    "assemble_dataset",
    "make_pipeline",
    "grouped_splits",
    "check_no_leakage",
    "aggregate_by_subject",
    "binary_metrics",
    "multiclass_metrics",
    "bootstrap_metrics",
    "DIAGNOSIS_CLASSES",
    "class_order",
    "evaluate",
    "cross_validate",
    "TrainingResult",
    "train_classifier",
]

log = logging.getLogger("hrpqct")

MODEL_KINDS: tuple[str, ...] = ("logistic", "svm", "random_forest", "boosting", "knn")
DEFAULT_MODEL = "logistic"

#: Shown with every probability the classifier outputs.
CAVEAT = ("Osteoporosis probability for research use only: not a diagnosis. The bundled or "
          "phantom-trained classifiers were trained on synthetic phantoms and have no "
          "clinical validity.")

FEATURE_SEPARATOR = ":"

#: The three-class target of ``hrpqct cohort --classes 3`` (T-score cut-offs -1 and -2.5), in
#: order of severity: class ``i`` of a multiclass model is ``class_names[i]``.
DIAGNOSIS_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")


@dataclass
class Dataset:
    """Samples for classification.

    Attributes
    ----------
    X:
        ``(samples, features)`` float64.
    y:
        Class index per sample (copied from the subject): 0/1 (1 = osteoporosis) for a
        binary dataset, else an index into ``class_names``.
    groups:
        Subject of each sample.
    feature_names:
        ``<region>:<pyradiomics name>`` per column.
    sample_ids:
        ``(scan, slice)`` per sample.
    """

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    feature_names: list[str]
    sample_ids: list[tuple[str, str]]
    class_names: list[str] | None = None  # None: binary 0 = control, 1 = osteoporosis

    def subset(self, index: np.ndarray) -> Dataset:
        """The samples at ``index`` (same features and classes)."""
        return Dataset(self.X[index], self.y[index], self.groups[index], self.feature_names,
                       [self.sample_ids[i] for i in index], self.class_names)


def class_order(names: Sequence[str]) -> list[str]:
    """Class names in model order: by severity for the diagnosis names, else sorted.

    Known names keep :data:`DIAGNOSIS_CLASSES` order (so column 2 is always osteoporosis);
    any others follow, sorted, so the order never depends on the order of the labels file.
    """
    unique = set(names)
    known = [c for c in DIAGNOSIS_CLASSES if c in unique]
    return known + sorted(unique - set(known))


def qualified_name(region_key: str, feature: str) -> str:
    """Column name of a region's feature in a dataset: ``<region>:<feature>``."""
    return f"{region_key}{FEATURE_SEPARATOR}{feature}"


def split_qualified_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`qualified_name`."""
    region, sep, feature = name.partition(FEATURE_SEPARATOR)
    if not sep:
        raise HRpQCTError(f"Feature {name!r} has no region prefix (<region>:<feature>).")
    return region, feature


def _region_keys(regions: Sequence[str]) -> list[str]:
    try:
        return [region_by_name(r).key for r in regions]
    except KeyError as exc:
        raise HRpQCTError(str(exc)) from None


def assemble_dataset(rows: FeatureRows, regions: Sequence[str],
                     labels: Mapping[str, int] | Mapping[str, str] | None = None,
                     feature_names: Sequence[str] | None = None,
                     class_names: Sequence[str] | None = None) -> Dataset:
    """Samples from feature rows: per (scan, slice), the chosen regions' features side by side.

    Samples where a chosen region is not ``ok`` are left out. ``labels`` maps subject ->
    0/1 (omit for prediction: ``y`` is then -1), or with ``class_names`` subject -> class
    name (``y`` is then the index into ``class_names``). ``feature_names`` (qualified names)
    selects and orders the columns; missing ones raise an error naming them.
    """
    keys = _region_keys(regions)
    by_sample: dict[tuple[str, str], dict[str, int]] = {}
    subject_of: dict[tuple[str, str], str] = {}
    for i, ids in enumerate(rows.ids):
        if ids["region"] not in keys:
            continue
        sample = (ids["scan"], ids["slice"])
        by_sample.setdefault(sample, {})
        subject_of[sample] = ids["subject"]
        if ids["status"] == "ok":
            by_sample[sample][ids["region"]] = i
    available = [qualified_name(k, n) for k in keys for n in rows.feature_names]
    wanted = list(available if feature_names is None else feature_names)
    column_of = {n: j for j, n in enumerate(rows.feature_names)}
    missing = []
    for name in wanted:
        region, feature = split_qualified_name(name)
        if region not in keys or feature not in column_of:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                           if len(missing) > 10 else "")
        # The table was read fine but cannot serve this classifier: invalid data (exit 4),
        # not a usage error.
        raise InvalidDataError(
            f"The feature table lacks {len(missing)} feature(s) the classifier needs: {shown}. "
            "Extract them with the radiomics settings the classifier was trained with "
            "(see `hrpqct classify --help`).")
    samples = [s for s in by_sample if all(k in by_sample[s] for k in keys)]
    dropped = len(by_sample) - len(samples)
    if dropped:
        log.info("%d slice(s) left out: a chosen region was skipped there", dropped)
    X = np.empty((len(samples), len(wanted)), dtype=np.float64)
    for j, name in enumerate(wanted):
        region, feature = split_qualified_name(name)
        col = column_of[feature]
        X[:, j] = [rows.values[by_sample[s][region], col] for s in samples]
    groups = np.array([subject_of[s] for s in samples], dtype=object)
    if labels is None:
        y = np.full(len(samples), -1, dtype=int)
    else:
        unknown = sorted({g for g in groups if g not in labels})
        if unknown:
            raise HRpQCTError(
                f"No label for subject(s) {unknown[:10]}: add them to the labels file, or "
                "check the subject column of the feature table.")
        y = _label_indices(labels, groups, class_names)
    return Dataset(X, y, groups, wanted, samples,
                   None if class_names is None else list(class_names))


def _label_indices(labels: Mapping, groups: np.ndarray,
                   class_names: Sequence[str] | None) -> np.ndarray:
    if class_names is None:
        return np.array([int(labels[g]) for g in groups], dtype=int)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({str(labels[g]) for g in groups} - set(index))
    if unknown:
        raise HRpQCTError(f"Label(s) {unknown} are not among the classes {list(class_names)}.")
    return np.array([index[str(labels[g])] for g in groups], dtype=int)


def check_training_data(data: Dataset) -> None:
    """Refuse data a classifier cannot be trained on, saying what to do."""
    if data.X.shape[0] == 0:
        raise HRpQCTError("No samples to train on: every slice lacks a chosen region. Check "
                          "--regions and the status column of the feature table.")
    if data.class_names is not None:
        _check_multiclass(data)
        check_finite(data.X, data.feature_names)
        return
    bad_labels = sorted(set(np.unique(data.y)) - {0, 1})
    if bad_labels:
        raise HRpQCTError(f"Labels must be 0 (control) or 1 (osteoporosis); found {bad_labels}.")
    classes = np.unique(data.y)
    if classes.size < 2:
        raise HRpQCTError(
            f"All training samples have label {int(classes[0])}: a classifier needs both "
            "osteoporosis (1) and control (0) subjects.")
    check_finite(data.X, data.feature_names)


def _check_multiclass(data: Dataset) -> None:
    names = list(data.class_names or [])
    if len(names) < 3:
        raise HRpQCTError(f"A multiclass target needs at least 3 classes; found {names}. Two "
                          "classes train as the binary 0/1 osteoporosis model.")
    absent = [names[i] for i in range(len(names)) if not (data.y == i).any()]
    if absent:
        raise HRpQCTError(f"No training sample of class(es) {absent}: every class needs "
                          "subjects.")


def check_finite(X: np.ndarray, names: Sequence[str]) -> None:
    """Raise naming the features that hold NaN or infinite values."""
    bad = ~np.isfinite(X)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        shown = ", ".join(f"{names[c]} ({int(bad[:, c].sum())} rows)" for c in cols[:10])
        raise HRpQCTError(
            f"{len(cols)} feature(s) hold NaN/infinite values: {shown}. pyradiomics gives NaN "
            "for degenerate regions; leave those features out (train-classifier "
            "--drop-nonfinite) or those slices.")


def make_pipeline(kind: str = DEFAULT_MODEL, random_state: int = 0,
                  selector: PaperFeatureSelector | None = None):
    """Selection -> standardisation -> classifier, as a scikit-learn Pipeline."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from HRpQCTRadiomicsEngine.selection import PaperFeatureSelector

    return Pipeline([
        ("select", selector or PaperFeatureSelector(random_state=random_state)),
        ("scale", StandardScaler()),
        ("model", make_classifier(kind, random_state)),
    ])


def make_classifier(kind: str, random_state: int = 0):
    """The classifier of a pipeline (on standardised, selected features)."""
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=5000)
    if kind == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        # Platt scaling for probabilities (SVC(probability=True) is deprecated).
        return CalibratedClassifierCV(SVC(kernel="rbf"), method="sigmoid", cv=3,
                                      ensemble=False)
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=300, random_state=random_state, n_jobs=1)
    if kind == "boosting":
        try:
            from xgboost import XGBClassifier
        except ImportError:
            from sklearn.ensemble import HistGradientBoostingClassifier

            return HistGradientBoostingClassifier(random_state=random_state)
        return XGBClassifier(n_estimators=200, max_depth=3, learning_rate=0.1,
                             random_state=random_state, n_jobs=1)
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=15)
    raise HRpQCTError(f"Unknown model {kind!r}: use one of {', '.join(MODEL_KINDS)}.")


# --- splits ---------------------------------------------------------------------------------

def grouped_splits(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int = 0,
                   grouped: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; with ``grouped`` (always, except to demonstrate leakage) by subject."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_subjects = len(np.unique(groups))
    if grouped:
        if n_subjects < n_splits:
            raise HRpQCTError(
                f"{n_subjects} subjects cannot be split into {n_splits} subject-grouped folds; "
                "use fewer folds or more subjects.")
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, groups)]
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y)]


def check_no_leakage(splits: Sequence[tuple[np.ndarray, np.ndarray]], groups: np.ndarray) -> None:
    """Raise if any subject has samples on both sides of any split."""
    for i, (train, test) in enumerate(splits):
        shared = set(groups[train]) & set(groups[test])
        if shared:
            raise RuntimeError(
                f"Subject leakage in split {i}: {len(shared)} subject(s) in both training and "
                f"test ({sorted(shared)[:5]}...)")


def train_test_split_grouped(y, groups, test_fraction: float, seed: int = 0):
    """One stratified, subject-grouped train/test split (about ``test_fraction`` of subjects)."""
    if not 0 < test_fraction < 1:
        raise HRpQCTError("The test fraction must be between 0 and 1.")
    n_splits = max(2, round(1.0 / test_fraction))
    train, test = grouped_splits(y, groups, n_splits, seed)[0]
    check_no_leakage([(train, test)], groups)
    return train, test


# --- metrics --------------------------------------------------------------------------------

def aggregate_by_subject(probabilities: np.ndarray, groups: np.ndarray, y: np.ndarray | None = None,
                         how: str = "mean"):
    """Per-subject probability (mean, or median, of its slices) and label."""
    subjects = list(dict.fromkeys(groups.tolist()))
    reducer = {"mean": np.mean, "median": np.median}.get(how)
    if reducer is None:
        raise HRpQCTError(f"Unknown aggregation {how!r}: use mean or median.")
    # axis 0: one row per slice, so class-probability matrices average per class.
    probs = np.array([reducer(probabilities[groups == s], axis=0) for s in subjects])
    labels = None if y is None else np.array([int(y[groups == s][0]) for s in subjects])
    return np.array(subjects, dtype=object), probs, labels


def binary_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                   threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, F1, sensitivity, specificity and AUROC (NaN where undefined)."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    pred = (np.asarray(probabilities) >= threshold).astype(int)
    tp = int(((pred == 1) & (y_true == 1)).sum())
    tn = int(((pred == 0) & (y_true == 0)).sum())
    fp = int(((pred == 1) & (y_true == 0)).sum())
    fn = int(((pred == 0) & (y_true == 1)).sum())
    n = len(y_true)
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    auc = (float(roc_auc_score(y_true, probabilities)) if len(np.unique(y_true)) == 2
           else float("nan"))
    return {"accuracy": (tp + tn) / n if n else float("nan"), "f1": f1, "sensitivity": sens,
            "specificity": spec, "auroc": auc, "n": n}


def multiclass_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro AUROC (one-vs-rest), per-class sensitivity and the confusion matrix.

    ``probabilities`` is ``(samples, classes)``; the predicted class is the most probable.
    ``confusion[i][j]`` counts samples of true class ``i`` predicted as ``j``;
    ``confusion_rate`` divides each row by its count (row ``i`` sums to 1: its diagonal is
    class ``i``'s sensitivity). Per-class AUROC is ``auroc_<class>``; ``auroc`` is their
    mean (macro); NaN where a class is absent.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = len(class_names)
    pred = np.argmax(probabilities, axis=1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y_true, pred), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = confusion / support[:, None]
    out: dict[str, Any] = {"accuracy": float(np.trace(confusion) / len(y_true))
                           if len(y_true) else float("nan")}
    aucs = []
    for i, name in enumerate(class_names):
        positive = (y_true == i).astype(int)
        auc = (float(roc_auc_score(positive, probabilities[:, i]))
               if 0 < positive.sum() < len(positive) else float("nan"))
        aucs.append(auc)
        out[f"sensitivity_{name}"] = float(rate[i, i]) if support[i] else float("nan")
        out[f"auroc_{name}"] = auc
    # Macro AUROC only when every class is present: a resample missing a class gives NaN
    # (left out of the interval), not the mean of the classes that happen to be there.
    out["auroc"] = float(np.mean(aucs)) if np.all(np.isfinite(aucs)) else float("nan")
    out["confusion"] = confusion.tolist()
    out["confusion_rate"] = rate.tolist()
    out["classes"] = list(class_names)
    out["n"] = len(y_true)
    return out


def _metric_draws(m: Mapping[str, Any]) -> dict[str, Any]:
    """The resampled quantities of one metrics dict: scalars and the confusion rates."""
    return {k: v for k, v in m.items() if k not in ("n", "classes", "confusion")}


def bootstrap_metrics(y_true, probabilities, groups, n_boot: int = 1000, seed: int = 0,
                      level: str = "image", threshold: float = 0.5,
                      confidence: float = 0.95,
                      class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Percentile confidence intervals, resampling subjects with replacement.

    ``level="image"``: every drawn subject brings all its slices; ``"patient"``: the
    per-subject probabilities (already aggregated: pass one row per subject). With
    ``class_names`` (multiclass, ``probabilities`` of shape ``(samples, classes)``) the
    intervals are those of :func:`multiclass_metrics`, ``confusion_rate`` as a matrix of
    ``[low, high]`` pairs.
    """
    rng = np.random.default_rng(seed)
    subjects = np.array(list(dict.fromkeys(np.asarray(groups).tolist())), dtype=object)
    index_of = {s: np.flatnonzero(groups == s) for s in subjects}
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        chosen = rng.choice(subjects, size=len(subjects), replace=True)
        idx = np.concatenate([index_of[s] for s in chosen])
        m = (binary_metrics(y_true[idx], probabilities[idx], threshold)
             if class_names is None
             else multiclass_metrics(y_true[idx], probabilities[idx], class_names))
        for k, v in _metric_draws(m).items():
            draws.setdefault(k, []).append(v)
    alpha = (1 - confidence) / 2
    out: dict[str, Any] = {}
    for k, values in draws.items():
        arr = np.array(values, dtype=float)
        if arr.ndim == 1:
            out[k] = _percentile_interval(arr, alpha)
        else:  # confusion rates: an interval per cell
            out[k] = [[_percentile_interval(arr[:, i, j], alpha) for j in range(arr.shape[2])]
                      for i in range(arr.shape[1])]
    return out


def _percentile_interval(values: np.ndarray, alpha: float) -> list[float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def evaluate(y_true: np.ndarray, probabilities: np.ndarray, groups: np.ndarray,
             n_boot: int = 1000, seed: int = 0, aggregation: str = "mean",
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Image- and patient-level metrics with bootstrap confidence intervals.

    Binary: ``probabilities`` is the osteoporosis probability per sample. With
    ``class_names``: ``(samples, classes)`` and the metrics of :func:`multiclass_metrics`.
    """
    def metrics(y, p):
        return (binary_metrics(y, p) if class_names is None
                else multiclass_metrics(y, p, class_names))

    image = metrics(y_true, probabilities)
    image_ci = bootstrap_metrics(y_true, probabilities, groups, n_boot, seed, "image",
                                 class_names=class_names)
    subjects, p_subject, y_subject = aggregate_by_subject(probabilities, groups, y_true,
                                                          aggregation)
    patient = metrics(y_subject, p_subject)
    patient_ci = bootstrap_metrics(y_subject, p_subject, subjects, n_boot, seed, "patient",
                                   class_names=class_names)
    return {"image": {"metrics": image, "ci95": image_ci},
            "patient": {"metrics": patient, "ci95": patient_ci, "aggregation": aggregation}}


def cross_validate(data: Dataset, kind: str = DEFAULT_MODEL, n_splits: int = 5, seed: int = 0,
                   grouped: bool = True) -> tuple[np.ndarray, list]:
    """Out-of-fold probabilities; the whole pipeline (selection too) is refitted per fold.

    Binary: the osteoporosis probability per sample; multiclass (``data.class_names``):
    ``(samples, classes)``.
    """
    splits = grouped_splits(data.y, data.groups, n_splits, seed, grouped=grouped)
    if grouped:
        check_no_leakage(splits, data.groups)
    multiclass = data.class_names is not None
    oof = np.full((len(data.y), len(data.class_names)) if multiclass else len(data.y), np.nan)
    for train, test in splits:
        model = fit_pipeline(data.X[train], data.y[train], data.groups[train], kind, seed,
                             n_classes=len(data.class_names) if multiclass else 2)
        p = model.predict_proba(data.X[test])
        oof[test] = p if multiclass else p[:, 1]
    return oof, splits


def fit_pipeline(X, y, groups, kind: str = DEFAULT_MODEL, seed: int = 0, n_classes: int = 2):
    """Fit selection + scaling + classifier on training data (LASSO folds by subject)."""
    if len(np.unique(y)) < n_classes:
        # A fold without a class would give a model with fewer probability columns.
        raise HRpQCTError("A training fold lacks a class; use fewer folds or more subjects.")
    pipeline = make_pipeline(kind, seed)
    pipeline.fit(X, y, select__groups=groups)
    return pipeline


@dataclass
class TrainingResult:
    """A trained classifier with its evaluation."""

    kind: str
    regions: list[str]
    feature_names: list[str]  # selected, qualified names, in model input order
    model: Any  # fitted Pipeline(scale, model) on the selected features
    report: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None  # None: binary (osteoporosis probability)

    def predict_proba(self, X_selected: np.ndarray) -> np.ndarray:
        """Osteoporosis probability per sample (columns in ``feature_names`` order); for a
        multiclass model, ``(samples, classes)`` in ``class_names`` order."""
        p = self.model.predict_proba(np.asarray(X_selected, dtype=np.float64))
        return p if self.class_names is not None else p[:, 1]


def _deployable(pipeline, names: Sequence[str]) -> tuple[list[str], Any]:
    from sklearn.pipeline import Pipeline

    support = pipeline.named_steps["select"].get_support()
    selected = [n for n, keep in zip(names, support, strict=True) if keep]
    return selected, Pipeline(pipeline.steps[1:])


def train_classifier(data: Dataset, regions: Sequence[str], kind: str = DEFAULT_MODEL,
                     test_fraction: float = 0.2, cv_folds: int = 5, seed: int = 0,
                     n_boot: int = 1000) -> TrainingResult:
    """Split subjects, cross-validate on the training subjects, test once, refit.

    The reported test metrics come from a model fitted on the training subjects only;
    the returned model is refitted on the training subjects (the test subjects stay unseen).
    """
    check_training_data(data)
    names = data.class_names
    n_classes = 2 if names is None else len(names)
    train, test = train_test_split_grouped(data.y, data.groups, test_fraction, seed)
    train_data = data.subset(train)
    report: dict[str, Any] = {
        "model": kind, "regions": list(regions), "seed": seed,
        **({} if names is None else {"classes": list(names)}),
        "subjects": {"train": sorted(set(data.groups[train])),
                     "test": sorted(set(data.groups[test]))},
        "samples": {"train": len(train), "test": len(test)},
    }
    n_train_subjects = len(set(data.groups[train]))
    folds = min(cv_folds, n_train_subjects)
    if folds >= 2:
        oof, _ = cross_validate(train_data, kind, folds, seed)
        report["cross_validation"] = {"folds": folds,
                                      **evaluate(train_data.y, oof, train_data.groups,
                                                 n_boot, seed, class_names=names)}
    pipeline = fit_pipeline(train_data.X, train_data.y, train_data.groups, kind, seed,
                            n_classes)
    p_test = pipeline.predict_proba(data.X[test])
    p_test = p_test if names is not None else p_test[:, 1]
    report["test"] = evaluate(data.y[test], p_test, data.groups[test], n_boot, seed,
                              class_names=names)
    selected, deployable = _deployable(pipeline, data.feature_names)
    selector = pipeline.named_steps["select"]
    report["selection"] = {
        "n_input": len(data.feature_names),
        "after_variance": int(selector.variance_support_.sum()),
        "after_correlation": int(selector.correlation_support_.sum()),
        "after_lasso": len(selected), "lasso_alpha": selector.alpha_,
        "lasso_fallback": bool(selector.lasso_fallback_),
    }
    return TrainingResult(kind, list(regions), selected, deployable, report,
                          None if names is None else list(names))
