"""Segmentation accuracy: per-class IoU and F1 (Dice) from label volumes, and tables.

Everything derives from a confusion matrix counted in chunks straight from the ``uint8``
label volumes (no one-hot or float volumes). For class ``c`` with true positives ``TP``,
false positives ``FP`` and false negatives ``FN``::

    IoU = TP / (TP + FP + FN)          F1 = Dice = 2 TP / (2 TP + FP + FN)

A class absent from both truth and prediction has no defined score (NaN), and is left out of
means. Scans are aggregated as mean ± sample SD of the per-scan scores, the way the paper
reports its test set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from HRpQCTCore.regions import BACKGROUND, NETWORK_CLASSES

__all__ = [
    "confusion_matrix",
    "iou_from_confusion",
    "f1_from_confusion",
    "ClassScores",
    "ScoreSummary",
    "scores_from_labels",
    "summarise_scores",
    "format_class_table",
    "format_comparison_table",
]


def confusion_matrix(true_labels: np.ndarray, predicted_labels: np.ndarray,
                     num_classes: int = len(NETWORK_CLASSES),
                     chunk_voxels: int = 1 << 22) -> np.ndarray:
    """Counts ``[true, predicted]`` as an ``int64`` ``[num_classes, num_classes]`` matrix.

    Rows are the true class, columns the predicted class. The volumes are walked in chunks of
    about ``chunk_voxels`` voxels, so memory stays small for whole scans.
    """
    truth = np.asarray(true_labels)
    pred = np.asarray(predicted_labels)
    if truth.shape != pred.shape:
        raise ValueError(f"Label maps differ in shape: truth {truth.shape}, "
                         f"prediction {pred.shape}")
    for name, arr in (("truth", truth), ("prediction", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"The {name} label map must hold integers, got {arr.dtype}")
    counts = np.zeros(num_classes * num_classes, dtype=np.int64)
    flat_t = truth.reshape(-1)  # a view for contiguous arrays
    flat_p = pred.reshape(-1)
    for start in range(0, flat_t.size, chunk_voxels):
        t = flat_t[start:start + chunk_voxels]
        p = flat_p[start:start + chunk_voxels]
        lo = min(int(t.min()), int(p.min()))
        hi = max(int(t.max()), int(p.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"Label values must be in 0..{num_classes - 1}; found {lo}..{hi}. Is one of "
                "the maps a 7-region map? (convert with regions.regions_to_classes)")
        index = t.astype(np.int32) * num_classes + p
        counts += np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _tp_fp_fn(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp  # predicted as c, truly something else
    fn = confusion.sum(axis=1) - tp  # truly c, predicted as something else
    return tp, fp, fn


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)``; NaN for classes absent from both maps."""
    tp, fp, fn = _tp_fp_fn(confusion)
    denominator = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp / denominator, np.nan)


