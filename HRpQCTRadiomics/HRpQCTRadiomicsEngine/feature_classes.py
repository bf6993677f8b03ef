"""pyradiomics' feature classes as the engine runs them: same values, less repeated work.

:func:`feature_classes_for_one_image` returns subclasses of pyradiomics' own feature classes
for one (filtered image, region) pair. Nothing in pyradiomics is modified or patched; the
subclasses override a few methods with code that computes the same numbers:

* **Discretisation and mask once.** pyradiomics discretises the same cropped image again in
  each of its feature classes; ``_applyBinning`` keeps the result (read-only) for the other
  classes of the same image and region, and the region's boolean mask is shared the same
  way (:func:`bin_image`: bin edges from numpy's min/max instead of Python's builtin
  ``min``/``max`` over every voxel, the same two numbers).
* **GLCM.** Sum/difference distributions and the MCC matrix with the same floating-point
  operations in the same order (:mod:`.glcm_coefficients`).
* **First order.** pyradiomics partitions the voxel values 6 times for 4 percentiles (the
  robust MAD recomputes the 10th and 90th) and recomputes the centred values for every
  moment; here the percentiles come from one ``numpy.nanpercentile`` call (the same order
  statistics and the same interpolation per percentile) and the centred values and
  moments are computed once. Callers receive copies, as pyradiomics' callers modify them.
* **Feature names.** pyradiomics lists a class's features with ``inspect`` at every
  instantiation; the list is taken once per class.

Tests compare every feature with a direct pyradiomics call (``test_radiomics_extraction``)
and the GLCM parts bit for bit (``test_radiomics_glcm_coefficients``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from HRpQCTRadiomicsEngine.glcm_coefficients import calculate_glcm_coefficients, mcc_feature_value

__all__ = ["bin_image", "feature_classes_for_one_image"]

#: Percentiles pyradiomics' first-order class uses (10/90: features and robust MAD;
#: 25/75: interquartile range).
_PERCENTILES = (10, 25, 75, 90)

_FEATURE_NAMES: dict[str, dict[str, bool]] = {}


def bin_image(matrix: np.ndarray, mask: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """pyradiomics' ``binImage`` for a boolean mask, with numpy extremes for the bin edges.

    ``getBinEdges`` with a fixed bin width uses only the minimum and maximum of the values,
    so it is handed the two numbers (same dtype) instead of the whole array: identical edges,
    without Python's builtin ``min``/``max`` iterating over every voxel. With ``binCount`` the
    full values are passed (numpy's histogram is used there anyway).
    """
    from radiomics import imageoperations

    values = matrix[mask]
    if settings.get("binCount") is None and values.size:
        extremes = np.array([values.min(), values.max()], dtype=values.dtype)
        edges = imageoperations.getBinEdges(extremes, **settings)
    else:
        edges = imageoperations.getBinEdges(values, **settings)
    binned = np.zeros(matrix.shape, dtype="int")
    binned[mask] = np.digitize(values, edges)
    return binned


def _present_levels(values: np.ndarray) -> np.ndarray:
    """``numpy.unique(values)`` for the bin indices of a region (counting, not sorting)."""
    if values.size and values.min() >= 0 and values.max() <= 2**20:
        return np.flatnonzero(np.bincount(values)).astype(values.dtype, copy=False)
    return np.unique(values)


class _FirstOrderSharing:
    """Mixin for ``RadiomicsFirstOrder``: percentiles and moments computed once."""

    def _initCalculation(self, voxelCoordinates=None):  # noqa: N802 (pyradiomics' names)
        self._hrpqct_shared: dict[Any, np.ndarray] = {}
        super()._initCalculation(voxelCoordinates)

    def _percentile(self, q: int) -> np.ndarray:
        shared = self._hrpqct_shared
        if "percentiles" not in shared:
            # one partition for all four; each value is the same order statistics, interpolated
            # by the same expression, as numpy.nanpercentile(values, q, 1) alone
            shared["percentiles"] = np.nanpercentile(self.targetVoxelArray, _PERCENTILES, axis=1)
        return shared["percentiles"][_PERCENTILES.index(q)].copy()

    def get10PercentileFeatureValue(self):  # noqa: N802
        return self._percentile(10)

    def get90PercentileFeatureValue(self):  # noqa: N802
        return self._percentile(90)

    def getInterquartileRangeFeatureValue(self):  # noqa: N802
        return self._percentile(75) - self._percentile(25)

    def _moment(self, a, moment=1):
        from radiomics.firstorder import RadiomicsFirstOrder

        if moment == 1 or a is not self.targetVoxelArray:
            return RadiomicsFirstOrder._moment(a, moment)
        shared = self._hrpqct_shared
        if ("moment", moment) not in shared:
            if "centred" not in shared:
                shared["centred"] = a - np.nanmean(a, 1, keepdims=True)
            shared["moment", moment] = np.nanmean(np.power(shared["centred"], moment), 1)
        return shared["moment", moment].copy()


def _feature_names(cls: type) -> dict[str, bool]:
    """``cls.getFeatureNames()`` of a pyradiomics class, computed once."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in _FEATURE_NAMES:
        _FEATURE_NAMES[key] = cls.getFeatureNames()
    return _FEATURE_NAMES[key]


def feature_classes_for_one_image() -> dict[str, type]:
    """Feature class name -> subclass of pyradiomics' class, for one (image, region) pair.

    The discretisation shared between the classes lives in this call's closure: call again
    for every filtered image and region.
    """
    from radiomics import getFeatureClasses
    from radiomics.base import RadiomicsFeaturesBase

    cache: dict[Any, Any] = {}

    def _init_segment_based_calculation(self):
        # the same boolean mask for every class: computed once, shared read-only
        key = ("mask", self.label)
        if key not in cache:
            import SimpleITK as sitk

            mask = sitk.GetArrayFromImage(self.inputMask) == self.label
            mask.flags.writeable = False
            cache[key] = mask
        self.maskArray = cache[key]

    def _apply_binning(self, matrix):
        key = ("binned", self.settings.get("binWidth", 25), self.settings.get("binCount"),
               self.label)
        hit = cache.get(key)
        if hit is None:
            binned = bin_image(matrix, self.maskArray, self.settings)
            levels = _present_levels(binned[self.maskArray])
            binned.flags.writeable = False  # shared: a class writing into it would fail loudly
            hit = cache[key] = (binned, levels, int(np.max(levels)))
        self.coefficients["grayLevels"] = hit[1].copy()
        self.coefficients["Ng"] = hit[2]
        return hit[0]

    classes = {}
    for name, cls in getFeatureClasses().items():
        names = _feature_names(cls)
        members: dict[str, Any] = {
            "_applyBinning": _apply_binning,
            "getFeatureNames": classmethod(lambda _cls, names=names: dict(names)),
            "__module__": cls.__module__,
        }
        if (cls._initSegmentBasedCalculation
                is RadiomicsFeaturesBase._initSegmentBasedCalculation):  # not the shape classes
            members["_initSegmentBasedCalculation"] = _init_segment_based_calculation
        bases: tuple[type, ...] = (cls,)
        if name == "glcm":
            members["_calculateCoefficients"] = calculate_glcm_coefficients
            members["getMCCFeatureValue"] = mcc_feature_value
        elif name == "firstorder":
            bases = (_FirstOrderSharing, cls)
        classes[name] = type(cls.__name__, bases, members)
    return classes
