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
* **GLRLM, GLDM, NGTDM matrices** from the image's :class:`.texture_matrices.ImageTextures`
  (all regions of the image at once, the same matrices as pyradiomics' C code) where it
  covers the region; the steps pyradiomics applies after its C call are repeated unchanged.
  The discretisation then comes from there too (the same ``binImage`` levels).
* **Feature names.** pyradiomics lists a class's features with ``inspect`` at every
  instantiation; the list is taken once per class.

Tests compare every feature with a direct pyradiomics call (``test_radiomics_extraction``)
and the GLCM parts bit for bit (``test_radiomics_glcm_coefficients``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from HRpQCTRadiomicsEngine.glcm_coefficients import (
    calculate_glcm_coefficients,
    cluster_feature_value,
    mcc_feature_value,
)
from HRpQCTRadiomicsEngine.shape2d_mesh import mesh_perimeter_surface
from HRpQCTRadiomicsEngine.texture_matrices import ImageTextures, digitize

if TYPE_CHECKING:
    from HRpQCTRadiomicsEngine.region_matrices import RegionTextures

__all__ = ["bin_image", "feature_classes_for_one_image", "shape_class"]

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
    binned[mask] = digitize(values, edges)
    return binned


def _present_levels(values: np.ndarray) -> np.ndarray:
    """``numpy.unique(values)`` for the bin indices of a region (counting, not sorting)."""
    if values.size and values.min() >= 0 and values.max() <= 2**20:
        return np.flatnonzero(np.bincount(values)).astype(values.dtype, copy=False)
    return np.unique(values)


#: First-order features that read the discretised image (through ``p_i``).
_BINNED_FIRST_ORDER = frozenset({"Entropy", "Uniformity"})


class _FirstOrderSharing:
    """Mixin for ``RadiomicsFirstOrder``: percentiles and moments computed once, and the
    discretisation only when a feature reads it.

    pyradiomics bins the region in ``__init__`` and counts the bins (``numpy.unique``, a sort)
    in ``_initCalculation`` for every first-order call, although only Entropy and Uniformity
    use them; prediction mode often asks for a Mean or a Median alone. Here the binned image
    is made on first access (the same ``_applyBinning`` on the same array) and ``p_i`` only
    when one of those two features is enabled; the other features never read either.
    """

    def __init__(self, inputImage, inputMask, **kwargs):
        from radiomics.base import RadiomicsFeaturesBase

        # RadiomicsFirstOrder.__init__ without its eager binning
        RadiomicsFeaturesBase.__init__(self, inputImage, inputMask, **kwargs)
        self.pixelSpacing = inputImage.GetSpacing()
        self.voxelArrayShift = kwargs.get("voxelArrayShift", 0)
        self._hrpqct_binned: np.ndarray | None = None
        if self.voxelBased:  # its _initCalculation reads grayLevels before the binned image
            self._hrpqct_binned = self._applyBinning(self.imageArray.copy())

    @property
    def discretizedImageArray(self) -> np.ndarray:  # noqa: N802
        """The binned image, made on first use (pyradiomics makes it in ``__init__``)."""
        if self._hrpqct_binned is None:
            self._hrpqct_binned = self._applyBinning(self.imageArray.copy())
        return self._hrpqct_binned

    def _initCalculation(self, voxelCoordinates=None):  # noqa: N802 (pyradiomics' names)
        self._hrpqct_shared: dict[Any, np.ndarray] = {}
        enabled = {name for name, on in self.enabledFeatures.items() if on}
        if voxelCoordinates is not None or enabled & _BINNED_FIRST_ORDER:
            super()._initCalculation(voxelCoordinates)
            return
        # pyradiomics' segment-based _initCalculation without p_i (read by no enabled feature)
        self.targetVoxelArray = self.imageArray[self.maskArray].astype("float").reshape((1, -1))

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


class _SharedMatrix:
    """Mixin: the texture matrix from the image's :class:`ImageTextures`, when it covers it.

    ``_hrpqct_textures`` (set by :func:`feature_classes_for_one_image`) returns the region's
    matrix as pyradiomics' C code gives it with absent grey levels removed, or None, in
    which case pyradiomics' own ``_calculateMatrix`` runs.
    """

    _hrpqct_kind = ""
    _hrpqct_textures: ImageTextures | RegionTextures | None = None

    def _shared_matrix(self) -> np.ndarray | None:
        textures = self._hrpqct_textures
        if (textures is None or not textures.covers(self.label) or self.voxelBased
                or self.settings.get("weightingNorm") is not None):
            return None
        if not np.array_equal(textures.gray_levels(self.label), self.coefficients["grayLevels"]):
            return None  # not the same discretisation (cannot happen; be safe)
        matrix = getattr(textures, self._hrpqct_kind, None)
        return None if matrix is None else matrix(self.label)


class _SharedGLCM(_SharedMatrix):
    _hrpqct_kind = "glcm"

    def _calculateMatrix(self, voxelCoordinates=None):  # noqa: N802 (pyradiomics' names)
        p_glcm = self._shared_matrix()
        if p_glcm is None:
            return super()._calculateMatrix(voxelCoordinates)
        # pyradiomics' RadiomicsGLCM._calculateMatrix after its C call (which returns the
        # same counts); weighting: pyradiomics' own method runs instead
        n_g = self.coefficients["Ng"]
        empty = np.array(list(set(range(1, n_g + 1)) - set(self.coefficients["grayLevels"])),
                         dtype=int)
        p_glcm = np.delete(p_glcm, empty - 1, 1)
        p_glcm = np.delete(p_glcm, empty - 1, 2)
        if self.symmetricalGLCM:
            p_glcm += np.transpose(p_glcm, (0, 2, 1, 3)).copy()
        sum_p = np.sum(p_glcm, (1, 2))
        if p_glcm.shape[3] > 1:
            empty_angles = np.where(np.sum(sum_p, 0) == 0)
            if len(empty_angles[0]) > 0:
                p_glcm = np.delete(p_glcm, empty_angles, 3)
                sum_p = np.delete(sum_p, empty_angles, 1)
        sum_p[sum_p == 0] = np.nan
        p_glcm /= sum_p[:, None, None, :]
        return p_glcm


class _SharedGLRLM(_SharedMatrix):
    _hrpqct_kind = "glrlm"

    def _calculateMatrix(self, voxelCoordinates=None):  # noqa: N802 (pyradiomics' names)
        p_glrlm = self._shared_matrix()
        if p_glrlm is None:
            return super()._calculateMatrix(voxelCoordinates)
        # pyradiomics' RadiomicsGLRLM._calculateMatrix after its C call and the removal of
        # absent grey levels (weighting: pyradiomics' own method runs instead)
        n_r = np.sum(p_glrlm, (1, 2))
        if p_glrlm.shape[3] > 1:
            empty_angles = np.where(np.sum(n_r, 0) == 0)
            if len(empty_angles[0]) > 0:
                p_glrlm = np.delete(p_glrlm, empty_angles, 3)
                n_r = np.delete(n_r, empty_angles, 1)
        n_r[n_r == 0] = np.nan
        self.coefficients["Nr"] = n_r
        return p_glrlm


class _SharedGLDM(_SharedMatrix):
    _hrpqct_kind = "gldm"

    def _calculateMatrix(self, voxelCoordinates=None):  # noqa: N802
        p_gldm = self._shared_matrix()
        if p_gldm is None:
            return super()._calculateMatrix(voxelCoordinates)
        # pyradiomics' RadiomicsGLDM._calculateMatrix after the removal of absent grey levels
        jvector = np.arange(1, p_gldm.shape[2] + 1, dtype="float64")
        pd = np.sum(p_gldm, 1)
        pg = np.sum(p_gldm, 2)
        empty_sizes = np.sum(pd, 0)
        p_gldm = np.delete(p_gldm, np.where(empty_sizes == 0), 2)
        jvector = np.delete(jvector, np.where(empty_sizes == 0))
        pd = np.delete(pd, np.where(empty_sizes == 0), 1)
        nz = np.sum(pd, 1)
        nz[nz == 0] = 1
        self.coefficients["Nz"] = nz
        self.coefficients["pd"] = pd
        self.coefficients["pg"] = pg
        self.coefficients["ivector"] = self.coefficients["grayLevels"].astype(float)
        self.coefficients["jvector"] = jvector
        return p_gldm


class _SharedNGTDM(_SharedMatrix):
    _hrpqct_kind = "ngtdm"

    def _calculateMatrix(self, voxelCoordinates=None):  # noqa: N802
        p_ngtdm = self._shared_matrix()
        # pyradiomics then removes grey levels without voxels: there are none here
        return super()._calculateMatrix(voxelCoordinates) if p_ngtdm is None else p_ngtdm


class _SharedGLSZM(_SharedMatrix):
    _hrpqct_kind = "glszm"

    def _calculateMatrix(self, voxelCoordinates=None):  # noqa: N802
        p_glszm = self._shared_matrix()
        if p_glszm is None:
            return super()._calculateMatrix(voxelCoordinates)
        # pyradiomics' RadiomicsGLSZM._calculateMatrix after its C call (the same counts)
        n_g = self.coefficients["Ng"]
        empty = np.array(list(set(range(1, n_g + 1)) - set(self.coefficients["grayLevels"])),
                         dtype=int)
        return np.delete(p_glszm, empty - 1, 1)


_SHARED_MATRIX_MIXINS: dict[str, type] = {
    "glrlm": _SharedGLRLM, "gldm": _SharedGLDM, "ngtdm": _SharedNGTDM, "glszm": _SharedGLSZM}


class _LazyMeshShape2D:
    """Mixin for ``RadiomicsShape2D``: perimeter, surface and diameter computed on first use.

    pyradiomics walks the whole (padded) mask box in C for the mesh perimeter, surface and
    maximum diameter when the class is created; the axis lengths and Elongation need only
    the eigenvalues of the pixel coordinates. ``_initSegmentBasedCalculation`` below is
    pyradiomics' own (3.0.1) with that one call moved into :meth:`_mesh`, which runs the
    same C function on the same arguments when a feature reads the diameter. Perimeter and
    surface alone come from :func:`.shape2d_mesh.mesh_perimeter_surface` (the same values
    without C's quadratic diameter search).
    """

    def _initSegmentBasedCalculation(self):  # noqa: N802 (pyradiomics' names)
        import SimpleITK as sitk

        self._hrpqct_mesh: tuple[float, float, float] | None = None
        self._hrpqct_perimeter_surface: tuple[float, float] | None = None
        self.maskArray = (sitk.GetArrayFromImage(self.inputMask) == self.label)
        n_dims = self.inputMask.GetDimension()
        if n_dims == 3:
            if not self.settings.get("force2D", False):
                raise ValueError("Shape2D is can only be calculated when input is 2D or 3D "
                                 "with `force2D=True`")
            force2d_dimension = self.settings.get("force2Ddimension", 0)
            axes = [0, 1, 2]
            axes.remove(force2d_dimension)
            self.pixelSpacing = np.array(self.inputImage.GetSpacing()[::-1])[(axes,)]
            if self.maskArray.shape[force2d_dimension] > 1:
                raise ValueError("Size of the mask in dimension %i is more than 1, cannot "
                                 "compute 2D shape")
            self.maskArray = np.squeeze(self.maskArray, axis=force2d_dimension)
        elif n_dims == 2:
            self.pixelSpacing = np.array(self.inputImage.GetSpacing()[::-1])
        else:
            raise ValueError("Shape2D is can only be calculated when input is 2D or 3D with "
                             "`force2D=True`")
        self.maskArray = np.pad(self.maskArray, pad_width=1, mode="constant", constant_values=0)
        self.labelledPixelCoordinates = np.where(self.maskArray != 0)
        n_p = len(self.labelledPixelCoordinates[0])
        coordinates = np.array(self.labelledPixelCoordinates, dtype="int").transpose((1, 0))
        physical = coordinates * self.pixelSpacing[None, :]
        physical -= np.mean(physical, axis=0)
        physical /= np.sqrt(n_p)
        covariance = np.dot(physical.T.copy(), physical)
        self.eigenValues = np.linalg.eigvals(covariance)
        machine_errors = np.bitwise_and(self.eigenValues < 0, self.eigenValues > -1e-10)
        if np.sum(machine_errors) > 0:
            self.eigenValues[machine_errors] = 0
        self.eigenValues.sort()

    def _mesh(self) -> tuple[float, float, float]:
        if self._hrpqct_mesh is None:
            from radiomics import cShape

            self._hrpqct_mesh = cShape.calculate_coefficients2D(self.maskArray, self.pixelSpacing)
        return self._hrpqct_mesh

    def _perimeter_surface(self) -> tuple[float, float]:
        # without the quadratic diameter search, unless C has run already (same values)
        if self._hrpqct_mesh is not None:
            return self._hrpqct_mesh[0], self._hrpqct_mesh[1]
        if self._hrpqct_perimeter_surface is None:
            self._hrpqct_perimeter_surface = mesh_perimeter_surface(self.maskArray,
                                                                    self.pixelSpacing)
        return self._hrpqct_perimeter_surface

    Perimeter = property(lambda self: self._perimeter_surface()[0])
    Surface = property(lambda self: self._perimeter_surface()[1])
    Diameter = property(lambda self: self._mesh()[2])


def shape_class(name: str) -> type:
    """pyradiomics' shape class ``name`` (``shape`` or ``shape2D``), as the engine runs it.

    ``shape2D`` computes its mesh values only when a feature reads them
    (:class:`_LazyMeshShape2D`); ``shape`` is pyradiomics' own class.
    """
    from radiomics import getFeatureClasses

    cls = getFeatureClasses()[name]
    if name != "shape2D":
        return cls
    key = "shape2D-lazy"
    if key not in _SHAPE_CLASSES:
        names = _feature_names(cls)
        _SHAPE_CLASSES[key] = type(cls.__name__, (_LazyMeshShape2D, cls), {
            "getFeatureNames": classmethod(lambda _cls, names=names: dict(names)),
            "__module__": cls.__module__})
    return _SHAPE_CLASSES[key]


_SHAPE_CLASSES: dict[str, type] = {}


#: GLCM cluster features with the power taken once per ``i + j`` (same values).
_CLUSTER_FEATURES = {
    f"getCluster{name}FeatureValue": (lambda self, power=power: cluster_feature_value(self, power))
    for name, power in (("Tendency", 2), ("Shade", 3), ("Prominence", 4))}


def _feature_names(cls: type) -> dict[str, bool]:
    """``cls.getFeatureNames()`` of a pyradiomics class, computed once."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in _FEATURE_NAMES:
        _FEATURE_NAMES[key] = cls.getFeatureNames()
    return _FEATURE_NAMES[key]


def feature_classes_for_one_image(textures: ImageTextures | RegionTextures | None = None
                                  ) -> dict[str, type]:
    """Feature class name -> subclass of pyradiomics' class, for one (image, region) pair.

    The discretisation shared between the classes lives in this call's closure: call again
    for every filtered image and region. ``textures``: the image's texture matrices of all
    regions (:mod:`.texture_matrices`), used by GLRLM, GLDM and NGTDM where they cover the
    region.
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
            if textures is not None and textures.covers(self.label):
                # the same binImage levels, already computed for the whole image
                binned = np.zeros(matrix.shape, dtype="int")
                binned[self.maskArray] = textures.region_levels(self.label)
                levels = textures.gray_levels(self.label).astype(binned.dtype)
            else:
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
            bases = (_SharedGLCM, cls)
            members["_calculateCoefficients"] = calculate_glcm_coefficients
            members["getMCCFeatureValue"] = mcc_feature_value
            members.update(_CLUSTER_FEATURES)
            members["_hrpqct_textures"] = textures
        elif name == "firstorder":
            bases = (_FirstOrderSharing, cls)
        elif name in _SHARED_MATRIX_MIXINS:
            bases = (_SHARED_MATRIX_MIXINS[name], cls)
            members["_hrpqct_textures"] = textures
        classes[name] = type(cls.__name__, bases, members)
    return classes
