"""Per-region radiomic features with pyradiomics: per slice (the paper) or per scan (3D).

The values are pyradiomics' own: for every region the result equals
``RadiomicsFeatureExtractor(params).execute(image, mask, label=region)`` on the same image
(tests check this). What changes is only how much work is repeated:

* **Filtered images once per slice.** pyradiomics' filters do not look at the mask, yet a
  direct call recomputes all of them for every region. Here they are computed once per
  slice (or scan) and cropped per region, exactly as pyradiomics crops them.
* **Filtered only where it matters.** The filters run on a box around the requested regions
  (:func:`_exact_crop`) whose margins make every value inside the regions identical to
  filtering the whole image; filters that depend on the whole image (LoG, LBP-3D,
  ``normalize``) get the whole image.
* **Less repeated work inside pyradiomics' feature classes** (:mod:`.feature_classes`):
  discretisation once per image and region instead of once per class, bin edges from
  numpy's min/max, GLCM sum/difference distributions and MCC vectorised with the same
  operations in the same order (:mod:`.glcm_coefficients`), first-order percentiles and
  moments computed once. No pyradiomics function is modified or patched.
* **Texture matrices of all regions at once.** GLRLM, GLDM and NGTDM of every region of a
  filtered slice come from one vectorised pass over the image (:mod:`.texture_matrices`)
  instead of one C call per region over its bounding box; the matrices are equal to
  pyradiomics' (integer counts; NGTDM sums added in the same order), and its grey levels
  are reused as the regions' discretisation.
* **Parallel slices.** Slices go to a pool of worker processes (joblib/loky), each with
  SimpleITK limited to one thread.
* **Prediction mode.** ``features=`` restricts the work to the features a trained classifier
  uses: unused filters, feature classes and features are not computed at all. Each
  (image, region) pair is computed on the region's own box (:func:`_extract_by_region`):
  point filters on the region's voxels only and other filters on a box around the
  regions that need them (:mod:`.region_images`), only the wavelet decompositions asked
  for, GLCM/GLSZM/GLDM/NGTDM from the region's voxels (:mod:`.region_matrices`), and
  first-order binning and the 2D shape mesh only when a requested feature reads them.
  Tests compare every value with the full extraction (``test_radiomics_prediction_mode``).

Skipped regions (empty, a single voxel, a line, fewer voxels than ``minimumROISize``) and
regions where pyradiomics fails are reported with ``status`` and ``reason``; extraction goes on.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from HRpQCTCore.errors import HRpQCTError, InvalidScanError
from HRpQCTCore.hu_volume import as_hu_volume
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import REGIONS, region_by_label
from HRpQCTRadiomicsEngine.feature_classes import feature_classes_for_one_image, shape_class
from HRpQCTRadiomicsEngine.settings import RadiomicsSettings, load_settings, settings_for_mode
from HRpQCTRadiomicsEngine.texture_matrices import ImageTextures

__all__ = [
    "RegionFeatures",
    "FeatureTable",
    "extract_features",
    "extract_slice_features",
    "split_feature_name",
    "IMAGE_TYPE_OF_PREFIX",
    "STATUS_OK",
    "STATUS_SKIPPED",
    "STATUS_FAILED",
]

log = logging.getLogger("hrpqct")

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"

#: Settings whose effect depends on the mask; they cannot share filtered images between
#: regions, so they are refused rather than silently computed differently.
_MASK_DEPENDENT_SETTINGS = ("resampledPixelSpacing", "preCrop", "resegmentRange")

#: Start of a pyradiomics image name -> the image type that produces it.
IMAGE_TYPE_OF_PREFIX: tuple[tuple[str, str], ...] = (
    ("original", "Original"),
    ("wavelet", "Wavelet"),
    ("log-sigma", "LoG"),
    ("squareroot", "SquareRoot"),
    ("square", "Square"),
    ("logarithm", "Logarithm"),
    ("exponential", "Exponential"),
    ("gradient", "Gradient"),
    ("lbp-2D", "LBP2D"),
    ("lbp-3D", "LBP3D"),
)


@dataclass
class RegionFeatures:
    """Features of one region in one slice (or in the whole scan).

    Attributes
    ----------
    slice_index:
        Array index ``z`` of the slice; ``None`` in per-scan mode.
    region_label:
        Region label value (see :mod:`HRpQCTCore.regions`).
    voxel_count:
        Voxels of the region in the slice (or scan).
    status:
        ``"ok"``, ``"skipped"`` (region absent or too small) or ``"failed"`` (pyradiomics
        raised an error; ``reason`` holds it).
    reason:
        Why the region was skipped or failed; empty when ok.
    features:
        Feature name -> value (pyradiomics names, e.g. ``wavelet-LH_glcm_Contrast``).
    """

    slice_index: int | None
    region_label: int
    voxel_count: int
    status: str
    reason: str = ""
    features: dict[str, float] = field(default_factory=dict)

    @property
    def region_key(self) -> str:
        """Stable region name (``regions.REGIONS[...].key``)."""
        return region_by_label(self.region_label).key


@dataclass
class FeatureTable:
    """All region results of one scan, with what produced them."""

    rows: list[RegionFeatures]
    feature_names: list[str]
    mode: str
    settings: dict[str, Any]
    scan: str = ""
    subject: str = ""

    def ok_rows(self) -> list[RegionFeatures]:
        """Rows with status ``ok``."""
        return [r for r in self.rows if r.status == STATUS_OK]

    def matrix(self, region_label: int | None = None,
               names: Sequence[str] | None = None) -> tuple[np.ndarray, list[RegionFeatures]]:
        """Feature matrix (rows: ok results, optionally of one region) in ``names`` order."""
        names = list(self.feature_names if names is None else names)
        rows = [r for r in self.ok_rows()
                if region_label is None or r.region_label == region_label]
        out = np.full((len(rows), len(names)), np.nan, dtype=np.float64)
        for i, r in enumerate(rows):
            out[i] = [r.features.get(n, np.nan) for n in names]
        return out, rows


def split_feature_name(name: str) -> tuple[str, str, str]:
    """Split ``<image>_<class>_<feature>`` (pyradiomics' naming) into its three parts."""
    parts = name.split("_", 2)
    if len(parts) != 3 or not all(parts):
        raise HRpQCTError(
            f"{name!r} is not a pyradiomics feature name (<image>_<class>_<feature>, e.g. "
            "original_firstorder_Mean).")
    return parts[0], parts[1], parts[2]


def _image_type_of(image_name: str) -> str:
    for prefix, image_type in IMAGE_TYPE_OF_PREFIX:
        if image_name.startswith(prefix):
            return image_type
    raise HRpQCTError(f"Unknown pyradiomics image name {image_name!r} in a feature name.")


# --- plans: which features to compute ----------------------------------------------------

#: A plan: image name -> feature class -> feature names (None: all of the class).
#: ``None`` instead of a dict means "everything the settings enable".
Plan = dict[str, dict[str, list[str] | None]] | None


def _plan_from_names(names: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    plan: dict[str, dict[str, list[str]]] = {}
    for name in names:
        image, cls, feature = split_feature_name(name)
        plan.setdefault(image, {}).setdefault(cls, [])
        if feature not in plan[image][cls]:
            plan[image][cls].append(feature)
    return plan


def _normalise_request(regions: Iterable[int] | None,
                       features: Sequence[str] | Mapping[int, Sequence[str]] | None
                       ) -> list[tuple[int, Plan]]:
    """(region label, plan) pairs for the requested regions and feature subsets."""
    known = {d.label for d in REGIONS}
    if isinstance(features, Mapping):
        labels = [int(k) for k in features]
        plans = {int(k): _plan_from_names(v) for k, v in features.items()}
    else:
        labels = [d.label for d in REGIONS] if regions is None else [int(r) for r in regions]
        plan = None if features is None else _plan_from_names(features)
        plans = {lab: plan for lab in labels}
    bad = [lab for lab in labels if lab not in known]
    if bad:
        raise HRpQCTError(f"Unknown region labels {bad}; regions are {sorted(known)}.")
    return [(lab, plans[lab]) for lab in labels]


# --- one image (slice or volume) -----------------------------------------------------------

def _quiet_pyradiomics() -> None:
    # pyradiomics logs a warning per skipped filter and per deprecated feature; our results
    # carry the reasons, so its log would only be noise for the user.
    logging.getLogger("radiomics").setLevel(logging.ERROR)


def _bounding_boxes(labels: np.ndarray) -> tuple[np.ndarray, list]:
    from scipy import ndimage

    counts = np.bincount(labels.ravel(), minlength=max(d.label for d in REGIONS) + 1)
    return counts, ndimage.find_objects(labels)


def _sitk_bounding_box(slices: tuple[slice, ...]) -> np.ndarray:
    """Array-order slices -> pyradiomics' bounding box (L_x, U_x, L_y, U_y[, L_z, U_z])."""
    bounds = []
    for s in reversed(slices):
        bounds += [s.start, s.stop - 1]
    return np.array(bounds)


def _skip_reason(count: int, bbox: np.ndarray | None, setting: Mapping[str, Any]) -> str:
    """pyradiomics' mask checks (``checkMask``) phrased for users; empty if the region passes."""
    if count == 0 or bbox is None:
        return "empty: the region has no voxels here"
    min_dims = int(setting.get("minimumROIDimensions", 2))
    min_size = setting.get("minimumROISize")
    n_dims = int(np.sum((bbox[1::2] - bbox[0::2] + 1) > 1))
    if n_dims == 0:
        return "too small: a single voxel"
    if n_dims < min_dims:
        return (f"too thin: extends in {n_dims} dimension(s), {min_dims} needed "
                "(setting minimumROIDimensions)")
    if min_size is not None and count <= min_size:
        return (f"too small: {count} voxels, more than {min_size} needed "
                "(setting minimumROISize)")
    return ""


def _shape_applies(n_dims: int, bbox: np.ndarray, class_name: str,
                   kwargs: Mapping[str, Any]) -> bool:
    """Whether ``computeShape`` computes ``class_name`` for a mask of ``n_dims`` dimensions."""
    if class_name == "shape":
        return n_dims == 3
    if n_dims == 3:
        if not kwargs.get("force2D", False):
            return False
        # pyradiomics indexes its (x, y, z)-ordered box with force2Ddimension; mirrored here
        size = bbox[1::2] - bbox[0::2] + 1
        return bool(size[kwargs.get("force2Ddimension", 0)] > 1)
    return True


def _shape_features(image, mask, bbox, class_name: str, names: list[str] | None,
                    kwargs: Mapping[str, Any]) -> dict[str, float]:
    """Shape features as ``RadiomicsFeatureExtractor.computeShape`` computes them."""
    from radiomics import imageoperations

    if not _shape_applies(mask.GetDimension(), bbox, class_name, kwargs):
        return {}
    cropped_image, cropped_mask = imageoperations.cropToTumorMask(image, mask, bbox)
    return _cropped_shape_features(cropped_image, cropped_mask, class_name, names, kwargs)


def _cropped_shape_features(cropped_image, cropped_mask, class_name: str,
                            names: list[str] | None, kwargs: Mapping[str, Any]
                            ) -> dict[str, float]:
    """One shape class on a region's box (only ``names``; all when empty or None)."""
    shape = shape_class(class_name)(cropped_image, cropped_mask, **kwargs)
    for name in names or []:
        shape.enableFeatureByName(name)
    return {f"original_{class_name}_{k}": float(v) for k, v in shape.execute().items()}


def _texture_features(image, mask, bbox, image_name: str,
                      classes: Mapping[str, list[str] | None],
                      kwargs: Mapping[str, Any],
                      textures: ImageTextures | None = None) -> dict[str, float]:
    """First-order and texture features of one (filtered) image, as ``computeFeatures``."""
    from radiomics import imageoperations

    cropped_image, cropped_mask = imageoperations.cropToTumorMask(image, mask, bbox)
    return _region_texture_features(cropped_image, cropped_mask, image_name, classes, kwargs,
                                    textures)


def _region_texture_features(cropped_image, cropped_mask, image_name: str,
                             classes: Mapping[str, list[str] | None],
                             kwargs: Mapping[str, Any],
                             textures: ImageTextures | None = None) -> dict[str, float]:
    """First-order and texture classes of one image already cropped to the region's box."""
    feature_classes = feature_classes_for_one_image(textures)
    out: dict[str, float] = {}
    for class_name, names in classes.items():
        if class_name.startswith("shape"):
            continue
        if class_name not in feature_classes:
            raise HRpQCTError(f"Unknown pyradiomics feature class {class_name!r}.")
        instance = feature_classes[class_name](cropped_image, cropped_mask, **kwargs)
        for name in names or []:
            instance.enableFeatureByName(name)
        for name, value in instance.execute().items():
            out[f"{image_name}_{class_name}_{name}"] = float(value)
    return out


def _filtered_images(image, mask, params: Mapping[str, Any], wanted: set[str] | None):
    """Filtered images as pyradiomics' ``execute`` makes them: [(name, image, kwargs)]."""
    from radiomics import imageoperations

    setting = params.get("setting") or {}
    images = []
    for image_type, custom in (params.get("imageType") or {"Original": {}}).items():
        if wanted is not None and image_type not in wanted:
            continue
        args = dict(setting)
        args.update(custom or {})
        generator = getattr(imageoperations, f"get{image_type}Image")(image, mask, **args)
        with warnings.catch_warnings():
            # scikit-image warns that LBP on float images is sensitive to tiny differences;
            # pyradiomics passes the image as it is, and so do we (values must match).
            warnings.filterwarnings("ignore", message=".*local_binary_pattern.*")
            images.extend(generator)
    return images


#: Image types whose values are a function of each voxel's value and of max|x| over the
#: whole image only (pyradiomics rescales them with it).
_POINT_FILTERS = frozenset({"Square", "SquareRoot", "Logarithm", "Exponential"})


def _filter_margin(image_type: str, args: Mapping[str, Any]) -> int | None:
    """Voxels around a region that decide its filtered values; None: the whole image does.

    Gradient: central differences (1). Wavelet: pyradiomics applies a level-1 stationary
    wavelet transform ``start_level + level`` times, each reading ``dec_len`` neighbours
    (generous: a whole filter length per side and pass). LBP-2D: samples at ``lbp2DRadius``,
    interpolated (radius + 1). LoG (recursive Gaussian along whole lines) and LBP-3D: None.
    """
    if image_type == "Original" or image_type in _POINT_FILTERS:
        return 0
    if image_type == "Gradient":
        return 1
    if image_type == "Wavelet":
        import pywt

        wavelet = args.get("wavelet", "coif1")
        length = (wavelet if isinstance(wavelet, pywt.Wavelet) else pywt.Wavelet(wavelet)).dec_len
        passes = int(args.get("start_level", 0)) + int(args.get("level", 1))
        return passes * length + 2
    if image_type == "LBP2D":
        return math.ceil(float(args.get("lbp2DRadius", 1))) + 1
    return None


def _exact_crop(array: np.ndarray, labels: np.ndarray, region_labels: Sequence[int],
                params: Mapping[str, Any], wanted: set[str] | None) -> tuple[slice, ...] | None:
    """A box to filter instead of the whole image, with identical values in every region.

    The box holds the regions' voxels plus each filter's :func:`_filter_margin`; along an axis
    where the wavelet is needed and the box would reach the image border it spans the whole
    axis (the transform wraps around periodically), and when a point filter is needed it
    holds a voxel of the image's largest ``|value|`` (their rescaling factor). None when no
    box smaller than the image keeps the values (LoG, LBP-3D, ``normalize``: they use the
    whole image).
    """
    setting = params.get("setting") or {}
    if setting.get("normalize", False):
        return None
    margin, periodic, extreme = 0, False, False
    for image_type, custom in (params.get("imageType") or {"Original": {}}).items():
        if wanted is not None and image_type not in wanted:
            continue
        args = dict(setting)
        args.update(custom or {})
        m = _filter_margin(image_type, args)
        if m is None:
            return None
        margin = max(margin, m)
        periodic |= image_type == "Wavelet"
        extreme |= image_type in _POINT_FILTERS
    inside = np.isin(labels, np.asarray(region_labels, dtype=labels.dtype))
    lo, hi = [], []
    for axis in range(labels.ndim):
        present = np.flatnonzero(np.any(inside, axis=tuple(a for a in range(labels.ndim)
                                                          if a != axis)))
        lo.append(int(present[0]) - margin)
        hi.append(int(present[-1]) + 1 + margin)
    if extreme:
        at = np.unravel_index(int(np.argmax(np.abs(array))), array.shape)
        lo = [min(a, int(i)) for a, i in zip(lo, at, strict=True)]
        hi = [max(b, int(i) + 1) for b, i in zip(hi, at, strict=True)]
    box = []
    for axis, size in enumerate(labels.shape):
        start, stop = max(0, lo[axis]), min(size, hi[axis])
        if periodic and (start == 0 or stop == size):
            start, stop = 0, size
        box.append(slice(start, stop))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, labels.shape, strict=True)):
        return None
    return tuple(box)


