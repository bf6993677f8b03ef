"""Network logits -> labels on the scan's grid: the reference's labels, computed faster.

The reference (:func:`.preprocessing.logits_to_labels_batch`) upsamples every class's
low-resolution logits (200 x 200) bilinearly to the whole crop (1600 x 1600) and takes the
arg-max there: six 10 MB score maps per slice, most of them air. This module returns the
**same labels, bit for bit**, with less work:

1. **Where the arg-max can only be background, it is not computed.** Bilinear upsampling
   is a convex combination of the 2 x 2 low-resolution neighbours of each output pixel, per
   class. If in all four neighbours the background logit exceeds every other class's by
   more than the rounding error of that combination (:data:`MARGIN_RELATIVE` times the
   slice's largest ``|logit|``, ~100x the worst float32 error), the upsampled background
   score wins too, so the pixel is background. NaN or infinite logits make no pixel
   certain (everything is computed, as in the reference).
2. **The rest is computed in bands** of a few low-resolution rows, each only over the
   columns that hold an uncertain pixel, so the score maps stay in the CPU cache.

Why a band equals the reference (torch): for an integer power-of-two ratio ``k`` between the
crop and the logits (the bundled model: 1600 / 200 = 8), torch's source coordinate
``(d + 0.5) / k - 0.5`` and the weights are exact in float32; upsampling the logits' rows
``s0 .. s1 - 1`` (and columns ``t0 .. t1 - 1``) to ``k`` times their size gives output row
``d - k * s0`` exactly the coordinate, neighbours and weights of row ``d`` of the whole map,
as long as those neighbours lie inside the slice (``s0 <= i0(d)``, ``i1(d) < s1``). The same
kernel must run: torch's generic bilinear kernel (contiguous channels-first input with other
than 3 channels, output height + width above 128; below that torch switches to a separable
kernel whose rounding differs), so each band is widened to more than 128 output pixels and
other cases fall back to the reference. ``Testing/tests/test_segmentation_fast_labels.py``
checks the equality on the bundled geometry and others. Without torch (numpy backend) the
bands come from :func:`._numpy_resize.bilinear_upsample_rows_cols`, which computes any
window with the whole map's weights, for any ratio.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from HRpQCTCore.regions import BACKGROUND
from HRpQCTSegmentationEngine._numpy_resize import bilinear_upsample_rows_cols, linear_weights
from HRpQCTSegmentationEngine.preprocessing import CropBox, logits_to_labels_batch

__all__ = ["MARGIN_RELATIVE", "BAND_LOWRES_ROWS", "uncertain_background",
           "logits_to_labels_fast"]

#: A low-resolution pixel is surely background when its background logit exceeds every
#: other class's by more than this times the slice's largest |logit|. The float32 error of
#: a bilinear combination is below 5 units in the last place (~3e-7 relative): 1e-5 leaves
#: a margin of ~30x, and only pixels at a hair's breadth from a tie are computed needlessly.
MARGIN_RELATIVE = 1e-5
#: Low-resolution rows per band (32 output rows for the bundled model): a band's six score
#: maps (6 x 32 x 1600 float32, 1.2 MB) stay in the cache.
BAND_LOWRES_ROWS = 4
#: torch's generic bilinear kernel runs for outputs whose height + width exceed this.
_TORCH_SEPARABLE_MAX = 128


# ------------------------------------------------------------------------------------------
# Which output pixels can be other than background
# ------------------------------------------------------------------------------------------
def uncertain_background(logits_slice) -> np.ndarray:
    """Low-resolution pixels ``[h, w]`` where background is not surely the arg-max.

    ``logits_slice`` is one slice's ``[C, h, w]`` logits (numpy or a torch tensor on any
    device; the mask is computed there and returned as numpy).
    """
    bg = BACKGROUND.label
    if isinstance(logits_slice, np.ndarray):
        others = np.delete(logits_slice, bg, axis=0).max(axis=0)
        margin = logits_slice[bg] - others
        tolerance = MARGIN_RELATIVE * np.abs(logits_slice).max()
        return ~(margin > tolerance)
    import torch

    others = torch.cat([logits_slice[:bg], logits_slice[bg + 1:]]).amax(dim=0)
    margin = logits_slice[bg] - others
    tolerance = MARGIN_RELATIVE * logits_slice.abs().amax()
    return (~(margin > tolerance)).cpu().numpy()


@lru_cache(maxsize=8)
def _axis_indices(n_low: int, n_crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per crop index along one axis, its two low-resolution neighbours ``(i0, i1)``."""
    i0, i1, _, _ = linear_weights(n_low, n_crop)
    return i0, i1


