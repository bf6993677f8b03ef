"""A learned myotendinous/adipose split: gradient-boosted trees over a slice's local context.

The rules (:mod:`.soft_tissue`) decide each voxel by its own local mean. Under motion that
leaves two kinds of error (``benchmarks/RESULTS.md``): ghost arcs, the moved cortex's faint
copy a few millimetres outside the tibia, called myotendinous; and streak residue inside the
marbled muscle bellies, called adipose. Both are visible only in context: how far from bone,
how thin, which way the edge runs, how the mean changes over 0.3-2.4 mm. The model reads
that context on a coarse grid of blocks (:data:`BLOCK_MM`, 4 x 4 voxels at 60.7 um) and
replaces the rules' split of the inner soft tissue; skin and bone are not touched.

**Features** (one row per block holding inner soft tissue; :data:`FEATURE_NAMES`, in this
order): the block's mean and SD of the local mean, normalised as ``(hu - split) / (muscle -
fat)`` with the scan's own levels (so a scanner's soft-tissue calibration does not matter);
the share of the block the rules call myotendinous; that mean smoothed over 0.3, 0.6, 1.2
and 2.4 mm; distances (mm) to bone, to the tibia, to the inner soft tissue's edge, and within
the rules' myotendinous and adipose parts; the squared cosine between the mean's gradient and
the direction to the nearest bone (arcs run parallel to the periosteum), the gradient's
magnitude, a ridge measure (0.3 minus 1.2 mm smoothing) and the structure tensor's
coherence; and three of the whole slice, the same for all its blocks, that tell a quiet slice
(where the rules are nearly right) from one with artefacts: the spread of the mean over the
blocks the rules call purely adipose and purely myotendinous, and the share of blocks they
split. A second stage (auto-context) reads the same features plus the first stage's
block probabilities, smoothed over the same scales, and the depth within its two parts
(:data:`CONTEXT_FEATURE_NAMES`): a call is then made from its neighbours' calls too, which
removes isolated false blocks inside either tissue. The last stage's block probabilities are
interpolated back to voxels (weighted by each block's share of inner soft tissue) and
thresholded at 0.5, except where they lie within ``0.5 +- rules_band``: there the rules'
own voxel call stands, because the rules resolve a boundary finer than a block.

**Model file** (JSON, :func:`load_model`; the bundled one is an artefact with a checksum):
per stage, the names of the features it reads (taken from the computed columns by name, so
a file trained on fewer features stays readable) and the trees as plain arrays (feature,
threshold, children, leaf value), read with every field checked and evaluated here with
numpy (:class:`TreeEnsemble`): no pickle, and no dependency on scikit-learn's private
classes at run time. Files of format version 1 (one stage, no rules band) are still read.
Training:
``benchmarks/train_soft_tissue_model.py`` (scikit-learn's ``HistGradientBoostingClassifier``
on development phantoms outside both test sets).

The bundled model is trained on this project's **synthetic phantoms** only; it has not been
validated on real scans. ``PostprocessConfig(soft_tissue_model="none")`` (or
``--soft-tissue-rules`` on the command line) keeps the rules' split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import special

from HRpQCTCore.errors import ArtefactError

__all__ = ["BLOCK_MM", "FEATURE_NAMES", "CONTEXT_FEATURE_NAMES", "BUNDLED_SOFT_TISSUE_MODEL",
           "TreeEnsemble", "SoftTissueModel", "block_side_px", "slice_features",
           "context_features", "stage_feature_names", "stage_input", "load_model",
           "model_from_dict", "bundled_model", "model_to_dict", "split_identity"]

#: Side of the blocks the model reads (mm): 4 voxels at 60.7 um. Finer than the 0.4 mm
#: opening of the rules; a full slice's ~600 k inner voxels become ~40 k rows.
BLOCK_MM = 0.24
#: Smoothing scales (mm) of the block means.
SCALES_MM = (0.3, 0.6, 1.2, 2.4)
#: Distances are capped here (mm): beyond it, context no longer changes the call.
DISTANCE_CAP_MM = 30.0
#: Scale (mm) of the structure tensor's averaging.
TENSOR_MM = 0.6
FEATURE_NAMES = (
    "mean", "myotendinous_share", "sd",
    *(f"mean_smoothed_{mm}mm" for mm in SCALES_MM),
    "distance_to_bone_mm", "distance_to_tibia_mm", "depth_in_soft_tissue_mm",
    "depth_in_myotendinous_mm", "depth_in_adipose_mm",
    "edge_facing_bone", "gradient", "ridge", "coherence",
    "slice_adipose_spread", "slice_myotendinous_spread", "slice_mixed_share",
)
#: What a later stage reads besides :data:`FEATURE_NAMES`: the previous stage's block
#: probability, smoothed over :data:`SCALES_MM`, and depth (mm) within its two parts.
CONTEXT_FEATURE_NAMES = (
    "stage_probability", *(f"stage_probability_smoothed_{mm}mm" for mm in SCALES_MM),
    "depth_in_stage_myotendinous_mm", "depth_in_stage_adipose_mm",
)
#: Name of the bundled model in the segmentation engine's artefact manifest.
BUNDLED_SOFT_TISSUE_MODEL = "soft-tissue-split-phantoms"
FORMAT = "hrpqct-soft-tissue-model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

MYOTENDINOUS = 6
ADIPOSE = 7
_BONE_LABELS = (1, 2, 3, 4)
_TIBIA_LABELS = (1, 2)


# --- features ------------------------------------------------------------------------------

def block_side_px(pixel_mm: float) -> int:
    """Voxels per block side for an in-plane voxel size (at least 1)."""
    return max(1, round(BLOCK_MM / float(pixel_mm)))


def _block_sums(values: np.ndarray, side: int) -> np.ndarray:
    """Sums over ``side`` x ``side`` blocks (the array zero-padded to whole blocks)."""
    h, w = values.shape
    padded = np.zeros((-(-h // side) * side, -(-w // side) * side), np.float32)
    padded[:h, :w] = values
    return padded.reshape(padded.shape[0] // side, side, padded.shape[1] // side,
                          side).sum(axis=(1, 3))


def _weighted_smooth(values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian mean of ``values`` weighted by ``weights`` (normalised convolution)."""
    num = ndi.gaussian_filter(values * weights, sigma, truncate=3.0)
    den = ndi.gaussian_filter(weights, sigma, truncate=3.0)
    return num / np.maximum(den, np.float32(1e-3))