def _extract_image(array: np.ndarray, labels: np.ndarray, spacing_xyz: tuple[float, ...],
                   params: Mapping[str, Any], requests: list[tuple[int, Plan]],
                   slice_index: int | None, feature_classes_all: Mapping[str, Any]
                   ) -> list[RegionFeatures]:
    """All requested regions of one image (a slice as 2D/one-slice volume, or a volume)."""
    import SimpleITK as sitk
    from radiomics import imageoperations

    _quiet_pyradiomics()
    setting = dict(params.get("setting") or {})
    counts, boxes = _bounding_boxes(labels)
    results: list[RegionFeatures] = []
    todo: list[tuple[int, int, np.ndarray, Plan]] = []
    for label, plan in requests:
        count = int(counts[label]) if label < len(counts) else 0
        box = boxes[label - 1] if label - 1 < len(boxes) else None
        bbox = _sitk_bounding_box(box) if box is not None else None
        reason = _skip_reason(count, bbox, setting)
        if reason:
            results.append(RegionFeatures(slice_index, label, count, STATUS_SKIPPED, reason))
        else:
            todo.append((label, count, bbox, plan))
    if not todo:
        return results

    if (all(plan is not None for *_, plan in todo)
            and not setting.get("normalize", False)):
        # prediction mode: only the voxels of the (image, region) pairs the plans name
        return sorted(results + _extract_by_region(
            array, labels, {label: boxes[label - 1] for label, *_ in todo}, spacing_xyz,
            params, todo, slice_index), key=lambda r: r.region_label)

    # Which image types any region needs (None: all enabled ones).
    if any(plan is None for *_, plan in todo):
        wanted = None
    else:
        wanted = {_image_type_of(img) for *_, plan in todo for img in plan
                  if not plan[img].keys() <= {"shape", "shape2D"}}
    # Filter only the part of the image that decides the regions' values.
    crop = _exact_crop(array, labels, [label for label, *_ in todo], params, wanted)
    if crop is not None:
        array, labels = array[crop], labels[crop]
        _, boxes = _bounding_boxes(labels)
        todo = [(label, count, _sitk_bounding_box(boxes[label - 1]), plan)
                for label, count, _, plan in todo]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing_xyz)
    mask = sitk.GetImageFromArray(np.ascontiguousarray(labels).astype(np.uint32, copy=False))
    mask.CopyInformation(image)
    if setting.get("normalize", False):
        image = imageoperations.normalizeImage(image, **setting)

    try:
        filtered = _filtered_images(image, mask, params, wanted)
    except Exception as exc:  # a filter failing fails every region of this image
        for label, count, _, _ in todo:
            results.append(RegionFeatures(slice_index, label, count, STATUS_FAILED,
                                          f"pyradiomics filter error: {exc}"))
        return sorted(results, key=lambda r: r.region_label)

    features: dict[int, dict[str, float]] = {}
    failed: dict[int, str] = {}  # pyradiomics errors on odd regions: reported, others go on
    for label, _, bbox, plan in todo:
        try:
            features[label] = _region_shape_features(
                image, mask, bbox, plan, feature_classes_all, dict(setting, label=label))
        except Exception as exc:
            failed[label] = f"pyradiomics error: {type(exc).__name__}: {exc}"
    # Image after image, so that one image's matrices of all regions can be freed before the
    # next (each region's features keep pyradiomics' order: shape, then image by image).
    textures = _image_textures(filtered, labels, todo, feature_classes_all)
    for filtered_image, image_name, image_kwargs in filtered:
        for label, _, bbox, plan in todo:
            classes = (feature_classes_all if plan is None else plan.get(image_name))
            if label in failed or not classes:
                continue
            try:
                features[label].update(_texture_features(
                    filtered_image, mask, bbox, image_name, classes,
                    dict(image_kwargs, label=label), textures[image_name]))
            except Exception as exc:
                failed[label] = f"pyradiomics error: {type(exc).__name__}: {exc}"
        del textures[image_name]
    for label, count, _, _ in todo:
        if label in failed:
            results.append(RegionFeatures(slice_index, label, count, STATUS_FAILED, failed[label]))
        else:
            results.append(RegionFeatures(slice_index, label, count, STATUS_OK, "",
                                          features[label]))
    return sorted(results, key=lambda r: r.region_label)