def _needed_range(uncertain_1d: np.ndarray, i0: np.ndarray, i1: np.ndarray, lo: int,
                  hi: int) -> tuple[int, int] | None:
    """First and past-last crop index in ``[lo, hi)`` with an uncertain neighbour."""
    needed = uncertain_1d[i0[lo:hi]] | uncertain_1d[i1[lo:hi]]
    hits = np.flatnonzero(needed)
    if hits.size == 0:
        return None
    return lo + int(hits[0]), lo + int(hits[-1]) + 1


def _bands(uncertain: np.ndarray, box: CropBox, dst_y: slice, dst_x: slice):
    """Yield ``(rows, cols)`` crop windows covering every pixel that may not be background.

    Rows go in bands of :data:`BAND_LOWRES_ROWS` low-resolution rows; each band's columns
    are the bounding range of its uncertain pixels.
    """
    n_low_y, n_low_x = uncertain.shape
    iy0, iy1 = _axis_indices(n_low_y, box.height)
    ix0, ix1 = _axis_indices(n_low_x, box.width)
    rows_any = uncertain.any(axis=1)
    found = _needed_range(rows_any, iy0, iy1, dst_y.start, dst_y.stop)
    if found is None:
        return
    band_rows = BAND_LOWRES_ROWS * box.height / n_low_y
    start = found[0]
    while start < found[1]:
        stop = min(found[1], start + max(1, round(band_rows)))
        low_rows = slice(int(iy0[start]), int(iy1[stop - 1]) + 1)
        cols = _needed_range(uncertain[low_rows].any(axis=0), ix0, ix1, dst_x.start,
                             dst_x.stop)
        if cols is not None:
            yield slice(start, stop), slice(*cols)
        start = stop


# ------------------------------------------------------------------------------------------
# Scores of one window
# ------------------------------------------------------------------------------------------
def _power_of_two_ratio(n_low: int, n_crop: int) -> int | None:
    """``n_crop / n_low`` if it is an integer power of two (1, 2, 4, ...), else None."""
    if n_crop % n_low:
        return None
    k = n_crop // n_low
    return k if k & (k - 1) == 0 else None


