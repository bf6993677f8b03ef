"""The 2D mesh perimeter and surface of pyradiomics' ``shape2D``, without its diameter.

pyradiomics' ``cShape.calculate_coefficients2D`` walks the (zero-padded) mask with marching
squares: every 2 x 2 cell whose corners are partly inside the region contributes one line
(two for the saddle cells) between midpoints of its edges; the perimeter is the sum of the
lines' lengths and the surface half the sum of their cross products. The same call then
compares every pair of mesh vertices for the maximum diameter, which is quadratic in the
boundary length: ~65 ms for an HR-pQCT soft-tissue annulus, most of a classifier's shape
cost when the diameter is not asked for.

Here the cells are classified with array operations, each line's end points are computed
as C computes them (``(index + midpoint offset) * spacing``), and the contributions are
added one after the other (:func:`numpy.cumsum`) in C's order: cells in raster order, the
lines of a cell in table order. Same numbers, same order: the same perimeter and surface.
The diameter still comes from pyradiomics (:class:`.feature_classes._LazyMeshShape2D`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mesh_perimeter_surface"]

#: Edge midpoints of a cell, (y, x) offsets from its upper-left corner: top, right, bottom,
#: left edge.
_MIDPOINTS = np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 0.5], [0.5, 0.0]])

#: Per cell case (bit k set: corner k inside; corners clockwise from the upper left), the
#: edges joined by its first and second line (-1: none). Cases 5 and 10 are the saddles.
_FIRST_LINE = np.array([[-1, -1], [3, 0], [0, 1], [3, 1], [1, 2], [1, 2], [0, 2], [3, 2],
                        [2, 3], [2, 0], [0, 1], [2, 1], [1, 3], [1, 0], [0, 3], [-1, -1]])
_SECOND_LINE = {5: (3, 0), 10: (2, 3)}


def _cell_cases(mask: np.ndarray) -> np.ndarray:
    """Marching-squares case of every 2 x 2 cell of ``mask`` (bool, 2D)."""
    m = mask.astype(np.uint8)
    return (m[:-1, :-1] | (m[:-1, 1:] << 1) | (m[1:, 1:] << 2) | (m[1:, :-1] << 3))


def _line_terms(iy: np.ndarray, ix: np.ndarray, edges: np.ndarray, spacing: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cross product and length of the lines joining ``edges[:, 0]`` to ``edges[:, 1]``."""
    a = [(iy + _MIDPOINTS[edges[:, 0], 0]) * spacing[0],
         (ix + _MIDPOINTS[edges[:, 0], 1]) * spacing[1]]
    b = [(iy + _MIDPOINTS[edges[:, 1], 0]) * spacing[0],
         (ix + _MIDPOINTS[edges[:, 1], 1]) * spacing[1]]
    cross = a[0] * b[1] - b[0] * a[1]
    dy, dx = a[0] - b[0], a[1] - b[1]
    return cross, np.sqrt(dy * dy + dx * dx)


def _sequential_sum(values: np.ndarray) -> float:
    """``values`` added one after the other from 0, as a C loop does (not pairwise)."""
    return float(np.cumsum(values)[-1]) if values.size else 0.0


def mesh_perimeter_surface(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Perimeter and surface of ``calculate_coefficients2D(mask, spacing)`` (same values).

    Parameters
    ----------
    mask:
        The region's 2D mask, zero-padded by one pixel (as ``shape2D`` pads it).
    spacing:
        Pixel spacing in array order ``(y, x)``.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    cases = _cell_cases(np.asarray(mask) != 0)
    flat = cases.ravel()
    cells = np.flatnonzero((flat != 0) & (flat != 15))  # raster order, as C visits them
    iy, ix = np.divmod(cells, cases.shape[1])
    iy, ix = iy.astype(np.float64), ix.astype(np.float64)
    case = flat[cells]
    cross, length = _line_terms(iy, ix, _FIRST_LINE[case], spacing)
    saddle = np.flatnonzero((case == 5) | (case == 10))
    if saddle.size:
        # a saddle cell's second line follows its first: insert it right after
        second = np.array([_SECOND_LINE[int(c)] for c in case[saddle]])
        cross2, length2 = _line_terms(iy[saddle], ix[saddle], second, spacing)
        cross = np.insert(cross, saddle + 1, cross2)
        length = np.insert(length, saddle + 1, length2)
    return _sequential_sum(length), _sequential_sum(cross) / 2