def _images_needed(params: Mapping[str, Any], todo) -> dict[str, dict[str, list[int]]]:
    """Image type -> image name -> labels of the regions whose plans read that image, in
    the order of the settings' image types (pyradiomics' order; shape is not an image)."""
    by_type: dict[str, dict[str, list[int]]] = {}
    for label, _, _, plan in todo:
        for image_name, classes in plan.items():
            if not classes or classes.keys() <= {"shape", "shape2D"}:
                continue
            names = by_type.setdefault(_image_type_of(image_name), {})
            names.setdefault(image_name, []).append(label)
    enabled = params.get("imageType") or {"Original": {}}
    return {t: by_type[t] for t in enabled if t in by_type}


def _extract_by_region(array: np.ndarray, labels: np.ndarray,
                       boxes: Mapping[int, tuple[slice, ...]], spacing_xyz: tuple[float, ...],
                       params: Mapping[str, Any], todo, slice_index: int | None
                       ) -> list[RegionFeatures]:
    """Prediction mode: each (image, region) pair a plan names, on the region's box only.

    The values are those of the whole-image path (:mod:`.region_images` says why): the same
    pyradiomics filters and feature classes on the same values at the region's voxels.
    Features keep pyradiomics' order (shape, then image by image). A filter that fails
    fails the regions that need its image.
    """
    import SimpleITK as sitk

    from HRpQCTRadiomicsEngine.region_images import RegionBoxes
    from HRpQCTRadiomicsEngine.region_matrices import RegionTextures

    setting = dict(params.get("setting") or {})
    regions = RegionBoxes(array, labels, boxes, spacing_xyz)
    features: dict[int, dict[str, float]] = {}
    failed: dict[int, str] = {}
    for label, _, bbox, plan in todo:
        try:
            features[label] = _region_box_shape_features(
                regions, label, bbox, plan, dict(setting, label=label))
        except Exception as exc:
            failed[label] = f"pyradiomics error: {type(exc).__name__}: {exc}"
    extreme: list[float] = []  # a value of the largest |value|, found on first need
    plans = {label: plan for label, _, _, plan in todo}
    for image_type, names in _images_needed(params, todo).items():
        needing = sorted({lab for labs in names.values() for lab in labs} - failed.keys())
        if not needing:
            continue
        try:  # the filters run while the generator is consumed: inside the try
            images = list(_region_images(image_type, names, needing, regions, params,
                                         extreme))
        except Exception as exc:
            for label in needing:
                failed[label] = f"pyradiomics filter error: {exc}"
            continue
        for image_name, kwargs, per_region in images:
            for label, (image, values) in per_region.items():
                if label in failed:
                    continue
                try:
                    if values is None:
                        values = sitk.GetArrayViewFromImage(image)[regions.inside(label)]
                    textures = RegionTextures(values, regions.coordinates(label),
                                              regions.inside(label).shape, label, kwargs)
                    features[label].update(_region_texture_features(
                        image, regions.mask(label), image_name, plans[label][image_name],
                        dict(kwargs, label=label), textures))
                except Exception as exc:
                    failed[label] = f"pyradiomics error: {type(exc).__name__}: {exc}"
    results = []
    for label, count, _, _ in todo:
        if label in failed:
            results.append(RegionFeatures(slice_index, label, count, STATUS_FAILED, failed[label]))
        else:
            results.append(RegionFeatures(slice_index, label, count, STATUS_OK, "",
                                          features[label]))
    return results


