"""Per-slice uncertainty of the segmentation network, measured to track its errors.

The per-slice mean softmax confidence (:mod:`.inference`) hardly moves when a slice fails (a
blurred scan that lost half the tibia in two slices: 0.984 against 0.990), so other signals
are computed from the same low-resolution logits, on the pixels inside the scan:

- from one forward pass (no extra network cost): ``msp`` (1 - mean top softmax probability of
  the pixels predicted as foreground), ``entropy``, ``margin`` (1 - the difference of the two
  largest probabilities) and ``energy`` (-logsumexp of the logits), each averaged over the
  pixels predicted as bone;
- from a second pass on the horizontally flipped slice (test-time augmentation, twice the
  network cost): ``flip_change`` (share of the pixels labelled bone in either pass whose
  label differs between the passes) and ``flip_l1`` (mean half-L1 distance of the two
  probability vectors on those pixels).

Labels are never changed: the flipped pass only measures. Which signal the QC uses, and its
warning threshold, were chosen on synthetic phantoms with induced failures
(``benchmarks/bench_uncertainty.py``, ``benchmarks/RESULTS.md`` section *Uncertainty*): for
separating slices with bone IoU < 90 % the margin reached AUROC 1.00 (entropy 1.00, energy
0.92, flip_l1 0.87, flip_change 0.80, today's msp 0.78), so ``margin`` is the default; it costs
nothing beyond the one pass, while ``flip`` doubles the network's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "UNCERTAINTY_METHODS",
    "DEFAULT_UNCERTAINTY",
    "SIGNAL_OF_METHOD",
    "CANDIDATES",
    "UncertaintyTracker",
    "logit_signals",
    "flip_signals",
    "flip_input",
    "unflip_logits",
]

#: ``--uncertainty`` choices: ``none`` (no extra work), ``margin`` (free: from the one pass),
#: ``flip`` (a second, flipped pass: doubles the network's time).
UNCERTAINTY_METHODS = ("none", "margin", "flip")
DEFAULT_UNCERTAINTY = "margin"
#: The per-slice signal each method reports.
SIGNAL_OF_METHOD = {"margin": "margin", "flip": "flip_change"}
#: Every candidate signal, in the order of the benchmark's table.
CANDIDATES = ("msp", "entropy", "margin", "energy", "flip_change", "flip_l1")
#: Network classes that are bone (tibial/fibular cortical/trabecular).
BONE_CLASSES = (1, 2, 3, 4)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out = np.exp(shifted)
    out /= out.sum(axis=1, keepdims=True)
    return out


def _as_numpy(logits: Any) -> np.ndarray:
    """Logits of a runner (numpy, or a torch tensor on any device) as float32 numpy."""
    if isinstance(logits, np.ndarray):
        return logits.astype(np.float32, copy=False)
    return logits.detach().float().cpu().numpy()


def _mean_where(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else float("nan")


def logit_signals(logits: Any, inside: np.ndarray) -> dict[str, np.ndarray]:
    """The single-pass candidates for each slice of a batch of logits ``[B, K, h, w]``.

    Parameters
    ----------
    inside:
        ``[h, w]`` pixels inside the scan (not padding).

    Returns
    -------
    dict
        Candidate name -> ``[B]`` float array (higher = less certain; NaN without bone).
    """
    logits = _as_numpy(logits)
    prob = _softmax(logits)
    top2 = np.sort(prob, axis=1)[:, -2:]
    label = prob.argmax(axis=1)
    entropy = -(prob * np.log(np.clip(prob, 1e-12, None))).sum(axis=1) / np.log(prob.shape[1])
    shifted_max = logits.max(axis=1)
    energy = -(shifted_max + np.log(np.exp(logits - shifted_max[:, None]).sum(axis=1)))
    out = {name: np.full(logits.shape[0], np.nan, dtype=np.float64)
           for name in ("msp", "entropy", "margin", "energy")}
    for i in range(logits.shape[0]):
        bone = inside & np.isin(label[i], BONE_CLASSES)
        foreground = inside & (label[i] != 0)
        out["msp"][i] = 1.0 - _mean_where(top2[i, 1], foreground)
        out["entropy"][i] = _mean_where(entropy[i], bone)
        out["margin"][i] = 1.0 - _mean_where(top2[i, 1] - top2[i, 0], bone)
        out["energy"][i] = _mean_where(energy[i], bone)
    return out


def flip_input(pixel_values: Any) -> Any:
    """Mirror a network input ``[B, C, H, W]`` left-right, about the pixel grid's origin.

    Every channel (a 2.5D input's neighbour slices too) is mirrored the same way.

    ``x'[i] = x[(W - i) mod W]`` rather than ``x[W - 1 - i]``: with the network's stride-4
    output grid (centres at input columns 0, 4, 8, ...) this maps output columns onto output
    columns exactly (see :func:`unflip_logits`); a plain flip would be off by 3/4 of an
    output pixel everywhere and the disagreement would be dominated by that shift.
    """
    if isinstance(pixel_values, np.ndarray):
        return np.ascontiguousarray(np.roll(pixel_values[..., ::-1], 1, axis=-1))
    import torch

    return torch.roll(torch.flip(pixel_values, dims=(-1,)), 1, dims=-1).contiguous()


def unflip_logits(logits: np.ndarray) -> np.ndarray:
    """The inverse of :func:`flip_input` on the logits' grid: ``l[j] = l'[(w - j) mod w]``."""
    return np.roll(logits[..., ::-1], 1, axis=-1)


def flip_signals(logits: Any, flipped_logits: Any, inside: np.ndarray) -> dict[str, np.ndarray]:
    """The two-pass candidates: disagreement between a slice and its mirror image.

    Parameters
    ----------
    logits, flipped_logits:
        ``[B, K, h, w]`` of the slice and of :func:`flip_input` of it (not yet unflipped).
    inside:
        ``[h, w]`` pixels inside the scan.
    """
    prob = _softmax(_as_numpy(logits))
    back = _softmax(unflip_logits(_as_numpy(flipped_logits)))
    label, label_back = prob.argmax(axis=1), back.argmax(axis=1)
    l1 = 0.5 * np.abs(prob - back).sum(axis=1)
    change = np.full(prob.shape[0], np.nan)
    dist = np.full(prob.shape[0], np.nan)
    for i in range(prob.shape[0]):
        union = inside & (np.isin(label[i], BONE_CLASSES) | np.isin(label_back[i], BONE_CLASSES))
        change[i] = _mean_where(label[i] != label_back[i], union)
        dist[i] = _mean_where(l1[i], union)
    return {"flip_change": change, "flip_l1": dist}


@dataclass
class UncertaintyTracker:
    """Collects the candidates slice batch by slice batch during :func:`.run_segmentation`.

    Attributes
    ----------
    method:
        One of :data:`UNCERTAINTY_METHODS` (``none``: nothing is computed).
    n_slices:
        Slices of the scan.
    inside:
        ``[h, w]`` logit pixels inside the scan.
    signals:
        Candidate -> per-slice values (NaN: not computed, or no bone in the slice).
    """

    method: str
    n_slices: int
    inside: np.ndarray
    signals: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in UNCERTAINTY_METHODS:
            raise ValueError(f"Unknown uncertainty method {self.method!r}; use one of "
                             f"{', '.join(UNCERTAINTY_METHODS)}")

    def add(self, z0: int, pixel_values: Any, logits: Any, runner: Any) -> None:
        """Score slices ``z0 .. z0 + B - 1`` (``runner`` is called again for ``flip``)."""
        if self.method == "none":
            return
        inside = self.inside
        if inside.shape != tuple(np.shape(logits)[2:]):
            inside = np.ones(np.shape(logits)[2:], dtype=bool)
        found = logit_signals(logits, inside)
        if self.method == "flip":
            found.update(flip_signals(logits, runner(flip_input(pixel_values)), inside))
        for name, values in found.items():
            column = self.signals.setdefault(name, np.full(self.n_slices, np.nan))
            column[z0:z0 + len(values)] = values

    @property
    def per_slice(self) -> np.ndarray | None:
        """The method's own signal per slice (None for ``none``)."""
        if self.method == "none":
            return None
        return self.signals.get(SIGNAL_OF_METHOD[self.method],
                                np.full(self.n_slices, np.nan))
