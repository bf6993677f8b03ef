"""GLCM coefficients and MCC as pyradiomics computes them, with the same numbers, faster.

pyradiomics' ``RadiomicsGLCM._calculateCoefficients`` builds the sum and difference
distributions ``p_{x+y}`` and ``p_{x-y}`` with one boolean mask over the whole
``Ng x Ng`` matrix per value of ``k`` (``2 Ng - 1`` and ``Ng`` masks: cubic in the number of
grey levels). On full-size HR-pQCT slices this took ~8 % of the whole extraction.

Here each matrix element is put into its ``k`` bin with :func:`numpy.bincount`, which adds
the elements of a bin one after the other in the order given. That is the order of
pyradiomics' ``numpy.sum(P[:, mask, :], 1)`` (a reduction over a non-innermost axis adds
row after row, row-major over ``(i, j)``), so the results are bit-identical (tests check
this against pyradiomics' own method). The other coefficients use pyradiomics' expressions
unchanged. The arrays keep pyradiomics' memory layout, so later reductions over them
add in the same order too.

With a single angle (GLCM weighting, or all other angles empty in a tiny region) the
summed axis is contiguous and numpy switches to pairwise summation, whose rounding
differs; pyradiomics' own method is used then.

The Maximal Correlation Coefficient (:func:`mcc_feature_value`) needs
``Q(i, j) = sum_k p(i, k) p(j, k) / (p_x(i) p_y(k) + eps)``. pyradiomics adds the ``k``
terms one after the other, each as an ``(Nv, Ng, Ng, angles)`` array with the angles
innermost (numpy then works in runs of 4 elements). Here blocks of terms are computed with
the angles outermost and ``j`` innermost: every term is the same multiplication and
division of the same numbers, and they are added to ``Q`` in the same ``k`` order, so ``Q``
and the eigenvalues LAPACK computes from it are identical (~4x faster).

Cluster shade, prominence and tendency raise ``i + j - mu_x - mu_y`` to a power for every
``(i, j, angle)``; ``i + j`` takes only ``2 Ng - 1`` integer values, so
:func:`cluster_feature_value` raises each of those once per angle and spreads the results
over the matrix: the same subtraction and power of the same numbers for every element, then
pyradiomics' product and sum, so the same values.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sum_and_difference_distributions", "calculate_glcm_coefficients", "mcc_q",
           "mcc_feature_value", "cluster_feature_value"]

#: Elements per block of MCC terms (0.5 MB of float64: stays in the CPU cache).
_MCC_BLOCK_ELEMENTS = 2**16


def sum_and_difference_distributions(p_glcm: np.ndarray, gray_levels: np.ndarray,
                                     n_gray: int) -> tuple[np.ndarray, np.ndarray]:
    """``pxAddy`` ``(Nv, 2 Ng - 1, angles)`` and ``pxSuby`` ``(Nv, Ng, angles)``.

    Parameters
    ----------
    p_glcm:
        Normalised GLCMs ``(Nv, n, n, angles)``, rows/columns for the grey levels present.
    gray_levels:
        The ``n`` grey levels present (integers, as pyradiomics' ``grayLevels``).
    n_gray:
        ``Ng``: the highest grey level.
    """
    n_v, n, _, n_angles = p_glcm.shape
    levels = np.asarray(gray_levels).astype(np.int64)
    sum_bin = (levels[:, None] + levels[None, :] - 2).ravel()  # k = i + j, from 2
    diff_bin = np.abs(levels[:, None] - levels[None, :]).ravel()  # k = |i - j|, from 0
    # rows: matrix elements in row-major (i, j) order; columns: (Nv, angle) pairs
    elements = p_glcm.transpose(1, 2, 0, 3).reshape(n * n, n_v * n_angles)
    px_add_y = np.empty((2 * n_gray - 1, n_v * n_angles))
    px_sub_y = np.empty((n_gray, n_v * n_angles))
    for column in range(n_v * n_angles):
        weights = np.ascontiguousarray(elements[:, column])
        px_add_y[:, column] = np.bincount(sum_bin, weights=weights, minlength=2 * n_gray - 1)
        px_sub_y[:, column] = np.bincount(diff_bin, weights=weights, minlength=n_gray)
    # pyradiomics stacks per-k results and transposes: same shape and strides here
    return (px_add_y.reshape(2 * n_gray - 1, n_v, n_angles).transpose(1, 0, 2),
            px_sub_y.reshape(n_gray, n_v, n_angles).transpose(1, 0, 2))


def calculate_glcm_coefficients(glcm) -> None:
    """Fill ``glcm.coefficients`` as ``RadiomicsGLCM._calculateCoefficients`` does.

    ``glcm`` is a ``radiomics.glcm.RadiomicsGLCM`` whose ``P_glcm`` is computed.
    """
    p_glcm = glcm.P_glcm
    if p_glcm.shape[3] == 1:  # numpy would sum pairwise (see the module docstring)
        from radiomics.glcm import RadiomicsGLCM

        RadiomicsGLCM._calculateCoefficients(glcm)
        return
    n_gray = glcm.coefficients["Ng"]
    eps = np.spacing(1)
    levels = glcm.coefficients["grayLevels"].astype("float")
    i, j = np.meshgrid(levels, levels, indexing="ij", sparse=True)
    px = p_glcm.sum(2, keepdims=True)
    py = p_glcm.sum(1, keepdims=True)
    ux = np.sum(i[None, :, :, None] * p_glcm, (1, 2), keepdims=True)
    uy = np.sum(j[None, :, :, None] * p_glcm, (1, 2), keepdims=True)
    px_add_y, px_sub_y = sum_and_difference_distributions(
        p_glcm, glcm.coefficients["grayLevels"], n_gray)
    hxy = (-1) * np.sum((p_glcm * np.log2(p_glcm + eps)), (1, 2))
    glcm.coefficients.update({
        "eps": eps,
        "i": i,
        "j": j,
        "kValuesSum": np.arange(2, (n_gray * 2) + 1, dtype="float"),
        "kValuesDiff": np.arange(0, n_gray, dtype="float"),
        "px": px,
        "py": py,
        "ux": ux,
        "uy": uy,
        "pxAddy": px_add_y,
        "pxSuby": px_sub_y,
        "HXY": hxy,
    })


def mcc_q(p_glcm: np.ndarray, px: np.ndarray, py: np.ndarray, eps: float) -> np.ndarray:
    """pyradiomics' MCC matrix ``Q``, already in the ``(Nv, angles, i, j)`` order it uses.

    Parameters
    ----------
    p_glcm:
        Normalised GLCMs ``(Nv, n, n, angles)``.
    px, py:
        Marginals as in pyradiomics' coefficients: ``(Nv, n, 1, angles)`` and
        ``(Nv, 1, n, angles)``.
    eps:
        pyradiomics' ``eps`` (``numpy.spacing(1)``).
    """
    n_v, n, _, n_angles = p_glcm.shape
    p_k = np.ascontiguousarray(p_glcm.transpose(2, 0, 3, 1))  # [k, v, d, i] = P[v, i, k, d]
    px_i = px[:, :, 0, :].transpose(0, 2, 1)  # [v, d, i]
    py_k = py[:, 0].transpose(1, 0, 2)  # [k, v, d]
    denominator = px_i[None] * py_k[:, :, :, None] + eps  # [k, v, d, i]: px(i) py(k) + eps
    step = max(1, _MCC_BLOCK_ELEMENTS // max(1, n_v * n_angles * n * n))
    q = None
    for start in range(0, n, step):
        block = slice(start, start + step)
        terms = p_k[block, :, :, :, None] * p_k[block, :, :, None, :]  # [k, v, d, i, j]
        terms /= denominator[block, :, :, :, None]
        for term in terms:  # k in ascending order, as pyradiomics adds them
            if q is None:
                q = term.copy()
            else:
                q += term
    if q is None:  # no grey level at all (empty GLCM): pyradiomics' shape
        q = np.zeros((n_v, n_angles, n, n))
    return q


def mcc_feature_value(glcm) -> np.ndarray | int:
    """``RadiomicsGLCM.getMCCFeatureValue`` with ``Q`` from :func:`mcc_q` (same values)."""
    coefficients = glcm.coefficients
    q = mcc_q(glcm.P_glcm, coefficients["px"], coefficients["py"], coefficients["eps"])
    # from here on pyradiomics' own steps
    eigenvalues = np.linalg.eigvals(q)
    eigenvalues.sort()  # along the last axis, low to high
    if eigenvalues.shape[2] < 2:
        return 1  # flat region
    mcc = np.sqrt(eigenvalues[:, :, -2])  # second largest eigenvalue
    return np.nanmean(mcc, 1).real


def cluster_feature_value(glcm, power: int) -> np.ndarray:
    """pyradiomics' cluster tendency (2), shade (3) or prominence (4) of ``glcm``.

    ``numpy.nanmean(sum(P * (i + j - ux - uy) ** power, (1, 2)), 1)`` as in
    ``RadiomicsGLCM``, with the power taken once per distinct ``i + j`` (grey levels are
    integers) and gathered into the ``(1, Ng, Ng, angles)`` array pyradiomics builds.
    """
    coefficients = glcm.coefficients
    level_sum = coefficients["i"] + coefficients["j"]
    ux, uy = coefficients["ux"], coefficients["uy"]
    lowest = level_sum.min() if level_sum.size else 0.0
    index = level_sum - lowest
    if (level_sum.ndim != 2 or ux.ndim != 4 or ux.shape[:3] != (1, 1, 1)
            or not np.array_equal(index, np.round(index))):
        # another layout or non-integer levels: pyradiomics' own expression
        terms = (level_sum[None, :, :, None] - ux - uy) ** power
    else:
        index = index.astype(np.intp)
        sums = lowest + np.arange(int(index.max()) + 1 if index.size else 0, dtype=np.float64)
        per_sum = (sums[None, :, None, None].astype(level_sum.dtype) - ux - uy) ** power
        terms = per_sum[0, index, 0, :][None]
    return np.nanmean(np.sum(glcm.P_glcm * terms, (1, 2)), 1)