def _region_images(image_type: str, names: Mapping[str, list[int]], needing: list[int],
                   regions, params: Mapping[str, Any], extreme: list[float]):
    """Yield (image name, settings, {label: (image of its box, values at its voxels or None)})
    for one image type's names.

    Point filters: pyradiomics' filter on the needed voxels only
    (:func:`.region_images.point_filter_values`). Original: the crop. Others: the filter on
    an exact box around the regions that need it (:func:`_exact_crop`).
    """
    import SimpleITK as sitk

    from HRpQCTRadiomicsEngine.region_images import point_filter_values, wavelet_images

    setting = dict(params.get("setting") or {})
    args = dict(setting)
    args.update((params.get("imageType") or {}).get(image_type) or {})
    if image_type == "Original":
        for image_name, labs in names.items():
            yield image_name, args, {lab: (regions.original(lab), regions.values(lab))
                                     for lab in labs if lab in needing}
        return
    if image_type in _POINT_FILTERS:
        if not extreme:
            flat = regions.array.reshape(-1)
            extreme.append(flat[int(np.argmax(np.abs(flat)))])
        image_name, kwargs, values = point_filter_values(image_type, regions, needing,
                                                         extreme[0], args)
        labs = names.get(image_name, [])
        yield image_name, kwargs, {lab: (regions.scatter(lab, values[lab]), values[lab])
                                   for lab in labs if lab in needing}
        return
    one_type = {"imageType": {image_type: params["imageType"][image_type]}, "setting": setting}
    crop = _exact_crop(regions.array, regions.labels, needing, one_type, None)
    if crop is None:
        crop = tuple(slice(0, n) for n in regions.array.shape)
    image = sitk.GetImageFromArray(np.ascontiguousarray(regions.array[crop]))
    image.SetSpacing(regions.spacing)
    mask = sitk.GetImageFromArray(regions.labels[crop].astype(np.uint32))
    mask.CopyInformation(image)
    offset = [s.start for s in crop]
    if image_type == "Wavelet":  # only the decompositions asked for
        filtered_images = wavelet_images(image, set(names), args)
    else:
        filtered_images = _filtered_images(image, mask, one_type, None)
    for filtered, image_name, kwargs in filtered_images:
        labs = [lab for lab in names.get(image_name, []) if lab in needing]
        if labs:
            values = sitk.GetArrayViewFromImage(filtered)
            yield image_name, kwargs, {lab: (regions.from_filtered(lab, values, offset), None)
                                       for lab in labs}


