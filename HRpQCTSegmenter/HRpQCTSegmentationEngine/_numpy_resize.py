"""Image resampling in numpy that reproduces torch's CPU ``interpolate`` as closely as it can.

For segmenting without torch (ONNX Runtime alone). Two operations are needed:

* the network input: antialiased bicubic downsampling (``mode="bicubic", antialias=True``);
  the weights are torch's exactly, the taps are summed in float32 in order. torch's
  compiled kernel rounds slightly differently (1-2 ulp on some pixels), so this one is
  *close*, not bit-identical (see :func:`.preprocessing.preprocess_slices_numpy`);
* the logits: bilinear upsampling (``align_corners=False``). torch's kernel for
  channels-first float32 computes, per output pixel, ``fma(t0, h0, t1 * h1)`` of the two
  row values ``t_k = fma(x[y_k, x0], w0, x[y_k, x1] * w1)``, with weights computed as
  ``fma(scale, i + 0.5, -0.5)``: the compilers contract these into fused multiply-adds on
  CPUs that have them. A fused multiply-add of float32 numbers is emulated exactly enough in
  float64 (the product is exact there; a double rounding needs a tie within 2^-29), so the
  result is bit-identical to torch's for the bundled model's 200 -> 1600 geometry (checked
  by the tests). torch takes another code path for a few tiny inputs (8 x 8 -> 64 x 64).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["resize_bicubic_antialias", "bilinear_upsample_rows_cols", "linear_weights"]

_F32 = np.float32
_F64 = np.float64


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` of float32 arrays with one rounding (as a hardware FMA)."""
    return (np.asarray(a, _F64) * np.asarray(b, _F64) + np.asarray(c, _F64)).astype(_F32)


# ------------------------------------------------------------------------------------------
# Antialiased bicubic (downsampling the network input)
# ------------------------------------------------------------------------------------------
def _aa_cubic(x: np.ndarray) -> np.ndarray:
    """torch's antialiasing cubic filter (Keys, a = -0.5), in float32."""
    a = _F32(-0.5)
    x = np.abs(x).astype(_F32)
    near = ((a + _F32(2)) * x - (a + _F32(3))) * x * x + _F32(1)
    far = ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(_F32)