def _distance_mm(outside: np.ndarray, block_mm: float) -> np.ndarray:
    """Distance (mm, capped) of each block to the nearest block where ``outside`` is False."""
    if outside.all():
        return np.full(outside.shape, DISTANCE_CAP_MM, np.float32)
    return np.minimum(ndi.distance_transform_edt(outside) * block_mm, DISTANCE_CAP_MM)


def _edge_facing_bone(mean: np.ndarray, bone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos^2 between the gradient of ``mean`` and the direction to the nearest bone block,
    and the gradient's magnitude."""
    gy, gx = ndi.sobel(mean, 0), ndi.sobel(mean, 1)
    magnitude = np.hypot(gy, gx)
    if not bone.any():
        return np.zeros_like(mean), magnitude
    _, (iy, ix) = ndi.distance_transform_edt(~bone, return_indices=True)
    ry = np.arange(mean.shape[0], dtype=np.float32)[:, None] - iy
    rx = np.arange(mean.shape[1], dtype=np.float32)[None, :] - ix
    cosine = (gy * ry + gx * rx) / ((magnitude + 1e-6) * (np.hypot(ry, rx) + 1e-6))
    return cosine * cosine, magnitude


def _coherence(mean: np.ndarray, sigma: float) -> np.ndarray:
    """Coherence of the structure tensor of ``mean`` (0: isotropic, 1: one direction)."""
    gy, gx = ndi.sobel(mean, 0), ndi.sobel(mean, 1)
    jyy, jxx, jxy = (ndi.gaussian_filter(a, sigma, truncate=3.0)
                     for a in (gy * gy, gx * gx, gx * gy))
    return np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-6)