def _region_box_shape_features(regions, label: int, bbox: np.ndarray, plan: Plan,
                               kwargs: Mapping[str, Any]) -> dict[str, float]:
    """The shape classes ``plan`` asks for, on the region's own box."""
    out: dict[str, float] = {}
    for shape_name in ("shape", "shape2D"):
        if shape_name in plan.get("original", {}) and _shape_applies(
                regions.labels.ndim, bbox, shape_name, kwargs):
            out.update(_cropped_shape_features(regions.original(label), regions.mask(label),
                                               shape_name, plan["original"][shape_name],
                                               kwargs))
    return out


def _region_shape_features(image, mask, bbox, plan: Plan, feature_classes_all: Mapping[str, Any],
                           kwargs: Mapping[str, Any]) -> dict[str, float]:
    """The shape classes a region's plan asks for (pyradiomics computes them first)."""
    features: dict[str, float] = {}
    for shape_name in ("shape", "shape2D"):
        if plan is None:
            if shape_name in feature_classes_all:
                features.update(_shape_features(image, mask, bbox, shape_name,
                                                feature_classes_all[shape_name], kwargs))
        elif shape_name in plan.get("original", {}):
            features.update(_shape_features(image, mask, bbox, shape_name,
                                            plan["original"][shape_name], kwargs))
    return features


