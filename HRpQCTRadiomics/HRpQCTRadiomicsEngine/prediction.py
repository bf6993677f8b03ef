"""Applying a saved classifier to feature rows: per-slice and per-subject probabilities.

Shared by ``hrpqct classify`` and the whole-scan pipeline (:mod:`.pipeline`), so both give the
same numbers for the same features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from HRpQCTCore.errors import InvalidDataError

__all__ = ["Prediction", "features_by_region", "predict_rows"]


@dataclass
class Prediction:
    """Probabilities from :func:`predict_rows`.

    Attributes
    ----------
    sample_ids:
        ``(scan, slice)`` of each image-level probability.
    groups:
        Subject of each sample.
    probabilities:
        Image-level (per slice) osteoporosis probability.
    subjects:
        Subjects in order of first appearance.
    subject_probabilities:
        Per subject, the aggregation (``aggregation``) of its slices' probabilities.
    aggregation:
        ``"mean"`` or ``"median"`` (from the classifier file).
    class_names:
        A multiclass classifier's classes; None for a binary one (whose only output is
        ``probabilities``).
    class_probabilities, subject_class_probabilities:
        Multiclass only: ``(samples, classes)`` and ``(subjects, classes)``; a subject's row is
        the aggregation of its slices' rows, class by class (median rows need not sum to 1).
        ``probabilities`` / ``subject_probabilities`` are then the osteoporosis column.
    """

    sample_ids: list[tuple[str, str]]
    groups: np.ndarray
    probabilities: np.ndarray
    subjects: list[str]
    subject_probabilities: np.ndarray
    aggregation: str
    class_names: list[str] | None = None
    class_probabilities: np.ndarray | None = field(default=None, repr=False)
    subject_class_probabilities: np.ndarray | None = field(default=None, repr=False)

    def subject_class_dict(self, subject: str) -> dict[str, float] | None:
        """``{class: probability}`` of ``subject`` (None for a binary classifier)."""
        if self.class_names is None or self.subject_class_probabilities is None:
            return None
        row = self.subject_class_probabilities[self.subjects.index(subject)]
        return {name: float(p) for name, p in zip(self.class_names, row, strict=True)}

    def slices_of(self, subject: str) -> int:
        """Number of slices that contributed to ``subject``'s probability."""
        return int((self.groups == subject).sum())


def features_by_region(features: list[str]) -> dict[int, list[str]]:
    """``<region>:<feature>`` names -> region label -> pyradiomics names (prediction mode)."""
    from HRpQCTCore.regions import region_by_name
    from HRpQCTRadiomicsEngine.classification import split_qualified_name

    out: dict[int, list[str]] = {}
    for name in features:
        region, feature = split_qualified_name(name)
        out.setdefault(region_by_name(region).label, []).append(feature)
    return out


def predict_rows(model, rows) -> Prediction:
    """Probabilities of a loaded classifier (:class:`.model_io.SavedClassifier`) for rows.

    Parameters
    ----------
    model:
        The classifier.
    rows:
        :class:`.table.FeatureRows` holding (at least) the classifier's features.

    Raises
    ------
    InvalidDataError
        If no slice has all the regions the classifier needs, or features are missing.
    """
    from HRpQCTRadiomicsEngine.classification import aggregate_by_subject, assemble_dataset

    data = assemble_dataset(rows, model.regions, None, model.features)
    if data.X.shape[0] == 0:
        raise InvalidDataError("No slice has all the regions the classifier needs "
                          f"({', '.join(model.regions)}); nothing to classify.")
    class_names = getattr(model, "class_names", None)
    if class_names is None:
        probabilities = model.predict_proba(data.X)
        subjects, p_subject, _ = aggregate_by_subject(probabilities, data.groups, None,
                                                      model.aggregation)
        return Prediction(sample_ids=list(data.sample_ids), groups=data.groups,
                          probabilities=np.asarray(probabilities, dtype=np.float64),
                          subjects=[str(s) for s in subjects],
                          subject_probabilities=np.asarray(p_subject, dtype=np.float64),
                          aggregation=model.aggregation)
    matrix = np.asarray(model.predict_class_proba(data.X), dtype=np.float64)
    subjects, p_subject, _ = aggregate_by_subject(matrix, data.groups, None, model.aggregation)
    p_subject = np.asarray(p_subject, dtype=np.float64).reshape(len(subjects), -1)
    column = model.osteoporosis_index()
    return Prediction(sample_ids=list(data.sample_ids), groups=data.groups,
                      probabilities=matrix[:, column], subjects=[str(s) for s in subjects],
                      subject_probabilities=p_subject[:, column],
                      aggregation=model.aggregation, class_names=list(class_names),
                      class_probabilities=matrix, subject_class_probabilities=p_subject)
