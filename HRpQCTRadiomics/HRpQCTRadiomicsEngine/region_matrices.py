"""Texture matrices of one region from its own voxels, equal to pyradiomics' C code.

pyradiomics' C functions walk the region's whole bounding box, voxel by voxel and angle by
angle. The soft-tissue regions of an HR-pQCT slice are thin annuli whose box is most of the
leg: skin holds ~2 % of its box. Here only the region's voxels are visited: their flat
indices in a zero-padded copy of the box's grey levels, shifted by each angle, give the
neighbours' levels (0: outside the region) in one gather per angle.

* **GLCM** counts, per angle, the pairs (voxel, voxel + angle) of region voxels by their grey
  levels: integer counts (exact in float64, any order gives the same matrix), laid out as
  the C function returns them (``(1, Ng, Ng, angles)``, every level ``1..Ng``).
* **GLSZM** from the connected components of the graph of equal-level neighbour pairs, and
  **GLRLM** from run starts and ends (a voxel whose neighbour behind or ahead has another
  level), paired along each line: integer counts, the C function's matrices.
* **GLDM** and **NGTDM** as :mod:`.texture_matrices` computes them for a whole image (the
  same neighbour counts, level sums and divisions, and NGTDM's differences added one after
  the other in raster order, the order of the C loop): bit-identical.

Angles are pyradiomics' own (``cMatrices.generate_angles`` for the region's box). Only the
in-plane case (a 2D image, or a one-slice volume with ``force2D`` along the slice axis) and
segment-based extraction are handled; anything else returns None and pyradiomics' C code runs.
Tests compare every matrix with pyradiomics' ``_calculateMatrix``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from HRpQCTRadiomicsEngine.texture_matrices import (
    _in_plane,
    angles_for,
    has_two_on_a_line,
    line_index,
    region_levels,
)

__all__ = ["RegionTextures"]

#: Above this many GLCM cells per angle, the C code is used (the dense count tables would
#: need as much memory as pyradiomics' own matrix, several times over).
_MAX_GLCM_CELLS = 2**22

#: Above this fraction of its box, a region's GLRLM comes from the C code: its one pass over
#: the box beats the sorting of run starts and ends (measured on a 1600 x 1600 phantom
#: slice: skin, 10 % of its box, 13 vs 27 ms; adipose, 44 %, 56 vs 25 ms).
_GLRLM_MAX_OCCUPANCY = 0.2


class RegionTextures:
    """Texture matrices of one region of one filtered image, from the region's voxels only.

    Offers the interface :class:`.feature_classes` expects of an image's shared matrices
    (``covers``, ``gray_levels``, ``region_levels``, ``glcm``, ``gldm``, ``ngtdm``,
    ``glrlm``); a method returning None means pyradiomics' C code computes that matrix.

    Parameters
    ----------
    values:
        The filtered image's values at the region's voxels, in raster order.
    coordinates:
        In-plane ``(y, x)`` indices of those voxels in the region's box (``numpy.nonzero``).
    box_size:
        Size of the region's box in array order (as pyradiomics crops it).
    label:
        The region's label.
    settings:
        pyradiomics settings of this image (bin width, ``force2D``, ``distances``, ``gldm_a``).
    """

    def __init__(self, values: np.ndarray, coordinates: tuple[np.ndarray, np.ndarray],
                 box_size: tuple[int, ...], label: int, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.label = int(label)
        self.box_size = tuple(int(n) for n in box_size)
        self.supported = (_in_plane(self.box_size, settings)
                          and not settings.get("voxelBased", False))
        self._inputs: tuple[np.ndarray, tuple] | None = (values, coordinates)
        self._cache: dict[Any, Any] = {}

    def covers(self, label: int) -> bool:
        """Whether this object holds ``label``'s grey levels (else: pyradiomics' own)."""
        return self.supported and label == self.label

    def _prepare(self) -> None:
        """Grey levels, and flat indices of the region's voxels in a zero-padded level frame."""
        if self._inputs is None:
            return
        values, (ys, xs) = self._inputs
        self._inputs = None
        self._coordinates = (np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64))
        self.levels = region_levels(values, self.settings).astype(np.int32)
        self.present = np.flatnonzero(np.bincount(self.levels))
        self.n_levels = int(self.present[-1])
        self.pad = max(1, int(np.max(np.abs(angles_for(self.box_size, self.settings, True)))))
        self.width = self.box_size[-1] + 2 * self.pad
        self.index = (ys + self.pad) * self.width + xs + self.pad
        # int32 levels (a region's levels fit: pyradiomics' own matrices would not fit first)
        self.frame = np.zeros((self.box_size[-2] + 2 * self.pad) * self.width, dtype=np.int32)
        self.frame[self.index] = self.levels

    def gray_levels(self, label: int) -> np.ndarray:
        """The grey levels present in the region (pyradiomics' ``grayLevels``)."""
        self._prepare()
        return self.present

    def region_levels(self, label: int) -> np.ndarray:
        """The region's grey level of each of its voxels, in raster order (``binImage``'s)."""
        self._prepare()
        return self.levels

    def _angles(self, bidirectional: bool, distances: bool = True) -> np.ndarray:
        return angles_for(self.box_size, self.settings, bidirectional, distances)[:, -2:]

    def _neighbours(self, dy: int, dx: int) -> np.ndarray:
        """Grey level of each region voxel's neighbour at (dy, dx); 0 outside the region.

        Kept per angle: GLCM's angles are half of GLDM's and NGTDM's, and classes of the same
        image and region share this object.
        """
        key = ("neighbours", int(dy), int(dx))
        if key not in self._cache:
            self._cache[key] = self.frame[self.index + (int(dy) * self.width + int(dx))]
        return self._cache[key]

    def glcm(self, label: int) -> np.ndarray | None:
        """``calculate_glcm``'s matrix: ``(1, Ng, Ng, angles)`` pair counts, as float64."""
        self._prepare()
        n = self.n_levels
        if n * (n + 1) > _MAX_GLCM_CELLS:
            return None
        angles = self._angles(bidirectional=False)
        out = np.empty((1, n, n, len(angles)))
        # column 0 of each row collects the pairs whose neighbour is outside the region
        first = (self.levels - 1) * (n + 1)
        for a, (dy, dx) in enumerate(angles):
            counts = np.bincount(first + self._neighbours(dy, dx), minlength=n * (n + 1))
            out[0, :, :, a] = counts.reshape(n, n + 1)[:, 1:]
        return out

    def gldm(self, label: int) -> np.ndarray:
        """``calculate_gldm`` with absent grey levels removed: ``(1, n, 2 Na + 1)``."""
        if "gldm" not in self._cache:
            self._prepare()
            angles = self._angles(bidirectional=True)
            alpha = self.settings.get("gldm_a", 0)
            dependent = np.zeros(self.levels.size, dtype=np.int32)
            for dy, dx in angles:
                neighbour = self._neighbours(dy, dx)
                if alpha == 0:  # same level implies inside the region (levels start at 1)
                    dependent += neighbour == self.levels
                else:
                    dependent += (neighbour > 0) & (np.abs(self.levels - neighbour) <= alpha)
            width = 2 * len(angles) + 1
            size = self.n_levels + 1
            counts = np.bincount(self.levels.astype(np.int64) * width + dependent,
                                 minlength=size * width)
            self._cache["gldm"] = counts.reshape(size, width).astype(np.float64)
        return self._cache["gldm"][None, self.present].copy()

    def ngtdm(self, label: int) -> np.ndarray:
        """``calculate_ngtdm`` with absent grey levels removed: ``(1, n, 3)``."""
        self._prepare()
        count = np.zeros(self.levels.size, dtype=np.int32)
        total = np.zeros(self.levels.size, dtype=np.int64)
        for dy, dx in self._angles(bidirectional=True):
            neighbour = self._neighbours(dy, dx)
            count += neighbour > 0
            total += neighbour
        with np.errstate(invalid="ignore", divide="ignore"):
            # C: diff = (double)image[i] - (sum / count), 0 without neighbours, then |.|
            diff = np.abs(self.levels.astype(np.float64)
                          - total.astype(np.float64) / count.astype(np.float64))
        diff[count == 0] = 0.0
        size = self.n_levels + 1
        out = np.empty((1, self.present.size, 3))
        out[0, :, 0] = np.bincount(self.levels, minlength=size)[self.present]
        # bincount adds the weights one after the other, in the order given (raster order)
        out[0, :, 1] = np.bincount(self.levels, weights=diff, minlength=size)[self.present]
        out[0, :, 2] = self.present
        return out

    def glszm(self, label: int) -> np.ndarray:
        """``calculate_glszm``'s matrix: ``(1, Ng, largest zone)`` zones by level and size.

        Zones are the connected components (pyradiomics' in-plane neighbours: 8-connected) of
        region voxels of one grey level: a graph of the voxel pairs of equal level, whose
        components give each zone's size and level. Integer counts: the same matrix as C.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        self._prepare()
        n_voxels = self.levels.size
        ids = np.full(self.frame.size, -1, dtype=np.int64)
        ids[self.index] = np.arange(n_voxels)
        sources, targets = [], []
        for dy, dx in self._angles(bidirectional=True, distances=False):
            if dy < 0 or (dy == 0 and dx < 0):
                continue  # undirected graph: one of the two directions is enough
            same = self._neighbours(dy, dx) == self.levels
            sources.append(np.flatnonzero(same))
            targets.append(ids[self.index[same] + (int(dy) * self.width + int(dx))])
        source = np.concatenate(sources) if sources else np.zeros(0, dtype=np.int64)
        target = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(source.size, dtype=np.int8), (source, target)),
                           shape=(n_voxels, n_voxels))
        _, zone_of = connected_components(graph, directed=False)
        sizes = np.bincount(zone_of)
        first = np.zeros(sizes.size, dtype=np.int64)
        first[zone_of[::-1]] = np.arange(n_voxels)[::-1]  # a voxel of each zone
        zone_levels = self.levels[first]
        n_sizes = int(sizes.max())  # the C function's width: the largest zone
        out = np.zeros((1, self.n_levels, n_sizes))
        out[0] = np.bincount((zone_levels.astype(np.int64) - 1) * n_sizes + sizes - 1,
                             minlength=self.n_levels * n_sizes).reshape(self.n_levels, n_sizes)
        return out

    def glrlm(self, label: int) -> np.ndarray | None:
        """``calculate_glrlm`` with absent grey levels removed: ``(1, n, Nr, Na)``.

        A run of direction d starts at a region voxel whose neighbour at -d has another level
        (or lies outside) and ends where the neighbour at +d does. Along each line of that
        direction starts and ends alternate, so with both ordered by (line, position) the
        k-th start and the k-th end bound the same run. ``Nr`` is the longest side of the
        box, as in pyradiomics; integer counts: the same matrix as C. Regions that fill more
        than :data:`_GLRLM_MAX_OCCUPANCY` of their box: None (C's pass over the box is faster).
        """
        self._prepare()
        if self.levels.size > _GLRLM_MAX_OCCUPANCY * np.prod(self.box_size):
            return None
        angles = self._angles(bidirectional=False, distances=False)
        n_r = max(self.box_size)
        out = np.empty((1, self.present.size, n_r, len(angles)))
        for a, (dy, dx) in enumerate(angles):
            if dy < 0 or (dy == 0 and dx < 0):  # the same runs, walked the other way
                dy, dx = -dy, -dx
            dy, dx = int(dy), int(dx)
            counts = self._run_counts(dy, dx, n_r)
            out[0, :, :, a] = counts[self.present]
            if not counts[:, 1:].any() and not has_two_on_a_line(*self._coordinates, dy, dx):
                out[0, :, 0, a] = 0  # pyradiomics: the region is "2D" for this angle
        return out

    def _line_and_position(self, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
        """Per region voxel: which line of direction (dy, dx) it lies on, and where on it."""
        ys, xs = self._coordinates
        line = line_index(ys, xs, dy, dx)
        if line.max() < 2**16:
            line = line.astype(np.uint16)  # numpy sorts 16-bit keys stably by radix: ~10x
        return line, (xs if dy == 0 else ys)

    def _run_counts(self, dy: int, dx: int, n_r: int) -> np.ndarray:
        """Runs of direction (dy, dx): counts ``[level, length - 1]``, every level 0..Ng."""
        line, position = self._line_and_position(dy, dx)
        starts = np.flatnonzero(self._neighbours(-dy, -dx) != self.levels)
        ends = np.flatnonzero(self._neighbours(dy, dx) != self.levels)
        if dy != 0:  # raster order sorts by row; sort stably by line, rows stay in order
            starts = starts[np.argsort(line[starts], kind="stable")]
            ends = ends[np.argsort(line[ends], kind="stable")]
        lengths = position[ends] - position[starts] + 1
        keys = self.levels[starts].astype(np.int64) * n_r + lengths - 1
        return np.bincount(keys, minlength=(self.n_levels + 1) * n_r).reshape(-1, n_r)