#: Feature classes whose matrices :class:`ImageTextures` computes for all regions at once.
_SHARED_MATRIX_CLASSES = frozenset({"glrlm", "gldm", "ngtdm"})

#: The shared pass is used when the regions' boxes cover at least this many times the image.
_SHARED_PASS_MIN_GAIN = 2.0


def _image_textures(filtered, labels: np.ndarray, todo, feature_classes_all: Mapping[str, Any]
                    ) -> dict[str, ImageTextures]:
    """Per filtered image: the texture matrices of every region that needs them, computed
    together on first use (:mod:`.texture_matrices`)."""
    import SimpleITK as sitk

    flat_labels = labels.reshape(-1)
    geometry: dict[int, tuple[np.ndarray, tuple[int, ...]]] = {}  # the same for every image
    out = {}
    for filtered_image, image_name, image_kwargs in filtered:
        regions = {}
        for label, _, bbox, plan in todo:
            classes = feature_classes_all if plan is None else plan.get(image_name) or {}
            if not _SHARED_MATRIX_CLASSES & set(classes):
                continue
            if label not in geometry:
                size = tuple(int(n) for n in (bbox[1::2] - bbox[0::2] + 1)[::-1])
                geometry[label] = (np.flatnonzero(flat_labels == label), size)
            regions[label] = geometry[label]
        # The shared pass costs about as much per image pixel as pyradiomics' C code per
        # pixel of each region's box (measured): worth it only where the boxes add up to
        # much more than the image (all regions of a slice; not one region, as in
        # prediction mode, nor the whole image that LoG needs).
        boxes = sum(math.prod(size) for _, size in regions.values())
        if _SHARED_PASS_MIN_GAIN * labels.size > boxes:
            regions = {}
        out[image_name] = ImageTextures(sitk.GetArrayViewFromImage(filtered_image), regions,
                                        image_kwargs)
    return out