def f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class F1 = Dice ``2 TP / (2 TP + FP + FN)``; NaN for classes absent from both."""
    tp, fp, fn = _tp_fp_fn(confusion)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


@dataclass(frozen=True)
class ClassScores:
    """Scores of one scan; arrays are indexed by network class label."""

    confusion: np.ndarray
    iou: np.ndarray
    f1: np.ndarray

    def mean_foreground(self, which: str = "iou") -> float:
        """Mean over the non-background classes present (``which``: ``"iou"``/``"f1"``)."""
        values = getattr(self, which)
        foreground = np.delete(values, BACKGROUND.label)
        return float(np.nanmean(foreground)) if np.isfinite(foreground).any() else np.nan


def scores_from_labels(true_labels: np.ndarray, predicted_labels: np.ndarray,
                       num_classes: int = len(NETWORK_CLASSES)) -> ClassScores:
    """IoU and F1 per class of one scan (or slice)."""
    confusion = confusion_matrix(true_labels, predicted_labels, num_classes)
    return ClassScores(confusion=confusion, iou=iou_from_confusion(confusion),
                       f1=f1_from_confusion(confusion))


@dataclass(frozen=True)
class ScoreSummary:
    """Mean and SD over scans of per-class IoU and F1, and of the per-scan class means.

    Arrays are indexed by network class label. ``mean_iou``/``mean_f1`` are
    ``(mean, sd)`` over scans of each scan's mean over foreground classes (the paper's
    "Mean F1").
    """

    n_scans: int
    iou_mean: np.ndarray
    iou_sd: np.ndarray
    f1_mean: np.ndarray
    f1_sd: np.ndarray
    mean_iou: tuple[float, float]
    mean_f1: tuple[float, float]

    def to_dict(self) -> dict:
        """JSON-ready dict keyed by class key; undefined values (NaN) become ``None``."""

        def num(value) -> float | None:
            return float(value) if np.isfinite(value) else None

        classes = {
            c.key: {"iou_mean": num(self.iou_mean[c.label]), "iou_sd": num(self.iou_sd[c.label]),
                    "f1_mean": num(self.f1_mean[c.label]), "f1_sd": num(self.f1_sd[c.label])}
            for c in NETWORK_CLASSES if c.label < len(self.iou_mean)}
        return {
            "n_scans": self.n_scans,
            "classes": classes,
            "mean_iou": {"mean": num(self.mean_iou[0]), "sd": num(self.mean_iou[1])},
            "mean_f1": {"mean": num(self.mean_f1[0]), "sd": num(self.mean_f1[1])},
            "statistic": "mean and sample SD over scans; class means exclude background",
        }


def _mean_sd(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    counts = np.isfinite(values).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.nansum(values, axis=axis) / np.maximum(counts, 1), np.nan)
        deviations = np.where(np.isfinite(values), values - np.expand_dims(mean, axis), 0.0)
        # Sample SD (n - 1); a single scan has SD 0 rather than undefined.
        sd = np.sqrt((deviations**2).sum(axis=axis) / np.maximum(counts - 1, 1))
    sd = np.where(counts > 0, sd, np.nan)
    return mean, sd


def summarise_scores(scores: Sequence[ClassScores]) -> ScoreSummary:
    """Mean ± sample SD over scans (classes absent from a scan are skipped for that scan)."""
    if not scores:
        raise ValueError("No scans to summarise")
    iou = np.stack([s.iou for s in scores])
    f1 = np.stack([s.f1 for s in scores])
    iou_mean, iou_sd = _mean_sd(iou)
    f1_mean, f1_sd = _mean_sd(f1)
    m_iou, s_iou = _mean_sd(np.array([s.mean_foreground("iou") for s in scores]))
    m_f1, s_f1 = _mean_sd(np.array([s.mean_foreground("f1") for s in scores]))
    return ScoreSummary(
        n_scans=len(scores), iou_mean=iou_mean, iou_sd=iou_sd, f1_mean=f1_mean, f1_sd=f1_sd,
        mean_iou=(float(m_iou), float(s_iou)), mean_f1=(float(m_f1), float(s_f1)))


def _pm(mean: float, sd: float, percent: bool) -> str:
    if not np.isfinite(mean):
        return "n/a"
    factor = 100.0 if percent else 1.0
    if percent:
        return f"{mean * factor:.1f} ± {sd * factor:.1f}"
    return f"{mean:.3f} ± {sd:.3f}"


def format_class_table(summary: ScoreSummary, *, include_background: bool = False,
                       percent: bool = True) -> str:
    """Markdown table, one row per class, columns IoU and F1 (mean ± SD over scans)."""
    unit = " (%)" if percent else ""
    lines = [f"| Class | IoU{unit} | F1 / Dice{unit} |", "|---|---|---|"]
    for c in NETWORK_CLASSES:
        if c.label == BACKGROUND.label and not include_background:
            continue
        iou = _pm(summary.iou_mean[c.label], summary.iou_sd[c.label], percent)
        f1 = _pm(summary.f1_mean[c.label], summary.f1_sd[c.label], percent)
        lines.append(f"| {c.name} | {iou} | {f1} |")
    lines.append(f"| Mean of classes | {_pm(*summary.mean_iou, percent)} | "
                 f"{_pm(*summary.mean_f1, percent)} |")
    return "\n".join(lines) + "\n"


def format_comparison_table(summaries: Mapping[str, ScoreSummary], *,
                            percent: bool = True) -> str:
    """Markdown table in the paper's layout: one row per model, IoU per class, mean F1.

    Columns: each foreground class's IoU (mean ± SD), then the mean IoU and mean F1 over
    classes (mean ± SD over scans).
    """
    classes = [c for c in NETWORK_CLASSES if c.label != BACKGROUND.label]
    unit = " (%)" if percent else ""
    header = ["Model", *(f"{c.name} IoU{unit}" for c in classes),
              f"Mean IoU{unit}", f"Mean F1{unit}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        cells = [name, *(_pm(s.iou_mean[c.label], s.iou_sd[c.label], percent)
                         for c in classes),
                 _pm(*s.mean_iou, percent), _pm(*s.mean_f1, percent)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