def _grow(lo: int, hi: int, n: int, minimum: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` within ``[0, n)`` to at least ``minimum`` (upwards first)."""
    hi = min(n, max(hi, lo + minimum))
    return max(0, min(lo, hi - minimum)), hi


def _torch_window(one, ratios: tuple[int, int], rows: slice, cols: slice,
                  indices: tuple[np.ndarray, ...]):
    """``interpolate(one, crop, "bilinear")[0, :, rows, cols]`` from a slice of ``one``.

    ``one`` is ``[1, C, h, w]``; ``ratios`` the power-of-two crop/logit ratios per axis.
    """
    import torch

    ky, kx = ratios
    iy0, iy1, ix0, ix1 = indices
    n_low_y, n_low_x = one.shape[-2:]
    s0, s1 = int(iy0[rows.start]), int(iy1[rows.stop - 1]) + 1
    t0, t1 = int(ix0[cols.start]), int(ix1[cols.stop - 1]) + 1
    # Never a one-pixel slice, and wide enough for torch's generic kernel (see the module
    # docstring); the whole map is wider than that, so the loop ends.
    s0, s1 = _grow(s0, s1, n_low_y, 2)
    t0, t1 = _grow(t0, t1, n_low_x, 2)
    while ky * (s1 - s0) + kx * (t1 - t0) <= _TORCH_SEPARABLE_MAX:
        s0, s1 = _grow(s0, s1, n_low_y, s1 - s0 + 1)
        t0, t1 = _grow(t0, t1, n_low_x, t1 - t0 + 1)
    part = one[:, :, s0:s1, t0:t1].contiguous()
    if (ky, kx) != (1, 1):
        part = torch.nn.functional.interpolate(part, size=(ky * (s1 - s0), kx * (t1 - t0)),
                                               mode="bilinear", align_corners=False)
    return part[0, :, rows.start - ky * s0:rows.stop - ky * s0,
                cols.start - kx * t0:cols.stop - kx * t0]


def _numpy_window(logits_slice: np.ndarray, crop_yx: tuple[int, int], rows: slice,
                  cols: slice) -> np.ndarray:
    """The numpy backend's upsampled scores ``[C, rows, cols]`` of one slice."""
    return np.stack([bilinear_upsample_rows_cols(plane, crop_yx, rows, cols)
                     for plane in logits_slice])


def _argmax_uint8(scores):
    """Arg-max over the first axis as uint8, first maximum winning: the reference's
    operations (:func:`.preprocessing._argmax_uint8` and :func:`.logits_to_labels_numpy`),
    so NaN scores give the same labels too."""
    if isinstance(scores, np.ndarray):
        best = scores[0].copy()
        labels = np.zeros(best.shape, dtype=np.uint8)
        for c in range(1, scores.shape[0]):
            labels[scores[c] > best] = c
            np.maximum(best, scores[c], out=best)
        return labels
    import torch

    best = scores[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[0]):
        labels.masked_fill_(scores[c] > best, c)
        torch.maximum(best, scores[c], out=best)
    return labels.cpu().numpy()


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------
def _torch_bands_exact(logits, box: CropBox) -> tuple[int, int] | None:
    """The crop/logit ratios if torch bands reproduce the reference here, else None."""
    import torch

    if logits.dtype != torch.float32 or logits.shape[1] == 3:
        return None  # the reference casts; torch picks another kernel for 3 channels
    if box.height + box.width <= _TORCH_SEPARABLE_MAX or min(logits.shape[-2:]) < 2:
        return None
    ky = _power_of_two_ratio(int(logits.shape[-2]), box.height)
    kx = _power_of_two_ratio(int(logits.shape[-1]), box.width)
    if ky is None or kx is None:
        return None
    one = logits[:1]
    if not one.is_contiguous() or one.is_contiguous(memory_format=torch.channels_last):
        return None  # a channels-last input would run torch's vectorised kernel
    return ky, kx


@contextmanager
def _one_torch_thread(logits) -> Iterator[None]:
    """One torch thread while the bands of CPU logits are computed (restored after).

    A band's operations are small (~0.2 M values): torch's second thread saves little wall
    time on them, and its workers' spin-waits between the ~40 operations per band cost
    more CPU time than the whole step needs on one thread (measured: 0.13-0.26 s against
    0.03 s per slice). The network's own threads are not affected.
    """
    import torch

    if logits.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def logits_to_labels_fast(logits_lowres, box: CropBox,
                          original_shape_yx: tuple[int, int]) -> np.ndarray:
    """Labels ``[n, y, x]`` (uint8) of logits ``[n, C, h, w]``: equal to the reference.

    Parameters
    ----------
    logits_lowres:
        The network's logits: a torch tensor (any device; upsampled there) or a numpy array
        (numpy backend, no torch needed).
    box:
        The crop window of the scan (:func:`.preprocessing.crop_box_for_scan`).
    original_shape_yx:
        The scan's slice shape.

    Returns
    -------
    numpy.ndarray
        The labels :func:`.preprocessing.logits_to_labels_batch` returns for the same input.
    """
    ny, nx = (int(s) for s in original_shape_yx)
    numpy_backend = isinstance(logits_lowres, np.ndarray)
    if numpy_backend:
        logits = np.asarray(logits_lowres, dtype=np.float32)
        ratios = None
    else:
        logits = logits_lowres
        ratios = _torch_bands_exact(logits, box) if logits.ndim == 4 else None
        if ratios is None:
            return logits_to_labels_batch(logits, box, original_shape_yx)
    if logits.ndim != 4:
        raise ValueError(f"Expected logits [n, C, h, w], got shape {tuple(logits.shape)}")
    out = np.full((logits.shape[0], ny, nx), BACKGROUND.label, dtype=np.uint8)
    src_y, src_x, dst_y, dst_x = box.overlap((ny, nx))
    if src_y.stop <= src_y.start or src_x.stop <= src_x.start:
        return out
    if numpy_backend:
        _fill_labels(out, logits, box, dst_y, dst_x, None)
    else:
        with _one_torch_thread(logits):
            _fill_labels(out, logits, box, dst_y, dst_x, ratios)
    return out


def _fill_labels(out: np.ndarray, logits, box: CropBox, dst_y: slice, dst_x: slice,
                 ratios: tuple[int, int] | None) -> None:
    """Write the labels of every band into ``out`` (``ratios`` None: numpy backend)."""
    n_low = tuple(int(s) for s in logits.shape[-2:])
    indices = (*_axis_indices(n_low[0], box.height), *_axis_indices(n_low[1], box.width))
    for i in range(logits.shape[0]):
        one = logits[i:i + 1]
        for rows, cols in _bands(uncertain_background(one[0]), box, dst_y, dst_x):
            if ratios is None:
                scores = _numpy_window(one[0], box.shape, rows, cols)
            else:
                scores = _torch_window(one, ratios, rows, cols, indices)
            out[i, rows.start + box.y0:rows.stop + box.y0,
                cols.start + box.x0:cols.stop + box.x0] = _argmax_uint8(scores)