#: Stored types whose every value float32 holds exactly: a worker converts them itself.
_EXACT_IN_FLOAT32 = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16))


def _slice_for_worker(hu2d: Any) -> np.ndarray:
    """A slice to send to a worker: 16-bit integers as they are (half the bytes to pickle;
    the worker's float32 conversion is exact), anything else as float32."""
    if isinstance(hu2d, np.ndarray) and hu2d.dtype in _EXACT_IN_FLOAT32:
        return hu2d
    return np.asarray(hu2d, dtype=np.float32)


def _slice_task(hu2d: np.ndarray, labels2d: np.ndarray, spacing_mm: tuple[float, float, float],
                params: dict, geometry: str, requests: list[tuple[int, Plan]],
                slice_index: int, single_thread: bool) -> list[RegionFeatures]:
    """One slice; runs in a worker process when extracting in parallel."""
    from threadpoolctl import threadpool_limits

    hu2d = np.asarray(hu2d, dtype=np.float32)

    if single_thread:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    z_mm, y_mm, x_mm = spacing_mm
    if geometry == "volume":
        array, labels, spacing_xyz = hu2d[np.newaxis], labels2d[np.newaxis], (x_mm, y_mm, z_mm)
    else:
        array, labels, spacing_xyz = hu2d, labels2d, (x_mm, y_mm)
    classes = params.get("featureClass") or {}
    # The matrices pyradiomics hands to LAPACK (GLCM's MCC: eigenvalues of Ng x Ng) are
    # small; multi-threaded BLAS only spins on them (8 s instead of 0.2 s per slice seen on
    # two busy cores). One BLAS thread, for this call only.
    with threadpool_limits(limits=1):
        return _extract_image(np.ascontiguousarray(array), np.ascontiguousarray(labels),
                              spacing_xyz, params, requests, slice_index, classes)


def extract_slice_features(hu2d: np.ndarray, labels2d: np.ndarray,
                           spacing_mm: tuple[float, float, float],
                           settings: str | RadiomicsSettings = "paper",
                           regions: Iterable[int] | None = None,
                           features: Sequence[str] | Mapping[int, Sequence[str]] | None = None,
                           slice_index: int = 0) -> list[RegionFeatures]:
    """Features of the regions of one 2D slice (in this process).

    ``spacing_mm`` is the scan's ``(z, y, x)`` spacing (z matters only for the one-slice
    volume form). See :func:`extract_features` for the other arguments.
    """
    settings = load_settings(settings)
    params = settings_for_mode(settings, "slice")
    _check_supported(params)
    requests = _normalise_request(regions, features)
    return _slice_task(np.asarray(hu2d, dtype=np.float32), _as_labels(labels2d),
                       tuple(spacing_mm), params, settings.slice_geometry, requests,
                       slice_index, single_thread=False)


def _check_supported(params: Mapping[str, Any]) -> None:
    setting = params.get("setting") or {}
    used = [k for k in _MASK_DEPENDENT_SETTINGS if setting.get(k) not in (None, False)]
    if used:
        raise HRpQCTError(
            f"Radiomics settings {used} depend on each region's mask and are not supported "
            "by this engine (filtered images are shared between regions). Resample the scan "
            "beforehand and remove these settings.")
    if setting.get("binCount") is not None:
        log.warning("binCount is set: with a fixed bin count, grey levels mean different HU "
                    "in every region and slice (pyradiomics recommends binWidth for CT).")


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InvalidScanError("The region label map holds values outside 0..255.")
        arr = arr.astype(np.uint8)
    return arr


def _default_jobs(n_tasks: int) -> int:
    return max(1, min(os.cpu_count() or 1, n_tasks))


