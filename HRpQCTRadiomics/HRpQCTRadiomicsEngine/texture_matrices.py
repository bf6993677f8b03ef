"""GLRLM, GLDM and NGTDM of all regions of a 2D image at once, equal to pyradiomics' C code.

pyradiomics computes each texture matrix per region in C, walking the region's whole
bounding box voxel by voxel (the seven HR-pQCT regions' boxes cover ~3x the leg, as the
soft-tissue annuli enclose the bones). Here the matrices of every region of one filtered
image come from one vectorised pass over the image, with the region's grey levels in their
own voxels (:class:`ImageTextures`). The results are the matrices pyradiomics' C functions
return for each region, with the rows of absent grey levels already removed (as
pyradiomics' ``_calculateMatrix`` removes them next):

* **GLRLM** counts runs; along each direction the image is re-read so that every line is
  contiguous (strided views of a zero-padded copy), runs are maximal blocks of one region's
  grey level, and counts are integers, so any order gives the same matrix. pyradiomics also
  clears run length 1 of an angle where no line of the box holds two region voxels
  (``multiElement``); that is checked per region.
* **GLDM** counts, per voxel, the neighbours of the same region within ``gldm_a`` grey
  levels: integers again.
* **NGTDM** sums ``|i - mean of the neighbours|`` per grey level. The neighbour sums and
  counts are integers (exact in float64), the difference is the same division and
  subtraction as in C, and :func:`numpy.bincount` adds the differences one after the other
  in raster order, which is the order in which the C loop adds them: bit-identical.

Neighbours are those of pyradiomics' own angle lists (``cMatrices.generate_angles`` with
the region's box size). Only the in-plane case is handled here (a 2D image, or a one-slice
volume with ``force2D`` along the slice axis, as both presets extract slices); anything
else (3D, weighting, voxel-based) returns None and pyradiomics' C code is used.
Tests compare every matrix with pyradiomics' own ``_calculateMatrix``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ImageTextures", "region_levels", "angles_for", "digitize"]


def region_levels(values: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """Grey levels of a region's voxel values, as pyradiomics' ``binImage`` assigns them."""
    from radiomics import imageoperations

    if settings.get("binCount") is None and values.size:
        # getBinEdges with a bin width uses only the extremes (see feature_classes.bin_image)
        extremes = np.array([values.min(), values.max()], dtype=values.dtype)
        edges = imageoperations.getBinEdges(extremes, **settings)
    else:
        edges = imageoperations.getBinEdges(values, **settings)
    return digitize(values, edges)


#: Rounds of :func:`digitize`'s correction before it hands over to ``numpy.digitize``
#: (the arithmetic guess is off by at most one bin for evenly spaced edges).
_DIGITIZE_ROUNDS = 4


def digitize(values: np.ndarray, edges: Any) -> np.ndarray:
    """``numpy.digitize(values, edges)`` for increasing, evenly spaced edges, without a search.

    pyradiomics' bin edges are evenly spaced, so a value's bin is guessed by arithmetic and
    then checked against the edges themselves, in the dtype ``numpy.digitize`` compares in:
    a guess is moved until ``edges[k - 1] <= value < edges[k]``, which is the one index
    ``numpy.digitize`` returns, so the result is identical (~3x faster than its binary
    search on a region's voxels). Non-increasing edges, non-finite values and guesses not
    settled within a few rounds (edges far from even) go to ``numpy.digitize`` itself.
    """
    common = np.result_type(values.dtype, np.asarray(edges).dtype)
    edges = np.asarray(edges, dtype=common)
    if (values.size == 0 or edges.size < 2 or not np.all(np.diff(edges) > 0)
            or not np.isfinite(values.min()) or not np.isfinite(values.max())):
        return np.digitize(values, edges)
    v = values.astype(common, copy=False)
    width = float(edges[1]) - float(edges[0])
    guess = np.floor((v - edges[0]) * (1.0 / width)).astype(np.intp) + 1
    np.clip(guess, 0, edges.size, out=guess)
    # bounds[k] <= value < bounds[k + 1] is bin k (0: below the first edge; n: from the last)
    bounds = np.empty(edges.size + 2, dtype=common)
    bounds[0], bounds[-1] = _extremes(common)
    bounds[1:-1] = edges
    for _ in range(_DIGITIZE_ROUNDS):
        below = v < bounds[guess]
        above = v >= bounds[guess + 1]
        if not (below.any() or above.any()):
            return guess
        guess -= below
        guess += above
        np.clip(guess, 0, edges.size, out=guess)  # (an integer type's largest value: unsettled)
    return np.digitize(values, edges)


def _extremes(dtype: np.dtype) -> tuple[Any, Any]:
    """Sentinels below and above every value of ``dtype`` (its limits for integer types)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return info.min, info.max
    return -np.inf, np.inf


def line_index(ys: np.ndarray, xs: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Which line of direction (dy, dx) each pixel ``(ys, xs)`` lies on, counted from 0.

    Directions as the GLRLM walks them: ``(0, 1)``, ``(1, 0)``, ``(1, 1)`` or ``(1, -1)``.
    """
    line = {(0, 1): ys, (1, 0): xs, (1, 1): xs - ys, (1, -1): xs + ys}[(dy, dx)]
    return line - line.min()


def has_two_on_a_line(ys: np.ndarray, xs: np.ndarray, dy: int, dx: int) -> bool:
    """pyradiomics' ``multiElement``: a line of direction (dy, dx) holds two of the pixels."""
    return bool(np.bincount(line_index(ys, xs, dy, dx)).max() >= 2)


def angles_for(size: Sequence[int], settings: Mapping[str, Any], bidirectional: bool,
               distances: bool = True) -> np.ndarray:
    """pyradiomics' angles for a region box of ``size`` (array order), as its C code builds them."""
    from radiomics import _cmatrices

    dist = np.array(settings.get("distances", [1])) if distances else np.array([1])
    return _cmatrices.generate_angles(np.asarray(size), dist, bidirectional,
                                      bool(settings.get("force2D", False)),
                                      int(settings.get("force2Ddimension", 0)))


def _in_plane(shape: Sequence[int], settings: Mapping[str, Any]) -> bool:
    """Whether pyradiomics' angles for this image lie in the (y, x) plane only."""
    force2d = bool(settings.get("force2D", False))
    if len(shape) == 3:
        return shape[0] == 1 and force2d and int(settings.get("force2Ddimension", 0)) == 0
    return len(shape) == 2 and not force2d


def _shifted(padded: np.ndarray, pad: int, dy: int, dx: int, shape: tuple[int, int]) -> np.ndarray:
    """View of ``padded`` such that element (y, x) is the original's (y + dy, x + dx)."""
    h, w = shape
    return padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _run_sequences(codes: np.ndarray, step: int) -> np.ndarray:
    """The lines of direction ``step`` (in the flat index of ``codes``), one after the other.

    ``codes`` has a zero last column, so a line never continues across the image border:
    reading the flat array with stride ``step`` (as rows of a transposed reshape) visits every
    line of that direction in order, lines separated by zeros.
    """
    flat = codes.ravel()
    if step == 1:
        return flat
    n_rows = -(-flat.size // step)
    padded = np.zeros((n_rows + 1) * step, dtype=flat.dtype)  # + one zero row: separators
    padded[:flat.size] = flat
    return np.ascontiguousarray(padded.reshape(n_rows + 1, step).T).ravel()


def _runs(sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and lengths of the maximal runs of equal non-zero values of ``sequence``."""
    inside = sequence != 0
    change = np.empty(sequence.size + 1, dtype=bool)
    change[0] = change[-1] = True
    np.not_equal(sequence[1:], sequence[:-1], out=change[1:-1])
    starts = np.flatnonzero(inside & change[:-1])
    ends = np.flatnonzero(inside & change[1:])
    return sequence[starts], ends - starts + 1


class ImageTextures:
    """Texture matrices of several regions of one (filtered) 2D image, computed together.

    Parameters
    ----------
    image:
        The filtered image (array order; 2D, or a one-slice volume).
    regions:
        Region label -> (flat indices of its voxels in ``image``, in raster order; size of
        its bounding box in array order, as pyradiomics crops it). Each region non-empty.
    settings:
        pyradiomics settings of this image (bin width, ``force2D``, ``distances``,
        ``gldm_a``), shared by all regions.
    """

    def __init__(self, image: np.ndarray, regions: Mapping[int, tuple[np.ndarray, tuple]],
                 settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.labels = [int(x) for x in regions]
        self.supported = (_in_plane(image.shape, settings)
                          and not settings.get("voxelBased", False))
        self._inputs: tuple[np.ndarray, Mapping] | None = (image, regions)
        self._cache: dict[Any, Any] = {}

    def covers(self, label: int) -> bool:
        """Whether this object computes ``label``'s matrices (else: pyradiomics' C code)."""
        return self.supported and label in self.labels

    def _prepare(self) -> None:
        """Grey levels of every region in one frame (on first use: prediction mode may not)."""
        if self._inputs is None:
            return
        image, regions = self._inputs
        self._inputs = None
        self.shape = image.shape[-2:]
        values = image.reshape(-1)
        n = values.size
        # small integer types: these arrays are read once per neighbour direction
        self.region = np.zeros(n, dtype=np.uint8)  # 1-based position in self.labels
        self.level = np.zeros(n, dtype=np.int32)
        self.code = np.zeros(n, dtype=np.int32)  # unique per (region, present level)
        self.levels: dict[int, np.ndarray] = {}
        self.present: dict[int, np.ndarray] = {}
        self.base: dict[int, int] = {}
        self.box_size: dict[int, tuple[int, ...]] = {}
        next_code = 1
        for position, label in enumerate(self.labels, start=1):
            inside, box_size = regions[label]
            levels = region_levels(values[inside], self.settings)
            present = np.flatnonzero(np.bincount(levels))
            rank = np.zeros(present[-1] + 1, dtype=np.int64)
            rank[present] = np.arange(present.size)
            self.region[inside] = position
            self.level[inside] = levels
            self.code[inside] = rank[levels] + next_code
            self.levels[label] = levels
            self.present[label] = present
            self.base[label] = next_code
            next_code += present.size
            self.box_size[label] = tuple(box_size)
        max_level = max(int(levels.max()) for levels in self.levels.values())
        if next_code >= 2**31 or max_level >= 2**24:
            # the int32 frames (and neighbour sums) could overflow: pyradiomics' C code
            # computes the matrices instead (the levels above stay valid for binning)
            self.supported = False
        self.region = self.region.reshape(self.shape)
        self.level = self.level.reshape(self.shape)
        self.code = self.code.reshape(self.shape)
        self.n_codes = next_code

    def gray_levels(self, label: int) -> np.ndarray:
        """The grey levels present in ``label`` (pyradiomics' ``grayLevels``)."""
        self._prepare()
        return self.present[label]

    def region_levels(self, label: int) -> np.ndarray:
        """``label``'s grey level of each of its voxels, in raster order (``binImage``'s)."""
        self._prepare()
        return self.levels[label]

    # --- helpers ------------------------------------------------------------------------

    def _angles(self, label: int, bidirectional: bool, distances: bool = True) -> np.ndarray:
        """pyradiomics' in-plane angles ``(dy, dx)`` for ``label``'s box."""
        self._prepare()
        return angles_for(self.box_size[label], self.settings, bidirectional, distances)[:, -2:]

    def _rows(self, label: int) -> slice:
        base = self.base[label]
        return slice(base, base + self.present[label].size)

    # --- neighbourhoods (GLDM, NGTDM) -------------------------------------------------

    def _neighbour_tables(self, angles: np.ndarray) -> dict[str, np.ndarray]:
        """GLDM counts ``[code, dependence]`` and NGTDM ``n_i``, ``s_i`` per code, at once.

        Only these small tables are kept (all images of a slice are held until its last region
        is done); the per-voxel neighbourhood arrays are dropped.
        """
        key = ("neighbours", angles.tobytes())
        if key not in self._cache:
            count, total, dependent = self._neighbourhood(angles)
            inside = np.flatnonzero(self.region)  # raster order, as pyradiomics' C loops
            codes = self.code.ravel()[inside].astype(np.int64)
            count, total = count.ravel()[inside], total.ravel()[inside]
            width = 2 * len(angles) + 1
            gldm = np.bincount(codes * width + dependent.ravel()[inside],
                               minlength=self.n_codes * width)
            level = self.level.ravel()[inside].astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                # C: diff = (double)image[i] - (sum / count), 0 without neighbours, then |.|
                diff = np.abs(level - total.astype(np.float64) / count.astype(np.float64))
            diff[count == 0] = 0.0
            self._cache[key] = {
                "gldm": gldm.reshape(self.n_codes, width).astype(np.float64),
                "n_i": np.bincount(codes, minlength=self.n_codes).astype(np.float64),
                # bincount adds the weights one after the other, in the order given
                "s_i": np.bincount(codes, weights=diff, minlength=self.n_codes),
            }
        return self._cache[key]

    def _neighbourhood(self, angles: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per voxel: neighbours in the same region, their level sum, and GLDM dependences."""
        pad = int(np.abs(angles).max())
        region_p = np.pad(self.region, pad)
        level_p = np.pad(self.level, pad)
        code_p = np.pad(self.code, pad)
        alpha = self.settings.get("gldm_a", 0)
        count = np.zeros(self.shape, dtype=np.uint8)
        total = np.zeros(self.shape, dtype=np.int32)
        dependent = np.zeros(self.shape, dtype=np.uint8)
        for dy, dx in angles:
            same = _shifted(region_p, pad, dy, dx, self.shape) == self.region
            neighbour = _shifted(level_p, pad, dy, dx, self.shape)
            count += same
            total += neighbour * same
            if alpha == 0:  # same code: same region and grey level (read inside only)
                dependent += _shifted(code_p, pad, dy, dx, self.shape) == self.code
            else:
                dependent += same & (np.abs(self.level - neighbour) <= alpha)
        return count, total, dependent

    def gldm(self, label: int) -> np.ndarray:
        """``calculate_gldm`` of ``label`` with absent grey levels removed: ``(1, n, 2 Na + 1)``."""
        angles = self._angles(label, bidirectional=True)
        return self._neighbour_tables(angles)["gldm"][None, self._rows(label)].copy()

    def ngtdm(self, label: int) -> np.ndarray:
        """``calculate_ngtdm`` of ``label`` with absent grey levels removed: ``(1, n, 3)``."""
        tables = self._neighbour_tables(self._angles(label, bidirectional=True))
        rows = self._rows(label)
        out = np.empty((1, rows.stop - rows.start, 3))
        out[0, :, 0] = tables["n_i"][rows]
        out[0, :, 1] = tables["s_i"][rows]
        out[0, :, 2] = self.present[label]
        return out

    # --- GLRLM ----------------------------------------------------------------------------

    def _run_histogram(self, label: int, dy: int, dx: int) -> np.ndarray:
        """Runs of direction (dy, dx) of ``label``: counts ``[level, length - 1]``, Nr columns.

        All regions' runs are found together; each region's part is kept until it is used
        (once per image), not the whole ``codes x image side`` histogram.
        """
        key = ("runs", dy, dx)
        parts = self._cache.get(key)
        if parts is None or label not in parts:
            h, w = self.shape
            codes = np.zeros((h, w + 1), dtype=np.int32)  # zero column: lines end at the border
            codes[:, :w] = self.code
            step = abs(dy * (w + 1) + dx)
            run_codes, lengths = _runs(_run_sequences(codes, step))
            n_r = max(h, w)
            counts = np.bincount(run_codes.astype(np.int64) * n_r + lengths - 1,
                                 minlength=self.n_codes * n_r).reshape(self.n_codes, n_r)
            parts = self._cache[key] = {
                other: counts[self._rows(other), :max(self.box_size[other])].copy()
                for other in self.labels}
        return parts.pop(label)

    def _has_two_on_a_line(self, label: int, dy: int, dx: int) -> bool:
        """pyradiomics' ``multiElement``: a line of this direction holds two region voxels."""
        ys, xs = np.nonzero(self.region == self.labels.index(label) + 1)
        return has_two_on_a_line(ys, xs, dy, dx)

    def glrlm(self, label: int) -> np.ndarray:
        """``calculate_glrlm`` of ``label`` with absent grey levels removed: ``(1, n, Nr, Na)``.

        ``Nr`` is the longest side of the region's box, as in pyradiomics.
        """
        angles = self._angles(label, bidirectional=False, distances=False)
        n_r = max(self.box_size[label])
        rows = self._rows(label)
        out = np.empty((1, rows.stop - rows.start, n_r, len(angles)))
        for a, (dy, dx) in enumerate(angles):
            if dy < 0 or (dy == 0 and dx < 0):  # the same runs, walked the other way
                dy, dx = -dy, -dx
            counts = self._run_histogram(label, int(dy), int(dx))
            out[0, :, :, a] = counts
            if not counts[:, 1:].any() and not self._has_two_on_a_line(label, int(dy), int(dx)):
                out[0, :, 0, a] = 0  # pyradiomics: the region is "2D" for this angle
        return out