def _aa_cubic_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices ``[n_out, taps]`` and normalised weights (zero past each pixel's support).

    The same float32 formulas as torch's ``_compute_indices_min_size_weights_aa``.
    """
    scale = _F32(_F32(n_in) / _F32(n_out))
    support = _F32(2) * scale if scale >= 1 else _F32(2)
    invscale = _F32(1) / scale if scale >= 1 else _F32(1)
    taps = math.ceil(float(support)) * 2 + 1
    centre = scale * (np.arange(n_out, dtype=_F32) + _F32(0.5))
    # int() truncates towards zero, as the C++ cast does
    xmin = np.maximum(np.trunc(centre - support + _F32(0.5)).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(centre + support + _F32(0.5)).astype(np.int64), n_in) - xmin
    j = np.arange(taps)
    index = xmin[:, None] + j[None, :]
    inside = j[None, :] < xsize[:, None]
    weights = _aa_cubic((index.astype(_F32) - centre[:, None] + _F32(0.5)) * invscale)
    weights = np.where(inside, weights, _F32(0))
    total = np.zeros(n_out, dtype=_F32)
    for k in range(taps):  # in order, as torch sums them
        total += weights[:, k]
    nonzero = total != 0
    weights[nonzero] /= total[nonzero, None]
    return np.minimum(index, n_in - 1), weights.astype(_F32)


def _resize_last_axis(image: np.ndarray, n_out: int) -> np.ndarray:
    index, weights = _aa_cubic_weights(image.shape[-1], n_out)
    out = image[..., index[:, 0]] * weights[:, 0]
    for k in range(1, index.shape[1]):
        out += image[..., index[:, k]] * weights[:, k]
    return out


def resize_bicubic_antialias(image: np.ndarray, size_yx: tuple[int, int]) -> np.ndarray:
    """Resize a float32 ``[y, x]`` image like ``interpolate(bicubic, antialias=True)``.

    Columns first, then rows (torch's order); an axis of unchanged size is left alone.
    """
    return _columns_then_rows(image, size_yx, _resize_last_axis)


def _columns_then_rows(image: np.ndarray, size_yx: tuple[int, int], resize_last_axis
                       ) -> np.ndarray:
    """A separable resize in float32: ``resize_last_axis`` along the columns, then the rows;
    an axis of unchanged size is left alone."""
    out = np.asarray(image, dtype=_F32)
    if out.shape[1] != size_yx[1]:
        out = resize_last_axis(out, int(size_yx[1]))
    if out.shape[0] != size_yx[0]:
        out = np.ascontiguousarray(resize_last_axis(out.T, int(size_yx[0])).T)
    return out


# ------------------------------------------------------------------------------------------
# Plain bicubic (enlarging the network input: scans coarser than the model's voxel size)
# ------------------------------------------------------------------------------------------
def _cubic_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices ``[n_out, 4]`` and weights of ``interpolate(bicubic, align_corners=False)``
    without antialiasing: Keys' cubic with a = -0.75, taps clamped at the border (torch's
    ``upsample_bicubic2d``), in float32."""
    a = _F32(-0.75)
    scale = _F32(_F32(n_in) / _F32(n_out))
    real = scale * (np.arange(n_out, dtype=_F32) + _F32(0.5)) - _F32(0.5)
    first = np.floor(real).astype(np.int64)
    t = (real - first.astype(_F32)).astype(_F32)

    def near(x):  # |x| <= 1
        return ((a + _F32(2)) * x - (a + _F32(3))) * x * x + _F32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a

    weights = np.stack([far(t + _F32(1)), near(t), near(_F32(1) - t), far(_F32(2) - t)],
                       axis=1).astype(_F32)
    index = np.clip(first[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index, weights


def _resize_last_axis_cubic(image: np.ndarray, n_out: int) -> np.ndarray:
    index, weights = _cubic_weights(image.shape[-1], n_out)
    out = image[..., index[:, 0]] * weights[:, 0]
    for k in range(1, 4):
        out += image[..., index[:, k]] * weights[:, k]
    return out


def resize_bicubic(image: np.ndarray, size_yx: tuple[int, int]) -> np.ndarray:
    """Resize a float32 ``[y, x]`` image like ``interpolate(bicubic, align_corners=False)``
    without antialiasing (what the preprocessing uses to enlarge a crop).

    Along the columns, then the rows, in float32: torch's kernel does the same arithmetic per
    pixel in another order, so results agree to float32 rounding (~1e-7), not bit for bit.
    """
    return _columns_then_rows(image, size_yx, _resize_last_axis_cubic)


# ------------------------------------------------------------------------------------------
# Bilinear (upsampling the logits)
# ------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, ...]:
    """``(i0, i1, w0, w1)`` per output index, as torch's ``compute_indices_weights_linear``.

    Cached (every slice of a scan, and every band of a slice, uses the same ones), so the
    arrays are read-only.
    """
    scale = np.full(n_out, _F32(n_in) / _F32(n_out), dtype=_F32)
    half = np.arange(n_out, dtype=_F32) + _F32(0.5)
    real = np.maximum(_fma(scale, half, np.full(n_out, -0.5, dtype=_F32)), _F32(0))
    i0 = np.minimum(real.astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = np.clip(real - i0.astype(_F32), _F32(0), _F32(1)).astype(_F32)
    arrays = (i0, i1, (_F32(1) - w1).astype(_F32), w1)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _fma_rows(top: np.ndarray, h0: np.ndarray, bottom_h1: np.ndarray) -> np.ndarray:
    """:func:`_fma` of ``top * h0[:, None] + bottom_h1`` with one float64 buffer instead of
    three (the same operations, so the same bits)."""
    acc = top.astype(_F64)
    acc *= h0.astype(_F64)[:, None]  # exact: a product of two float32 fits a float64
    acc += bottom_h1  # converted exactly to float64, then one rounding
    return acc.astype(_F32)


def bilinear_upsample_rows_cols(plane: np.ndarray, size_yx: tuple[int, int],
                                rows: slice, cols: slice) -> np.ndarray:
    """``interpolate(plane, size_yx, "bilinear", align_corners=False)[rows, cols]``.

    ``plane`` is one float32 ``[h, w]`` channel; only the requested window is computed,
    from the low-resolution rows it needs.
    """
    plane = np.asarray(plane, dtype=_F32)
    y0, y1, h0, h1 = (a[rows] for a in linear_weights(plane.shape[0], int(size_yx[0])))
    x0, x1, w0, w1 = (a[cols] for a in linear_weights(plane.shape[1], int(size_yx[1])))
    if y0.size == 0 or x0.size == 0:
        return np.empty((y0.size, x0.size), dtype=_F32)
    first = int(y0.min())  # the neighbours are monotonic: only rows first..last are used
    needed = plane[first:int(y1.max()) + 1]
    across = _fma(needed[:, x0], w0, needed[:, x1] * w1)  # within each row
    top, bottom = across[y0 - first], across[y1 - first]
    return _fma_rows(top, h0, bottom * h1[:, None])
