"""GLCM coefficients as pyradiomics computes them, with the same numbers, faster.

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
"""

from __future__ import annotations

import numpy as np

__all__ = ["sum_and_difference_distributions", "calculate_glcm_coefficients"]


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