def _slice_context(mean: np.ndarray, myo_share: np.ndarray,
                   rows: np.ndarray) -> tuple[float, float, float]:
    """The slice's SD of the block mean where the rules call a block purely adipose (< 5 %
    myotendinous) and purely myotendinous (> 95 %), and the share of blocks in between."""
    def spread(where: np.ndarray) -> float:
        return float(mean[where].std()) if where.sum() > 10 else 0.0

    share = myo_share[rows]
    mixed = float(((share > 0.05) & (share <= 0.95)).mean()) if share.size else 0.0
    return spread(rows & (myo_share < 0.05)), spread(rows & (myo_share > 0.95)), mixed


def slice_features(local_hu: np.ndarray, inner: np.ndarray, view: np.ndarray, levels,
                   pixel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's features on one slice's leg box.

    Parameters
    ----------
    local_hu:
        The local mean (after drift correction) the rules split, float32 ``[y, x]``.
    inner:
        The inner soft tissue (soft tissue without the skin band).
    view:
        The rules' regions of the box (bones 1-4 and the split already written).
    levels:
        The scan's :class:`.soft_tissue_levels.SoftTissueLevels`.
    pixel_mm:
        In-plane voxel size.

    Returns
    -------
    features, rows, weights:
        ``features`` ``[n, len(FEATURE_NAMES)]`` float32 of the blocks in ``rows`` (a boolean
        block mask: blocks holding inner soft tissue), and every block's share of inner
        soft tissue (``weights``, for interpolating back).
    """
    side = block_side_px(pixel_mm)
    block_mm = side * float(pixel_mm)
    span = max(float(levels.muscle_hu - levels.fat_hu), 1.0)
    z = np.where(inner, (local_hu - np.float32(levels.split_hu)) / np.float32(span),
                 np.float32(0)).astype(np.float32)
    count = _block_sums(inner.astype(np.float32), side)
    rows = count > 0
    n = np.maximum(count, 1)
    mean = _block_sums(z, side) / n
    sd = np.sqrt(np.maximum(_block_sums(z * z, side) / n - mean * mean, 0))
    myo_share = _block_sums((view == MYOTENDINOUS) & inner, side) / n
    weights = count / np.float32(side * side)
    smoothed = [_weighted_smooth(mean, weights, mm / block_mm) for mm in SCALES_MM]
    bone = _block_sums(np.isin(view, _BONE_LABELS), side) > 0
    tibia = _block_sums(np.isin(view, _TIBIA_LABELS), side) > 0
    myo_blocks = myo_share > 0.5
    facing, gradient = _edge_facing_bone(smoothed[0], bone)
    whole_slice = [np.full(rows.shape, v, np.float32) for v in _slice_context(mean, myo_share,
                                                                             rows)]
    columns = [
        mean, myo_share, sd, *smoothed,
        _distance_mm(~bone, block_mm), _distance_mm(~tibia, block_mm),
        _distance_mm(weights > 0.5, block_mm),
        _distance_mm(myo_blocks, block_mm), _distance_mm(~myo_blocks & rows, block_mm),
        facing, gradient, smoothed[0] - smoothed[2], _coherence(smoothed[0], TENSOR_MM / block_mm),
        *whole_slice,
    ]
    features = np.stack([c[rows] for c in columns], axis=1).astype(np.float32)
    return features, rows, weights


def stage_feature_names(stage: int) -> tuple[str, ...]:
    """The columns stage ``stage`` (0 first) can read, in order: what it is trained on."""
    return FEATURE_NAMES if stage == 0 else FEATURE_NAMES + CONTEXT_FEATURE_NAMES


def context_features(block_probability: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                     pixel_mm: float) -> np.ndarray:
    """What a later stage reads from the previous stage's block probabilities.

    ``block_probability`` is the block map (``rows.shape``; the probability of the blocks in
    ``rows``, 0 elsewhere); ``rows`` and ``weights`` are :func:`slice_features`' outputs.
    Returns ``[n, len(CONTEXT_FEATURE_NAMES)]`` float32 for the blocks in ``rows``.
    """
    block_mm = block_side_px(pixel_mm) * float(pixel_mm)
    smoothed = [_weighted_smooth(block_probability, weights, mm / block_mm) for mm in SCALES_MM]
    myotendinous = (block_probability > 0.5) & rows
    columns = [block_probability, *smoothed, _distance_mm(myotendinous, block_mm),
               _distance_mm(~myotendinous & rows, block_mm)]
    return np.stack([c[rows] for c in columns], axis=1).astype(np.float32)


def stage_input(features: np.ndarray, previous: np.ndarray | None, rows: np.ndarray,
                weights: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Every column a stage can read (:func:`stage_feature_names`): ``features`` alone for
    stage 0 (``previous`` None), else with the :func:`context_features` of ``previous``, the
    earlier stage's block map."""
    if previous is None:
        return features
    return np.concatenate([features, context_features(previous, rows, weights, pixel_mm)],
                          axis=1)


def _upsample_axis(values: np.ndarray, side: int, axis: int) -> np.ndarray:
    """Linear interpolation by ``side`` along ``axis``, pixel centres aligned (a block's
    centre is the centre of its ``side`` voxels) and the edges held."""
    n = values.shape[axis]
    position = (np.arange(n * side, dtype=np.float32) + 0.5) / side - 0.5
    low = np.clip(np.floor(position).astype(np.intp), 0, n - 1)
    high = np.minimum(low + 1, n - 1)
    weight = np.clip(position - low, 0, 1).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    weight = weight.reshape(shape)
    a, b = np.take(values, low, axis=axis), np.take(values, high, axis=axis)
    return a + (b - a) * weight


def _to_voxels(block_probability: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
               side: int) -> np.ndarray:
    """Block probabilities interpolated (bilinear, weighted by ``weights``) to voxels."""
    if side == 1:
        return block_probability[:shape[0], :shape[1]]
    h, w = -(-shape[0] // side), -(-shape[1] // side)  # the blocks that cover the voxels
    num = (block_probability * weights)[:h, :w]
    den = weights[:h, :w]
    num = _upsample_axis(_upsample_axis(num, side, 0), side, 1)
    den = _upsample_axis(_upsample_axis(den, side, 0), side, 1)
    return (num / np.maximum(den, np.float32(1e-6)))[:shape[0], :shape[1]]


# --- the trees -----------------------------------------------------------------------------

def _tree_values(tree: dict[str, np.ndarray], columns: np.ndarray) -> np.ndarray:
    """One tree's leaf value for every sample (``columns``: ``[features, n]``), the samples
    sent down node by node (each node splits only the samples that reach it)."""
    out = np.empty(columns.shape[1], dtype=np.float64)
    pending = [(0, np.arange(columns.shape[1]))]
    feature, threshold, left, right, value = (tree[k] for k in
                                              ("feature", "threshold", "left", "right", "value"))
    while pending:
        node, rows = pending.pop()
        if feature[node] < 0:
            out[rows] = value[node]
            continue
        goes_left = columns[feature[node]].take(rows) <= threshold[node]
        pending.append((int(left[node]), rows[goes_left]))
        pending.append((int(right[node]), rows[~goes_left]))
    return out


@dataclass(frozen=True)
class TreeEnsemble:
    """Binary gradient-boosted trees: ``P = sigmoid(baseline + sum of the trees' leaves)``.

    Each tree is arrays over its nodes: ``feature`` (index into the features; -1 at a leaf),
    ``threshold`` (go left when ``x <= threshold``), ``left``/``right`` (child nodes) and
    ``value`` (a leaf's contribution). Node 0 is the root.
    """

    baseline: float
    trees: tuple[dict[str, np.ndarray], ...]
    n_features: int
    #: Which of :func:`stage_feature_names`' columns the trees read (their ``feature`` indices
    #: count within this selection).
    columns: tuple[int, ...] | None = None

    def decision(self, features: np.ndarray) -> np.ndarray:
        """The raw score (log-odds) of each row of ``features`` ``[n, n_features]``.

        Trees are added in order to the baseline in float64, as scikit-learn does, so the
        scores equal its ``decision_function``.
        """
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"Expected features [n, {self.n_features}], got {x.shape}")
        columns = np.ascontiguousarray(x.T, dtype=np.float64)  # one row per feature
        score = np.full(x.shape[0], self.baseline, dtype=np.float64)
        for tree in self.trees:
            score += _tree_values(tree, columns)
        return score

    def probability(self, features: np.ndarray) -> np.ndarray:
        """``P(myotendinous)`` of each row."""
        return special.expit(self.decision(features))  # no overflow at large scores


@dataclass(frozen=True)
class SoftTissueModel:
    """A loaded model: its stages of trees, what they read, and where they come from.

    Stage 0 reads :data:`FEATURE_NAMES`; each later stage reads those and the previous
    stage's :func:`context_features`. ``rules_band``: where the last stage's voxel
    probability is within ``0.5 +- rules_band``, the rules' call stands.
    """

    stages: tuple[TreeEnsemble, ...]
    block_mm: float
    provenance: dict[str, Any]
    voxel_mm_range: tuple[float, float]
    rules_band: float = 0.0
    sha256: str | None = None

    def applies_to(self, pixel_mm: float) -> bool:
        """Whether scans of this in-plane voxel size are within what the model was made for."""
        low, high = self.voxel_mm_range
        return low <= float(pixel_mm) <= high

    def block_probability(self, features: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                          pixel_mm: float) -> np.ndarray:
        """``P(myotendinous)`` of every block (a map of ``rows.shape``; 0 outside ``rows``)
        from :func:`slice_features`' outputs, through all stages."""
        blocks = None
        for stage in self.stages:
            x = stage_input(features, blocks, rows, weights, pixel_mm)
            if stage.columns is not None:
                x = x[:, stage.columns]
            blocks = np.zeros(rows.shape, dtype=np.float32)
            blocks[rows] = stage.probability(x)
        return blocks

    def relabel(self, view: np.ndarray, inner: np.ndarray, local_hu: np.ndarray, levels,
                pixel_mm: float) -> None:
        """Rewrite the myotendinous/adipose split of the inner soft tissue in ``view``."""
        if not inner.any():
            return
        features, rows, weights = slice_features(local_hu, inner, view, levels, pixel_mm)
        blocks = self.block_probability(features, rows, weights, pixel_mm)
        probability = _to_voxels(blocks, weights, inner.shape, block_side_px(pixel_mm))
        myotendinous = probability > 0.5
        if self.rules_band > 0:
            unsure = np.abs(probability - np.float32(0.5)) < np.float32(self.rules_band)
            myotendinous = np.where(unsure, view == MYOTENDINOUS, myotendinous)
        view[inner & myotendinous] = MYOTENDINOUS
        view[inner & ~myotendinous] = ADIPOSE


# --- files ---------------------------------------------------------------------------------

def _stage_to_dict(classifier, stage: int, names=None) -> dict[str, Any]:
    """One fitted stage; ``names``: the columns it was fitted on (default: all the stage's)."""
    names = list(stage_feature_names(stage) if names is None else names)
    if getattr(classifier, "n_trees_per_iteration_", 1) != 1:
        raise ValueError("Only a binary classifier can be stored")
    if classifier.n_features_in_ != len(names):
        raise ValueError(f"Stage {stage}'s classifier reads {classifier.n_features_in_} "
                         f"features, the stage {len(names)}")
    trees = []
    for (predictor,) in classifier._predictors:  # sklearn keeps no public tree accessor
        nodes = predictor.nodes
        leaf = nodes["is_leaf"].astype(bool)
        trees.append({
            "feature": np.where(leaf, -1, nodes["feature_idx"]).astype(int).tolist(),
            "threshold": [float(v) for v in nodes["num_threshold"]],
            "left": nodes["left"].astype(int).tolist(),
            "right": nodes["right"].astype(int).tolist(),
            "value": [float(v) for v in nodes["value"]],
        })
    return {"features": list(names),
            "baseline": float(np.ravel(classifier._baseline_prediction)[0]), "trees": trees}


def model_to_dict(classifiers, block_mm: float, voxel_mm_range: tuple[float, float],
                  provenance: dict[str, Any], rules_band: float = 0.0,
                  stage_features=None) -> dict[str, Any]:
    """Fitted binary ``HistGradientBoostingClassifier`` stages as this module's JSON document.

    ``classifiers``: one per stage, in order (stage 0 fitted on :data:`FEATURE_NAMES`, later
    ones on :func:`stage_feature_names`). ``voxel_mm_range``: the in-plane voxel sizes the
    model may be applied to (scans outside it keep the rules' split). ``rules_band``: see
    :class:`SoftTissueModel`. ``stage_features``: per stage, the names of the columns it was
    fitted on, when not all :func:`stage_feature_names`.
    """
    if not 0 <= rules_band < 0.5:
        raise ValueError("rules_band must be in [0, 0.5)")
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "caveat": ("Trained on synthetic phantoms only; not validated on real scans. "
                       "Research use only, not for clinical use."),
            "block_mm": float(block_mm), "voxel_mm_range": [float(v) for v in voxel_mm_range],
            "rules_band": float(rules_band),
            "stages": [_stage_to_dict(c, k, None if stage_features is None else stage_features[k])
                       for k, c in enumerate(classifiers)],
            "provenance": provenance}


