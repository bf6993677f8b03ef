"""Applying a saved classifier to feature rows: per-slice and per-subject probabilities.

Shared by ``hrpqct classify`` and the whole-scan pipeline (:mod:`.pipeline`), so both give the
same numbers for the same features.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    sample_ids: list[tuple[str, str]]
    groups: np.ndarray
    probabilities: np.ndarray
    subjects: list[str]
    subject_probabilities: np.ndarray
    aggregation: str

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
    probabilities = model.predict_proba(data.X)
    subjects, p_subject, _ = aggregate_by_subject(probabilities, data.groups, None,
                                                  model.aggregation)
    return Prediction(sample_ids=list(data.sample_ids), groups=data.groups,
                      probabilities=np.asarray(probabilities, dtype=np.float64),
                      subjects=[str(s) for s in subjects],
                      subject_probabilities=np.asarray(p_subject, dtype=np.float64),
                      aggregation=model.aggregation)
