"""Filtered images region by region, for prediction mode: only the voxels that decide values.

A classifier needs a few (image, region) pairs: e.g. the exponential image of adipose tissue
and the wavelet-LH image of myotendinous tissue. Every pyradiomics feature reads a filtered
image only at the region's own voxels (first order: ``imageArray[maskArray]``; texture
matrices: grey levels of masked voxels; shape: the mask alone). So each pair needs the
filtered values of the region's voxels, laid out in the region's bounding box (the crop
pyradiomics' ``cropToTumorMask`` makes), and nothing else:

* **Point filters** (square, square root, logarithm, exponential) map each voxel's value
  with one number of the whole image, ``max |x|``. pyradiomics' own filter function is
  run on a one-row image holding only the voxels of the regions that need it, plus one
  voxel of the image's largest ``|x|``: the same element-wise numpy operations on a
  contiguous array of the same values and dtype, so the same numbers, on tens of
  thousands of voxels instead of the leg's box (about a million).
* **Neighbourhood filters** (wavelet, gradient, LBP, LoG) are run on a box around the regions
  that need that image type only, with :func:`.extraction._exact_crop`'s margins.
* Values outside a region are left at 0 in its box: no feature reads them.

:class:`RegionBoxes` holds the boxes, :func:`point_filter_values` and :func:`wavelet_images`
the filters; the extraction itself is :func:`.extraction._extract_by_region`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RegionBoxes", "point_filter_values", "wavelet_images"]


class RegionBoxes:
    """Each region's bounding box in one image, and its cropped mask and original image.

    Parameters
    ----------
    array:
        The image (float32, array order: 2D or a one-slice volume).
    labels:
        Its label map (uint8), same shape.
    boxes:
        Region label -> array-order slices of its bounding box (``ndimage.find_objects``).
    spacing_xyz:
        Voxel spacing in SimpleITK's (x, y[, z]) order.
    """

    def __init__(self, array: np.ndarray, labels: np.ndarray,
                 boxes: Mapping[int, tuple[slice, ...]], spacing_xyz: Sequence[float]) -> None:
        self.array = array
        self.labels = labels
        self.boxes = dict(boxes)
        self.spacing = tuple(float(s) for s in spacing_xyz)
        self._masks: dict[int, Any] = {}
        self._inside: dict[int, np.ndarray] = {}
        self._coordinates: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def image(self, label: int, values: np.ndarray) -> Any:
        """A SimpleITK image of ``label``'s box holding ``values`` (box-shaped array)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(values))
        image.SetSpacing(self.spacing)
        # where cropToTumorMask would put the box in a zero-origin image (no feature reads it)
        lower = [s.start for s in reversed(self.boxes[label])]
        image.SetOrigin(tuple(i * s for i, s in zip(lower, self.spacing, strict=True)))
        return image

    def mask(self, label: int) -> Any:
        """The label map cropped to ``label``'s box (uint32, as the engine gives pyradiomics)."""
        if label not in self._masks:
            box = self.labels[self.boxes[label]].astype(np.uint32)
            self._masks[label] = self.image(label, box)
        return self._masks[label]

    def inside(self, label: int) -> np.ndarray:
        """Boolean mask of ``label`` in its box."""
        if label not in self._inside:
            self._inside[label] = self.labels[self.boxes[label]] == label
        return self._inside[label]

    def coordinates(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """In-plane ``(y, x)`` indices of ``label``'s voxels in its box, in raster order."""
        if label not in self._coordinates:
            inside = self.inside(label)
            self._coordinates[label] = np.nonzero(inside.reshape(inside.shape[-2:]))
        return self._coordinates[label]

    def values(self, label: int) -> np.ndarray:
        """The unfiltered values of ``label``'s voxels, in raster order."""
        return self.array[self.boxes[label]][self.inside(label)]

    def original(self, label: int) -> Any:
        """The unfiltered image cropped to ``label``'s box."""
        return self.image(label, self.array[self.boxes[label]])

    def scatter(self, label: int, values: np.ndarray) -> Any:
        """An image of ``label``'s box: ``values`` (raster order) at its voxels, 0 elsewhere."""
        inside = self.inside(label)
        box = np.zeros(inside.shape, dtype=values.dtype)
        box[inside] = values
        return self.image(label, box)

    def from_filtered(self, label: int, filtered: np.ndarray,
                      offset: Sequence[int]) -> Any:
        """``label``'s box cut out of a filtered image that starts at ``offset`` (array order)."""
        box = tuple(slice(s.start - o, s.stop - o)
                    for s, o in zip(self.boxes[label], offset, strict=True))
        return self.image(label, filtered[box])


def point_filter_values(image_type: str, regions: RegionBoxes, region_labels: Sequence[int],
                        extreme: float, args: Mapping[str, Any]
                        ) -> tuple[str, dict, dict[int, np.ndarray]]:
    """A point filter's values at the voxels of some regions, as pyradiomics computes them.

    The regions' voxel values, one region after the other, and ``extreme`` go through
    pyradiomics' filter as one row: every operation is element-wise (or the ``max |x|``,
    which ``extreme`` fixes), so each voxel gets the number the whole image gives it.

    Parameters
    ----------
    image_type:
        ``Square``, ``SquareRoot``, ``Logarithm`` or ``Exponential``.
    regions:
        The image's region boxes.
    region_labels:
        The regions whose voxels are needed.
    extreme:
        The value of a voxel of the image's largest ``|value|`` (the filters' scale factor).
    args:
        The filter's settings.

    Returns
    -------
    tuple
        pyradiomics' image name, the settings it yields, and per region the filtered values
        of its voxels in raster order (float64).
    """
    import SimpleITK as sitk
    from radiomics import imageoperations

    parts = [regions.values(label) for label in region_labels]
    values = np.concatenate([*parts, np.array([extreme], dtype=regions.array.dtype)])
    row = values.reshape((1,) * (regions.array.ndim - 1) + (values.size,))
    image = sitk.GetImageFromArray(row)
    generator = getattr(imageoperations, f"get{image_type}Image")
    [(filtered, name, kwargs)] = list(generator(image, image, **args))
    out = sitk.GetArrayFromImage(filtered).reshape(-1)
    ends = np.cumsum([part.size for part in parts])
    return name, kwargs, {int(label): out[end - part.size:end]
                          for label, part, end in zip(region_labels, parts, ends, strict=True)}


def wavelet_images(image: Any, wanted: set[str], kwargs: Mapping[str, Any]):
    """pyradiomics' ``getWaveletImage``, computing only the decompositions in ``wanted``.

    ``pywt.swtn`` (what pyradiomics' ``_swt3`` calls, one level at a time) transforms axis
    after axis, splitting every sub-band of the previous axis into its low and high half
    (one ``swt_axis`` call each). A decomposition such as ``LH`` needs only its own path:
    here each split is made with ``pywt.swtn`` on that one axis, which is the same
    ``swt_axis`` call on the same array, and only the splits on the way to a wanted
    decomposition (or to the approximation that the next level or the ``LL..`` image
    needs) are made. Names and order are ``_swt3``'s; the slice axis is not padded (below).

    Yields
    ------
    tuple
        ``(SimpleITK image, name, kwargs)`` for each wanted name, in pyradiomics' order.
    """
    import pywt
    import SimpleITK as sitk

    n_dims = image.GetDimension()
    axes = list(range(n_dims - 1, -1, -1))
    if kwargs.get("force2D", False):
        axes.remove(kwargs.get("force2Ddimension", 0))
    wavelet = kwargs.get("wavelet", "coif1")
    level = kwargs.get("level", 1)
    start_level = kwargs.get("start_level", 0)
    if not isinstance(wavelet, pywt.Wavelet):
        wavelet = pywt.Wavelet(wavelet)
    matrix = sitk.GetArrayFromImage(image)
    original_shape = matrix.shape
    # _swt3 pads every odd axis by one (wrapping) and trims it off at the end; along an axis
    # that is not transformed (the slice axis with force2D) that copy never meets the
    # others, as each line is transformed on its own: only the transformed axes are padded.
    odd = [dim % 2 != 0 and axis in axes for axis, dim in enumerate(original_shape)]
    data = np.pad(matrix.copy(), tuple((0, 1 if o else 0) for o in odd), "wrap")
    trim = tuple(slice(None, -1 if o else None) for o in odd)
    approx_key = "a" * len(axes)
    last = start_level + level - 1
    final_name = f"wavelet-{'L' * len(axes)}" if level == 1 else \
        f"wavelet{level}-{'L' * len(axes)}"

    def name_of(key: str, index: int) -> str:
        decomposition = key.replace("a", "L").replace("d", "H")
        return f"wavelet-{decomposition}" if index == 1 else f"wavelet{index}-{decomposition}"

    def as_image(array: np.ndarray) -> Any:
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    for i in range(start_level + level):
        index = i - start_level + 1
        keys = [] if i < start_level else [
            k for k in _subband_keys(len(axes)) if k != approx_key
            and name_of(k, index) in wanted]
        need_approx = i < last or final_name in wanted
        bands = _split(data, wavelet, axes, keys + ([approx_key] if need_approx else []))
        for key in keys:
            yield as_image(bands[key].copy()[trim]), name_of(key, index), kwargs
        if not need_approx:
            return
        data = bands[approx_key].copy()
    if final_name in wanted:
        yield as_image(data[trim]), final_name, kwargs


def _subband_keys(n_axes: int) -> list[str]:
    """``swtn``'s sub-band keys in its order: 'aa', 'ad', 'da', 'dd' for two axes."""
    keys = [""]
    for _ in range(n_axes):
        keys = [k + c for k in keys for c in "ad"]
    return keys


def _split(data: np.ndarray, wavelet: Any, axes: Sequence[int], keys: Sequence[str]
           ) -> dict[str, np.ndarray]:
    """The sub-bands ``keys`` of one ``swtn`` level, splitting only the paths to them."""
    import pywt

    nodes: dict[str, np.ndarray] = {"": data}
    for depth, axis in enumerate(axes):
        for parent in sorted({k[:depth] for k in keys}):
            [split] = pywt.swtn(nodes[parent], wavelet, level=1, start_level=0, axes=[axis])
            nodes[parent + "a"], nodes[parent + "d"] = split["a"], split["d"]
    return {k: nodes[k] for k in keys}