def _tree_from_dict(raw: Any, n_features: int, where: str) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise ArtefactError(f"{where}: a tree must be an object")
    try:
        feature = np.asarray(raw["feature"], dtype=np.int32)
        threshold = np.asarray(raw["threshold"], dtype=np.float64)
        left = np.asarray(raw["left"], dtype=np.int32)
        right = np.asarray(raw["right"], dtype=np.int32)
        value = np.asarray(raw["value"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtefactError(f"{where}: tree fields missing or not numbers ({exc})") from None
    n = feature.size
    if n == 0 or any(a.shape != (n,) for a in (threshold, left, right, value)):
        raise ArtefactError(f"{where}: a tree's arrays must be non-empty and of equal length")
    if not (np.isfinite(value).all() and np.isfinite(threshold[feature >= 0]).all()):
        raise ArtefactError(f"{where}: non-finite thresholds or leaf values")
    split = feature >= 0
    if (feature >= n_features).any() or (feature < -1).any():
        raise ArtefactError(f"{where}: a node reads a feature the model does not have")
    # children must point forward (no cycles) and stay inside the tree
    index = np.arange(n)
    for child in (left, right):
        if (split & ((child <= index) | (child >= n))).any():
            raise ArtefactError(f"{where}: a node's child is not a later node of the tree")
    return {"feature": feature, "threshold": threshold, "left": left, "right": right,
            "value": value}


def _stage_from_dict(raw: Any, stage: int, where: str) -> TreeEnsemble:
    available = stage_feature_names(stage)
    if not isinstance(raw, dict):
        raise ArtefactError(f"{where}: a stage must be an object")
    names = raw.get("features")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise ArtefactError(f"{where}: features must be a list of distinct names")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ArtefactError(f"{where}: reads features this version does not compute at this "
                            f"stage: {unknown}; update hrpqct-segmenter")
    columns = tuple(available.index(n) for n in names)
    baseline, trees = raw.get("baseline"), raw.get("trees")
    if not (isinstance(baseline, (int, float)) and math.isfinite(baseline)):
        raise ArtefactError(f"{where}: baseline must be a finite number")
    if not isinstance(trees, list) or not trees:
        raise ArtefactError(f"{where}: no trees")
    parsed = tuple(_tree_from_dict(t, len(names), f"{where}, tree {i}")
                   for i, t in enumerate(trees))
    return TreeEnsemble(float(baseline), parsed, len(names),
                        None if columns == tuple(range(len(available))) else columns)


def _stages_of(raw: dict, where: str) -> tuple[list, float]:
    """The stage documents and the rules band; a version-1 file is one stage, no band."""
    if raw.get("format_version") == 1:
        return [{k: raw.get(k) for k in ("features", "baseline", "trees")}], 0.0
    stages, band = raw.get("stages"), raw.get("rules_band")
    if not isinstance(stages, list) or not stages:
        raise ArtefactError(f"{where}: no stages")
    if not (isinstance(band, (int, float)) and 0 <= band < 0.5):
        raise ArtefactError(f"{where}: rules_band must be a number in [0, 0.5)")
    return stages, float(band)


def model_from_dict(raw: Any, where: str = "soft-tissue model",
                    sha256: str | None = None) -> SoftTissueModel:
    """Check every field of a model document and build the model."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtefactError(f"{where}: not a soft-tissue model file (format {FORMAT!r})")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise ArtefactError(f"{where}: format version {raw.get('format_version')!r} is not "
                            f"one of {READABLE_VERSIONS}; update hrpqct-segmenter")
    block_mm = raw.get("block_mm")
    if not (isinstance(block_mm, (int, float)) and 0 < block_mm <= 2.0):
        raise ArtefactError(f"{where}: block_mm must be a size in (0, 2] mm")
    voxel_range = raw.get("voxel_mm_range")
    if not (isinstance(voxel_range, list) and len(voxel_range) == 2
            and all(isinstance(v, (int, float)) and 0 < v < 10 for v in voxel_range)
            and voxel_range[0] <= voxel_range[1]):
        raise ArtefactError(f"{where}: voxel_mm_range must be [low, high] in mm")
    stages, band = _stages_of(raw, where)
    parsed = tuple(_stage_from_dict(stage, k, f"{where}, stage {k}")
                   for k, stage in enumerate(stages))
    provenance = raw.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ArtefactError(f"{where}: provenance must be an object")
    return SoftTissueModel(parsed, float(block_mm), provenance,
                           (float(voxel_range[0]), float(voxel_range[1])), band, sha256)


def load_model(path: str | Path, sha256: str | None = None) -> SoftTissueModel:
    """Read a model file (JSON), checking its checksum when ``sha256`` is given."""
    from HRpQCTCore.artefacts import sha256_file

    path = Path(path)
    if sha256 is not None and sha256_file(path) != sha256:
        raise ArtefactError(f"{path} fails its checksum: the file is damaged or was replaced")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"Cannot read the soft-tissue model {path}: {exc}") from None
    return model_from_dict(raw, str(path), sha256)


@lru_cache(maxsize=1)
def bundled_model() -> SoftTissueModel:
    """The bundled model, after its checksum check (read once per process)."""
    from HRpQCTCore.artefacts import list_artefacts, verified_path

    path = verified_path(BUNDLED_SOFT_TISSUE_MODEL)
    sha = next(a.sha256 for a in list_artefacts() if a.name == BUNDLED_SOFT_TISSUE_MODEL)
    return model_from_dict(json.loads(path.read_text(encoding="utf-8")), str(path), sha)


def split_identity(setting: str) -> dict[str, Any]:
    """What splits the soft tissue under a ``soft_tissue_model`` setting, for records: the
    rules, or the model file and its SHA256 (the bundled one's from the artefact manifest).
    The model is applied to scans within its voxel sizes whose own tissue levels were found;
    others keep the rules (logged)."""
    if setting == "none":
        return {"split": "rules"}
    if setting == "bundled":
        from HRpQCTCore.artefacts import list_artefacts

        sha = next((a.sha256 for a in list_artefacts() if a.name == BUNDLED_SOFT_TISSUE_MODEL),
                   None)
        return {"split": "learned", "model": BUNDLED_SOFT_TISSUE_MODEL, "sha256": sha}
    from HRpQCTCore.artefacts import sha256_file

    return {"split": "learned", "model": str(setting), "sha256": sha256_file(setting)}
