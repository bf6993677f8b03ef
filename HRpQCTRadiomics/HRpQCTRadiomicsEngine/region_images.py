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

:func:`RegionBoxes` holds the boxes; the extraction itself is
:func:`.extraction._extract_by_region`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RegionBoxes", "point_filter_values"]


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
