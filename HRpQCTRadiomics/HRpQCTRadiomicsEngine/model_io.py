"""Saved classifiers: safe to load, readable by people, checked before use. No pickle.

A classifier is one JSON file (format ``hrpqct-classifier``, version 1) holding:

* ``model``: the kind, and for logistic regression (the default) the whole fitted model in
  plain numbers: the standardisation's means and scales, coefficients and intercept, in
  the order of ``features``. Other kinds (SVM, random forest, gradient boosting, k-NN) are
  stored next to the JSON as a skops file (``<name>.skops``), loaded with an explicit list of
  trusted types (:data:`SKOPS_TRUSTED_TYPES`): skops refuses anything else, so loading
  cannot run arbitrary code. Its SHA256 is in the JSON.
* ``features``: the input features (``<region>:<pyradiomics name>``), i.e. what prediction
  mode must extract; ``regions``; the aggregation of slice probabilities per subject.
* ``radiomics_settings``: name, SHA256 and full YAML text of the settings that produced the
  features, so prediction extracts them identically.
* ``versions`` of the packages; the training ``report``; the caveat text.
* ``sha256``: SHA256 of the canonical JSON of everything else. :func:`load_classifier`
  verifies it (and the skops file's) and refuses a file that was changed or damaged.

**Several classes** (format version 2, written only for multiclass models, so binary files
stay version 1 and byte-compatible): ``class_names`` lists the classes in model order (e.g.
``normal, osteopenia, osteoporosis``), ``output`` is ``"class probabilities"``, and the
logistic block holds one coefficient row and one intercept per class (multinomial softmax)
with ``classes`` ``[0, ..., K-1]``. Version 1 files (binary) load as before; a version 1 file
with ``class_names`` or a version 2 file without them is refused.

A matching checksum only says the file is what its writer wrote, not that its writer was this
software: :func:`load_classifier` also validates every field (types, lengths, finite numbers,
positive scales, a threshold in [0, 1], a skops file name inside the classifier's folder) and
refuses anything else with :class:`~HRpQCTCore.errors.ArtefactError`, before the model is
built, so a malformed file never yields a traceback or NaN probabilities.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.atomic import write_bytes_atomic, write_text_atomic
from HRpQCTCore.errors import ArtefactError, HRpQCTError, InputFileError
from HRpQCTRadiomicsEngine.classification import CAVEAT, TrainingResult, check_finite
from HRpQCTRadiomicsEngine.settings import RadiomicsSettings

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MULTICLASS_FORMAT_VERSION",
    "SKOPS_TRUSTED_TYPES",
    "SavedClassifier",
    "save_classifier",
    "load_classifier",
    "BUNDLED_CLASSIFIER",
    "bundled_classifier_path",
]

#: Name of the bundled classifier in ``resources/radiomics-artefacts.json``: logistic
#: regression on soft-tissue radiomics (skin, myotendinous, adipose), trained on synthetic
#: phantoms (its JSON holds the training report and the caveat).
BUNDLED_CLASSIFIER = "osteoporosis-classifier"

FORMAT_NAME = "hrpqct-classifier"
FORMAT_VERSION = 1
#: Version of multiclass classifier files (binary ones stay :data:`FORMAT_VERSION`).
MULTICLASS_FORMAT_VERSION = 2
_READABLE_VERSIONS = (FORMAT_VERSION, MULTICLASS_FORMAT_VERSION)

#: Types a skops classifier file may contain beyond skops' own defaults, per model kind.
#: Only these are trusted on load; a file holding anything else is refused.
SKOPS_TRUSTED_TYPES: dict[str, list[str]] = {
    "svm": [],
    "random_forest": ["sklearn.tree._tree.Tree"],
    "boosting": ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"],
    "knn": ["sklearn.metrics._dist_metrics.EuclideanDistance64",
            "sklearn.neighbors._kd_tree.KDTree", "sklearn.neighbors._ball_tree.BallTree"],
}

_VERSIONED = ("hrpqct-segmenter", "numpy", "scikit-learn", "pyradiomics-bhklab", "skops",
              "SimpleITK", "PyWavelets", "scikit-image")


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      allow_nan=True).encode("utf-8")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) else v
    return value


@dataclass
class SavedClassifier:
    """A loaded classifier, ready to predict from its features."""

    kind: str
    features: list[str]
    regions: list[str]
    model: Any
    settings: dict[str, Any]
    aggregation: str = "mean"
    threshold: float = 0.5
    report: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    class_names: list[str] | None = None  # None: binary (one osteoporosis probability)

    @property
    def multiclass(self) -> bool:
        """True for a model with several classes (one probability per class)."""
        return self.class_names is not None

    def osteoporosis_index(self) -> int:
        """Column of the osteoporosis class: 1 (binary), the class named ``osteoporosis``,
        else the last (most severe, see :func:`~.classification.class_order`) class."""
        if self.class_names is None:
            return 1
        names = list(self.class_names)
        return names.index("osteoporosis") if "osteoporosis" in names else len(names) - 1

    def radiomics_settings(self) -> RadiomicsSettings:
        """The radiomics settings the classifier was trained with (from the stored YAML)."""
        from HRpQCTRadiomicsEngine.settings import parse_settings

        return parse_settings(self.settings["text"], f"classifier:{self.path}",
                              self.settings.get("name", "classifier"))

    def predict_proba(self, X: np.ndarray, feature_names: list[str] | None = None) -> np.ndarray:
        """Osteoporosis probability per row of ``X`` (see :meth:`osteoporosis_index`).

        If ``feature_names`` is given, columns are matched by name (extra ones ignored);
        otherwise ``X`` must hold exactly :attr:`features` in order.
        """
        return self.predict_class_proba(X, feature_names)[:, self.osteoporosis_index()]

    def predict_class_proba(self, X: np.ndarray,
                            feature_names: list[str] | None = None) -> np.ndarray:
        """Probability of every class, ``(rows, classes)`` (binary: control, osteoporosis)."""
        X = np.asarray(X, dtype=np.float64)
        if feature_names is not None:
            index = {n: i for i, n in enumerate(feature_names)}
            missing = [n for n in self.features if n not in index]
            if missing:
                raise HRpQCTError(
                    f"The features offered lack {len(missing)} the classifier needs: "
                    f"{', '.join(missing[:10])}. Extract them with the classifier's radiomics "
                    f"settings ({self.settings.get('name')}).")
            X = X[:, [index[n] for n in self.features]]
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise HRpQCTError(f"Expected {len(self.features)} feature columns, got "
                              f"{X.shape[1] if X.ndim == 2 else X.shape}.")
        check_finite(X, self.features)
        probabilities = self.model.predict_proba(X)
        if not np.all(np.isfinite(probabilities)):  # a guard: validation should prevent it
            raise ArtefactError(f"Classifier {self.path} gives non-finite probabilities; its "
                                "model is damaged. Use the original file.")
        return probabilities


def _logistic_to_json(model, multiclass: bool = False) -> dict[str, Any]:
    scaler, clf = model.named_steps["scale"], model.named_steps["model"]
    if multiclass:
        return {
            "kind": "logistic",
            "scaler_mean": scaler.mean_.tolist(),
            "scaler_scale": scaler.scale_.tolist(),
            "coefficients": clf.coef_.tolist(),
            "intercept": clf.intercept_.tolist(),
            "classes": [int(c) for c in clf.classes_],
            "formula": "p_k = softmax_k(intercept[k] + sum(coefficients[k] * (x - scaler_mean)"
                       " / scaler_scale))",
        }
    return {
        "kind": "logistic",
        "scaler_mean": scaler.mean_.tolist(),
        "scaler_scale": scaler.scale_.tolist(),
        "coefficients": clf.coef_[0].tolist(),
        "intercept": float(clf.intercept_[0]),
        "classes": [int(c) for c in clf.classes_],
        "formula": "p = 1 / (1 + exp(-(intercept + sum(coefficients * (x - scaler_mean) / "
                   "scaler_scale))))",
    }


def _logistic_from_json(data: dict[str, Any], n_features: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_ = np.asarray(data["scaler_mean"], dtype=np.float64)
    scaler.scale_ = np.asarray(data["scaler_scale"], dtype=np.float64)
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = n_features
    scaler.n_samples_seen_ = 0
    clf = LogisticRegression()
    coef = np.asarray(data["coefficients"], dtype=np.float64)
    clf.coef_ = coef.reshape(1, -1) if coef.ndim == 1 else coef
    clf.intercept_ = np.atleast_1d(np.asarray(data["intercept"], dtype=np.float64))
    clf.classes_ = np.asarray(data["classes"])
    clf.n_features_in_ = n_features
    if not (scaler.mean_.size == scaler.scale_.size == clf.coef_.shape[1] == n_features):
        raise ArtefactError("The classifier's parameter lists do not match its feature list.")
    return Pipeline([("scale", scaler), ("model", clf)])


def save_classifier(path: str | Path, result: TrainingResult,
                    settings: RadiomicsSettings) -> Path:
    """Write ``result`` as a classifier JSON (plus ``.skops`` for non-linear kinds)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise HRpQCTError(f"A classifier is saved as .json; got {path.name}.")
    multiclass = result.class_names is not None
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": MULTICLASS_FORMAT_VERSION if multiclass else FORMAT_VERSION,
        "caveat": CAVEAT,
        "output": "class probabilities" if multiclass else "osteoporosis probability",
        "kind": result.kind,
        "features": list(result.feature_names),
        "regions": list(result.regions),
        "aggregation": "mean", "threshold": 0.5,
        "radiomics_settings": {**settings.provenance(), "text": settings.text},
        "versions": _versions(),
        "report": _jsonable(result.report),
    }
    if multiclass:
        payload["class_names"] = list(result.class_names)
    if result.kind == "logistic":
        payload["model"] = _logistic_to_json(result.model, multiclass)
    else:
        if result.kind not in SKOPS_TRUSTED_TYPES:
            raise HRpQCTError(f"Cannot save a {result.kind!r} model.")
        type_name = type(result.model.named_steps["model"]).__module__
        if type_name.startswith("xgboost"):
            raise HRpQCTError(
                "Saving XGBoost models is not supported (skops cannot load them safely). "
                "Train with xgboost uninstalled (scikit-learn's HistGradientBoosting) or use "
                "the logistic model.")
        try:
            import skops.io as sio
        except ImportError:
            raise HRpQCTError("Saving a non-linear classifier needs skops (pip install "
                              "skops); the logistic model saves without it.") from None
        skops_path = path.with_suffix(".skops")
        write_bytes_atomic(skops_path, sio.dumps(result.model))
        payload["model"] = {"kind": result.kind, "file": skops_path.name,
                            "file_sha256": sha256_file(skops_path),
                            "trusted_types": SKOPS_TRUSTED_TYPES[result.kind]}
    payload["sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    write_text_atomic(path, json.dumps(payload, indent=1, allow_nan=True) + "\n")
    return path


def load_classifier(path: str | Path) -> SavedClassifier:
    """Load and verify a classifier JSON (and its skops file).

    Raises
    ------
    InputFileError
        If the file does not exist or is not JSON.
    ArtefactError
        If it is not a classifier file, a checksum does not match, a field is malformed
        (see the module notes), or the skops file is not one (e.g. a pickle), lies outside the
        classifier's folder or holds types outside the trusted list.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Classifier file {path} does not exist.")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path} is not a classifier JSON file ({exc}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ArtefactError(f"{path} is not an {FORMAT_NAME} file.")
    if payload.get("format_version") not in _READABLE_VERSIONS:
        raise ArtefactError(f"{path} has format version {payload.get('format_version')}; this "
                            "version of the software reads versions "
                            f"{', '.join(map(str, _READABLE_VERSIONS))}.")
    stored = payload.pop("sha256", None)
    actual = hashlib.sha256(_canonical(payload)).hexdigest()
    if stored != actual:
        raise ArtefactError(
            f"Classifier {path} fails its checksum (stored {str(stored)[:12]}..., computed "
            f"{actual[:12]}...): the file was edited or damaged. Use the original file.")
    _validate_payload(payload, path)
    features = list(payload["features"])
    model_info = payload["model"]
    kind = payload["kind"]
    class_names = payload.get("class_names")
    if kind == "logistic":
        model = _logistic_from_json(model_info, len(features))
    else:
        model = _load_skops(path, model_info, kind)
        _check_skops_classes(model, path, 2 if class_names is None else len(class_names))
    settings = payload["radiomics_settings"]
    text_hash = hashlib.sha256(settings["text"].encode("utf-8")).hexdigest()
    if text_hash != settings.get("sha256"):
        raise ArtefactError(f"Classifier {path}: stored radiomics settings fail their checksum.")
    return SavedClassifier(kind=kind, features=features, regions=list(payload["regions"]),
                           model=model, settings=settings,
                           aggregation=payload.get("aggregation", "mean"),
                           threshold=float(payload.get("threshold", 0.5)),
                           report=payload.get("report", {}),
                           versions=payload.get("versions", {}), path=path,
                           class_names=None if class_names is None else list(class_names))


def _check_skops_classes(model, path: Path, n_classes: int) -> None:
    """A skops model must predict the classes the JSON names (0..K-1), no more, no fewer."""
    classes = getattr(model, "classes_", None)
    if classes is None or [int(c) for c in np.asarray(classes).tolist()] != list(range(n_classes)):
        raise ArtefactError(f"Classifier {path}: its model's classes do not match the "
                            f"{n_classes} classes the file names; use the original files.")


# --- validation of a classifier file ---------------------------------------------------------

_AGGREGATIONS = ("mean", "median")


class _FieldError(Exception):
    """One field of a classifier file is malformed (turned into an ArtefactError)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _FieldError(message)


def _numbers(value: Any, field_name: str, length: int, *, positive: bool = False) -> None:
    """``value`` must be a list of ``length`` finite numbers (all > 0 with ``positive``)."""
    _require(isinstance(value, list), f"'{field_name}' is not a list of numbers")
    _require(len(value) == length,
             f"'{field_name}' has {len(value)} values for {length} feature(s)")
    bad = [i for i, v in enumerate(value) if not _is_number(v) or (positive and v <= 0)]
    _require(not bad, f"'{field_name}' holds {len(bad)} value(s) that are not "
             f"{'positive ' if positive else ''}finite numbers (first at position {bad[0]}: "
             f"{value[bad[0]]!r})" if bad else "")


def _validate_features(payload: dict[str, Any]) -> None:
    from HRpQCTCore.regions import region_by_name
    from HRpQCTRadiomicsEngine.classification import split_qualified_name

    features, regions = payload.get("features"), payload.get("regions")
    _require(isinstance(features, list) and features and
             all(isinstance(f, str) and f for f in features),
             "'features' is not a non-empty list of feature names")
    _require(len(set(features)) == len(features), "'features' names a feature twice")
    _require(isinstance(regions, list) and regions and all(isinstance(r, str) for r in regions),
             "'regions' is not a non-empty list of region names")
    try:
        keys = {region_by_name(r).key for r in regions}
        for name in features:
            region, feature = split_qualified_name(name)
            _require(bool(feature), f"feature {name!r} has no feature name after its region")
            _require(region_by_name(region).key in keys,
                     f"feature {name!r} belongs to a region not in 'regions'")
    except (KeyError, HRpQCTError) as exc:
        raise _FieldError(str(exc).strip("'\"")) from None


def _validate_logistic(model: dict[str, Any], n_features: int, n_classes: int = 2) -> None:
    _numbers(model.get("scaler_mean"), "scaler_mean", n_features)
    _numbers(model.get("scaler_scale"), "scaler_scale", n_features, positive=True)
    if n_classes == 2:
        _numbers(model.get("coefficients"), "coefficients", n_features)
        _require(_is_number(model.get("intercept")), "'intercept' is not a finite number")
        _require(model.get("classes") == [0, 1], "'classes' is not [0, 1]")
        return
    rows = model.get("coefficients")
    _require(isinstance(rows, list) and len(rows) == n_classes,
             f"'coefficients' is not a list of {n_classes} rows (one per class)")
    for k, row in enumerate(rows):
        _numbers(row, f"coefficients[{k}]", n_features)
    intercept = model.get("intercept")
    _require(isinstance(intercept, list) and len(intercept) == n_classes
             and all(_is_number(v) for v in intercept),
             f"'intercept' is not a list of {n_classes} finite numbers")
    _require(model.get("classes") == list(range(n_classes)),
             f"'classes' is not {list(range(n_classes))}")


def _validate_class_names(payload: dict[str, Any]) -> int:
    """Number of classes; ``class_names`` exactly when the format version is multiclass."""
    names = payload.get("class_names")
    if payload.get("format_version") == FORMAT_VERSION:
        _require(names is None, "a version 1 (binary) file has 'class_names'")
        _require(payload.get("output", "osteoporosis probability") == "osteoporosis probability",
                 "'output' of a binary file is not 'osteoporosis probability'")
        return 2
    _require(isinstance(names, list) and len(names) >= 3 and
             all(isinstance(n, str) and n.strip() == n and n for n in names),
             "'class_names' is not a list of at least 3 class names")
    _require(len(set(names)) == len(names), "'class_names' names a class twice")
    _require(payload.get("output") == "class probabilities",
             "'output' of a multiclass file is not 'class probabilities'")
    return len(names)


def _validate_skops_reference(model: dict[str, Any], kind: str) -> None:
    name = model.get("file")
    _require(isinstance(name, str) and bool(name), "the model block names no skops file")
    # A plain file name next to the JSON: "../x" or an absolute path would open any file.
    _require(Path(name).name == name and name not in (".", "..") and "\\" not in name,
             f"the skops file {name!r} is not a plain file name next to the classifier")
    _require(name.lower().endswith(".skops"), f"the model file {name!r} is not a .skops file")
    digest = model.get("file_sha256")
    _require(isinstance(digest, str) and len(digest) == 64 and
             all(c in "0123456789abcdef" for c in digest),
             "'file_sha256' is not a SHA256 (64 hexadecimal digits)")
    _require(kind in SKOPS_TRUSTED_TYPES, f"unknown classifier kind {kind!r}")


def _validate_settings(settings: Any) -> None:
    _require(isinstance(settings, dict), "'radiomics_settings' is not an object")
    _require(isinstance(settings.get("text"), str) and bool(settings.get("text")),
             "'radiomics_settings' holds no settings text")
    _require(isinstance(settings.get("sha256"), str), "'radiomics_settings' has no sha256")
    _require(isinstance(settings.get("name", ""), str), "the settings name is not a string")


def _validate_payload(payload: dict[str, Any], path: Path) -> None:
    """Check every field :func:`load_classifier` and prediction use.

    Raises
    ------
    ArtefactError
        Naming the first malformed field.
    """
    try:
        _validate_features(payload)
        n_classes = _validate_class_names(payload)
        kind = payload.get("kind")
        _require(isinstance(kind, str) and (kind == "logistic" or kind in SKOPS_TRUSTED_TYPES),
                 f"unknown classifier kind {kind!r}")
        model = payload.get("model")
        _require(isinstance(model, dict), "'model' is not an object (the fitted model)")
        _require(model.get("kind", kind) == kind, "the model block's kind differs from 'kind'")
        if kind == "logistic":
            _validate_logistic(model, len(payload["features"]), n_classes)
        else:
            _validate_skops_reference(model, kind)
        _require(payload.get("aggregation", "mean") in _AGGREGATIONS,
                 f"'aggregation' is not one of {', '.join(_AGGREGATIONS)}")
        threshold = payload.get("threshold", 0.5)
        _require(_is_number(threshold) and 0.0 <= float(threshold) <= 1.0,
                 f"'threshold' {threshold!r} is not a number in [0, 1]")
        _validate_settings(payload.get("radiomics_settings"))
        for optional in ("report", "versions"):
            _require(isinstance(payload.get(optional, {}), dict),
                     f"'{optional}' is not an object")
    except _FieldError as exc:
        raise ArtefactError(
            f"Classifier {path} is malformed: {exc}. It was not written by `hrpqct "
            "train-classifier` (or was edited); use the original file or train it again.") \
            from None


def _load_skops(path: Path, info: dict[str, Any], kind: str):
    try:
        import skops.io as sio
    except ImportError:
        raise ArtefactError("This classifier is stored with skops; install it (pip install "
                            "skops).") from None
    skops_path = path.parent / info["file"]
    if not skops_path.is_file():
        raise ArtefactError(f"Classifier model file {skops_path} is missing; keep it next to "
                            f"{path.name}.")
    if sha256_file(skops_path) != info["file_sha256"]:
        raise ArtefactError(f"Classifier model file {skops_path} fails its checksum.")
    trusted = SKOPS_TRUSTED_TYPES.get(kind)
    if trusted is None:
        raise ArtefactError(f"Unknown classifier kind {kind!r} in {path}.")
    if skops_path.resolve().parent != path.resolve().parent:
        raise ArtefactError(f"Classifier model file {skops_path} lies outside the folder of "
                            f"{path.name}; refusing to open it.")
    try:
        untrusted = sio.get_untrusted_types(file=skops_path)
    except Exception as exc:  # skops raises zipfile/pickle/json errors of many kinds
        raise ArtefactError(
            f"Classifier model file {skops_path} is not a skops file ({type(exc).__name__}): "
            "it may be a pickle, which is never loaded (it could run any code). Use the "
            "files written by `hrpqct train-classifier`.") from None
    refused = sorted(set(untrusted) - set(trusted))
    if refused:
        raise ArtefactError(f"{skops_path} contains types that are not trusted: {refused}. "
                            "It was not made by this software; refusing to load it.")
    try:
        return sio.load(skops_path, trusted=trusted)
    except Exception as exc:  # a damaged archive with a matching checksum
        raise ArtefactError(f"Classifier model file {skops_path} cannot be loaded "
                            f"({type(exc).__name__}: {exc}).") from None


def bundled_classifier_path() -> Path | None:
    """The bundled classifier's file after its checksum check; None if none is bundled.

    Raises
    ------
    ArtefactError
        If the classifier is listed but missing or damaged (a broken installation is an
        error, not "no classifier").
    """
    from HRpQCTCore.artefacts import list_artefacts, verified_path

    if not any(a.name == BUNDLED_CLASSIFIER for a in list_artefacts()):
        return None
    return verified_path(BUNDLED_CLASSIFIER)