def extract_features(hu: np.ndarray, regions_map: np.ndarray,
                     spacing_mm: tuple[float, float, float], *,
                     settings: str | RadiomicsSettings = "paper",
                     mode: str = "slice",
                     regions: Iterable[int] | None = None,
                     features: Sequence[str] | Mapping[int, Sequence[str]] | None = None,
                     slices: Iterable[int] | None = None,
                     n_jobs: int | None = None,
                     scan: str = "", subject: str = "",
                     scan_margin_voxels: int = 8,
                     progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None) -> FeatureTable:
    """Radiomic features of each region, per slice or per scan.

    Parameters
    ----------
    hu:
        Scan in HU, ``[z, y, x]`` (any real dtype; used as float32, which is exact for int16).
    regions_map:
        7-region label map of the same shape (values from :data:`regions.REGIONS`).
    spacing_mm:
        Voxel size ``(z, y, x)`` in mm.
    settings:
        Preset name (``"paper"``, ``"complete"``), YAML path or loaded settings.
    mode:
        ``"slice"``: one result per region and slice (image level, as the paper).
        ``"scan"``: one result per region for the whole volume (3D features: ``shape``
        instead of ``shape2D``, 3D filters). The volume is first cropped to the bounding box
        of all labelled voxels plus ``scan_margin_voxels`` (values equal a pyradiomics call
        on that cropped volume). Memory: the wavelet produces 8 float64 volumes at once.
    regions:
        Region labels to extract (default all seven).
    features:
        Prediction mode: only these features (pyradiomics names), or a mapping region label
        -> names; nothing else is computed.
    slices:
        Slice indices to extract (per-slice mode; default all). ``range(0, n, k)`` gives
        every k-th slice, k times faster (e.g. for prediction). The features of the slices
        extracted are unchanged; a patient-level probability aggregated over them is then a
        mean (or median) over k times fewer slices, i.e. a different, noisier estimate than
        over all slices.
    n_jobs:
        Worker processes for per-slice mode (default: CPU cores, at most the slice count;
        1: in this process).

    Returns
    -------
    FeatureTable
        One row per (slice, region) with status and reason; feature columns in pyradiomics'
        order.
    """
    settings = load_settings(settings)
    hu = as_hu_volume(hu)  # read slice by slice (or one box): no whole float copy
    regions_map = _as_labels(regions_map)
    if hu.ndim != 3 or hu.shape != regions_map.shape:
        raise InvalidScanError(
            f"Scan {hu.shape} and region map {regions_map.shape} must be 3D and the same shape; "
            "use the label map that was made for this scan.")
    if not np.isfinite(np.asarray(spacing_mm, dtype=float)).all() or min(spacing_mm) <= 0:
        raise InvalidScanError(f"Spacing must be positive, got {spacing_mm}")
    params = settings_for_mode(settings, mode)
    _check_supported(params)
    requests = _normalise_request(regions, features)
    spacing_mm = tuple(float(s) for s in spacing_mm)

    if mode == "scan":
        rows = _extract_scan(hu, regions_map, spacing_mm, params, requests,
                             scan_margin_voxels, progress, cancel)
    else:
        indices = list(range(hu.shape[0])) if slices is None else [int(s) for s in slices]
        bad = [s for s in indices if not 0 <= s < hu.shape[0]]
        if bad:
            raise HRpQCTError(f"Slice indices {bad} are outside 0..{hu.shape[0] - 1}.")
        rows = _extract_slices(hu, regions_map, spacing_mm, params, settings.slice_geometry,
                               requests, indices, n_jobs, progress, cancel)
    return FeatureTable(rows=rows, feature_names=_ordered_names(rows), mode=mode,
                        settings=settings.provenance(), scan=scan, subject=subject)


def _ordered_names(rows: list[RegionFeatures]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for name in r.features:
            seen.setdefault(name, None)
    return list(seen)


def _extract_slices(hu, regions_map, spacing_mm, params, geometry, requests, indices,
                    n_jobs, progress, cancel) -> list[RegionFeatures]:
    total = len(indices)
    n_jobs = _default_jobs(total) if n_jobs is None else max(1, int(n_jobs))
    stage = "radiomics (slices)"
    report(progress, 0, total, stage)
    rows: list[RegionFeatures] = []
    if n_jobs == 1 or total <= 1:
        for done, z in enumerate(indices, start=1):
            check(cancel)
            rows += _slice_task(np.asarray(hu[z], dtype=np.float32), regions_map[z],
                                spacing_mm, params, geometry, requests, z, single_thread=False)
            report(progress, done, total, stage)
        return rows
    from joblib import Parallel, delayed

    tasks = (delayed(_slice_task)(_slice_for_worker(hu[z]), regions_map[z],
                                  spacing_mm, params, geometry, requests, z, True)
             for z in indices)
    parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")
    results = parallel(tasks)
    try:
        for done, slice_rows in enumerate(results, start=1):
            rows += slice_rows
            report(progress, done, total, stage)
            check(cancel)
    finally:
        results.close()  # on cancel or error: stop the remaining tasks
    return rows


def _extract_scan(hu, regions_map, spacing_mm, params, requests, margin, progress, cancel
                  ) -> list[RegionFeatures]:
    stage = "radiomics (scan)"
    report(progress, 0, 1, stage)
    check(cancel)
    nonzero = np.nonzero(np.any(regions_map, axis=(1, 2)))[0]
    if nonzero.size == 0:
        return [RegionFeatures(None, lab, 0, STATUS_SKIPPED, "empty: the region has no voxels")
                for lab, _ in requests]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(np.any(regions_map, axis=other))[0]
        lo = max(0, int(present[0]) - margin)
        hi = min(regions_map.shape[axis], int(present[-1]) + 1 + margin)
        box.append(slice(lo, hi))
    array = np.ascontiguousarray(hu[tuple(box)], dtype=np.float32)
    labels = np.ascontiguousarray(regions_map[tuple(box)])
    z_mm, y_mm, x_mm = spacing_mm
    classes = params.get("featureClass") or {}
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # see _slice_task
        rows = _extract_image(array, labels, (x_mm, y_mm, z_mm), params, requests, None,
                              classes)
    report(progress, 1, 1, stage)
    return rows


def projected_seconds(seconds: float, measured_slices: int, total_slices: int) -> float:
    """Linear projection of a per-slice timing to a whole scan (for benchmarks)."""
    if measured_slices <= 0:
        return math.nan
    return seconds * total_slices / measured_slices
