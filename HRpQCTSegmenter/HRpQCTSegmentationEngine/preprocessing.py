"""Slice preprocessing for the segmentation network, and its exact inverse.

This module is the **one place** where the paper's preprocessing constants live
(:class:`PreprocessingConfig`): every other module -- training, inference, benchmarks -- takes a
config object and never repeats a number.

Forward (image -> network input), per axial slice:

1. **Crop** a ``crop_yx`` window (paper: 1600 x 1600 voxels) centred on the leg. The centre is
   found once per scan (:func:`crop_box_for_scan`), so every slice of a scan shares one crop.
   Where the window reaches past the scan it is padded with air (``pad_hu`` = -1000 HU).
   At inference the window is then narrowed to the leg plus a margin of air
   (``input_fit="leg"``, the default; :func:`network_window`), at the same pixel size: the
   network sees less air and runs faster (re-scored on both test sets, benchmarks/RESULTS.md).
2. **Clip** HU to ``[clip_min_hu, clip_max_hu]`` (paper: [-4000, 6000]) and **scale** to [0, 1].
3. **Resize** bicubically to ``input_yx`` (paper: 800 x 800).

The network (SegFormer) returns logits at **1/4 of its input**: ``ceil(800 / 4) = 200`` so
200 x 200 for the paper's 800 x 800 input (:attr:`PreprocessingConfig.logits_yx`).

Inverse (logits -> labels in the scan's own grid), :func:`logits_to_labels`: the low-resolution
logits are upsampled bilinearly (``align_corners=False``, as transformers' SegFormer loss and
the project's training loss do) to the crop size, the arg-max is taken, and the crop is written
back into a label slice of the original shape; voxels outside the crop are background.

Inter-slice context (2.5D): a model may take each slice with its ``slice_context``
neighbours on each side as ``2 * slice_context + 1`` input channels (z-1, z, z+1 for a
context of 1; the centre slice in the middle channel). At the scan's first and last slices
the edge slice is repeated (:func:`neighbour_indices`). Each channel is preprocessed exactly
as a 2D input (same crop box, clipping, scaling and resize). A context of 0 is the 2D model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from HRpQCTCore.errors import InvalidScanError
from HRpQCTCore.hu_volume import as_hu_volume
from HRpQCTCore.regions import BACKGROUND

__all__ = [
    "PreprocessingConfig",
    "CropBox",
    "crop_box_for_scan",
    "network_window",
    "crop_and_network_windows",
    "fit_window_to_leg",
    "INPUT_FITS",
    "crop_slice",
    "preprocess_slice",
    "preprocess_slices",
    "labels_to_model_grid",
    "logits_to_labels",
    "logits_to_labels_batch",
    "validate_volume",
    "preprocess_slices_numpy",
    "logits_to_labels_numpy",
    "torch_available",
    "MAX_SLICE_CONTEXT",
    "checked_slice_context",
    "channels_for_context",
    "slice_context_of_channels",
    "neighbour_indices",
]

#: What of the crop window the network sees (:attr:`PreprocessingConfig.input_fit`).
INPUT_FITS = ("leg", "field")

#: Largest inter-slice context a model may have (neighbours on each side; 4: 9 channels).
MAX_SLICE_CONTEXT = 4


@dataclass(frozen=True)
class PreprocessingConfig:
    """All constants of the preprocessing, defaulting to the paper's.

    Attributes
    ----------
    crop_yx:
        Size of the crop window in scan voxels (rows, columns). Paper: 1600 x 1600.
    input_yx:
        Network input size after bicubic resizing. Paper: 800 x 800.
    clip_min_hu, clip_max_hu:
        HU clipping range before scaling to [0, 1]. Paper: [-4000, 6000].
    pad_hu:
        Value used where the crop window extends beyond the scan (air).
    leg_threshold_hu:
        Voxels above this HU count as leg (not air) when locating the crop centre.
    leg_slice_fraction:
        A pixel belongs to the leg's footprint when at least this fraction of the scan's
        slices is above ``leg_threshold_hu`` there (robust to noise and to single bright
        slices).
    antialias:
        Low-pass filter before bicubic downsampling (like PIL's bicubic resize). Training and
        inference must agree; the default is part of the saved model metadata.
    patch_stride:
        Total stride of the network's output relative to its input (SegFormer: 4).
    input_fit:
        What of the crop window the network sees at inference. ``"leg"`` (default): the
        part of the window around the leg, at the same pixel size (the window's leg plus
        ``leg_margin_px`` network pixels of air on each side, sizes rounded up to
        ``input_multiple_px``; :func:`network_window`); the network then spends no time on
        the air (the leg covers ~40 % of the paper's window). ``"field"``: the whole window
        (the paper's), as in training. Labels outside the network's input are background
        either way.
    leg_margin_px:
        Air kept around the leg's extent with ``input_fit="leg"``, in network-input pixels
        (32: 64 voxels or 3.9 mm at the paper's 2x downsampling of 60.7 um voxels).
    input_multiple_px:
        With ``input_fit="leg"``, the network input's sides are multiples of this (32: the
        SegFormer's coarsest stage stride), so the few distinct sizes keep the stages' grids
        aligned with the window's.
    """

    crop_yx: tuple[int, int] = (1600, 1600)
    input_yx: tuple[int, int] = (800, 800)
    clip_min_hu: float = -4000.0
    clip_max_hu: float = 6000.0
    pad_hu: float = -1000.0
    leg_threshold_hu: float = -400.0
    leg_slice_fraction: float = 0.5
    antialias: bool = True
    patch_stride: int = 4
    input_fit: str = "leg"
    leg_margin_px: int = 32
    input_multiple_px: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_yx", tuple(int(v) for v in self.crop_yx))
        object.__setattr__(self, "input_yx", tuple(int(v) for v in self.input_yx))
        if len(self.crop_yx) != 2 or min(self.crop_yx) < 1:
            raise ValueError(f"crop_yx must be two positive sizes, got {self.crop_yx}")
        if len(self.input_yx) != 2 or min(self.input_yx) < 1:
            raise ValueError(f"input_yx must be two positive sizes, got {self.input_yx}")
        if not self.clip_max_hu > self.clip_min_hu:
            raise ValueError(
                f"clip_max_hu ({self.clip_max_hu}) must exceed clip_min_hu ({self.clip_min_hu})")
        if not 0.0 < self.leg_slice_fraction <= 1.0:
            raise ValueError("leg_slice_fraction must be in (0, 1]")
        if self.patch_stride < 1:
            raise ValueError("patch_stride must be >= 1")
        if self.input_fit not in INPUT_FITS:
            raise ValueError(f"input_fit must be one of {', '.join(INPUT_FITS)}, "
                             f"got {self.input_fit!r}")
        if self.leg_margin_px < 0 or self.input_multiple_px < 1:
            raise ValueError("leg_margin_px must be >= 0 and input_multiple_px >= 1")

    @property
    def logits_yx(self) -> tuple[int, int]:
        """Size of the network's logits: ``ceil(input / patch_stride)`` (paper: 200 x 200)."""
        return tuple(math.ceil(s / self.patch_stride) for s in self.input_yx)  # type: ignore

    def scale_hu(self, hu: np.ndarray) -> np.ndarray:
        """Clip to the HU range and scale linearly to [0, 1] (float32 out)."""
        lo, hi = np.float32(self.clip_min_hu), np.float32(self.clip_max_hu)
        out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
        out -= lo
        out *= np.float32(1.0 / (self.clip_max_hu - self.clip_min_hu))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["crop_yx"] = list(self.crop_yx)
        data["input_yx"] = list(self.input_yx)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so typos do not pass."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown preprocessing settings: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class CropBox:
    """A crop window in a slice's voxel grid; may extend beyond the slice (padding).

    ``y0``/``x0`` is the window's first row/column in the slice's indices (negative when the
    window starts before the slice); the window covers ``y0 .. y0 + height - 1``.
    """

    y0: int
    x0: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    def overlap(self, slice_shape_yx: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
        """Slices ``(src_y, src_x, dst_y, dst_x)`` of the part of the window inside the slice.

        ``src`` indexes the scan slice, ``dst`` the crop window.
        """
        ny, nx = slice_shape_yx
        sy0, sy1 = max(self.y0, 0), min(self.y0 + self.height, ny)
        sx0, sx1 = max(self.x0, 0), min(self.x0 + self.width, nx)
        sy1, sx1 = max(sy1, sy0), max(sx1, sx0)
        return (slice(sy0, sy1), slice(sx0, sx1),
                slice(sy0 - self.y0, sy1 - self.y0), slice(sx0 - self.x0, sx1 - self.x0))


def checked_slice_context(value: Any, name: str = "slice_context") -> int:
    """``value`` as a slice context (neighbour slices on each side, 0 .. MAX_SLICE_CONTEXT).

    Raises
    ------
    ValueError
        For anything but a whole number in that range (booleans and floats included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= int(value) <= MAX_SLICE_CONTEXT:
        raise ValueError(
            f"{name} must be the number of neighbour slices on each side, a whole number "
            f"from 0 (2D: one slice) to {MAX_SLICE_CONTEXT} (1: z-1, z, z+1), got {value!r}")
    return int(value)


def channels_for_context(slice_context: int) -> int:
    """Input channels of a model with ``slice_context`` neighbours on each side: 2k + 1."""
    return 2 * checked_slice_context(slice_context) + 1


def slice_context_of_channels(num_channels: int) -> int:
    """The slice context of a model with ``num_channels`` input channels (1 -> 0, 3 -> 1).

    Raises
    ------
    ValueError
        For an even or out-of-range channel count (no centre slice).
    """
    channels = int(num_channels)
    if channels < 1 or channels % 2 == 0 or (channels - 1) // 2 > MAX_SLICE_CONTEXT:
        raise ValueError(
            f"A segmenter takes an odd number of slices (the slice and as many neighbours "
            f"on each side, 1 .. {2 * MAX_SLICE_CONTEXT + 1} channels), not {num_channels}")
    return (channels - 1) // 2


def neighbour_indices(z: int, n_slices: int, slice_context: int) -> np.ndarray:
    """Slices fed for slice ``z``: ``z - k .. z + k``, the edge slice repeated at the ends.

    >>> neighbour_indices(0, 5, 1).tolist(), neighbour_indices(4, 5, 1).tolist()
    ([0, 0, 1], [3, 4, 4])
    """
    if not 0 <= z < n_slices:
        raise IndexError(f"slice {z} is outside a scan of {n_slices} slices")
    k = checked_slice_context(slice_context)
    return np.clip(np.arange(z - k, z + k + 1), 0, n_slices - 1)


def validate_volume(hu_volume: Any) -> np.ndarray:
    """Return ``hu_volume`` as a 3D volume ``[z, y, x]`` or raise InvalidScanError.

    Accepts a numpy array, a :class:`~HRpQCTCore.hu_volume.StoredHUVolume` (returned as it
    is: read slice by slice) or a :class:`~HRpQCTCore.scan.Scan` (its ``hu``).
    """
    array = as_hu_volume(getattr(hu_volume, "hu", hu_volume))
    if array.ndim != 3:
        what = {2: "a single 2D slice", 4: "a 4D (multi-component or time) image"}.get(
            array.ndim, f"a {array.ndim}D array")
        raise InvalidScanError(
            f"Segmentation needs a 3D scan [z, y, x]; got {what} of shape {array.shape}. "
            "Pass the whole volume (for one slice use volume[np.newaxis]); for a 4D or colour "
            "image select the single grey-value component first.")
    if min(array.shape) == 0:
        raise InvalidScanError(f"The scan is empty (shape {array.shape}); check the input file.")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InvalidScanError(
            f"The scan has data type {array.dtype}; a grey-value image in HU is needed "
            "(is this a label map or a mask?).")
    return array


def crop_box_for_scan(hu_volume: np.ndarray, config: PreprocessingConfig | None = None,
                      chunk_slices: int = 16) -> CropBox:
    """The crop window shared by all slices of a scan, centred on the leg.

    The leg's footprint is the set of pixels that lie above ``leg_threshold_hu`` in at least
    ``leg_slice_fraction`` of the slices; its largest connected component is kept (the scanner
    may show calibration rods or a cast) and the window is centred on that component's bounding
    box, so a leg that fits into the window lies wholly inside it. With no leg found the window
    is centred on the slice.

    Parameters
    ----------
    hu_volume:
        Scan ``[z, y, x]`` in HU (a 2D slice is treated as a one-slice scan).
    config:
        Preprocessing settings; default the paper's.
    chunk_slices:
        Slices thresholded at a time (bounds memory for large scans).

    See Also
    --------
    network_window : the window and the network input of a scan, fitted to the leg.
    """
    config = config or PreprocessingConfig()
    counts, nz = _leg_slice_counts(hu_volume, config, chunk_slices)
    return _centred_window(counts, nz, config)


def network_window(hu_volume: np.ndarray, config: PreprocessingConfig | None = None,
                   chunk_slices: int = 16) -> tuple[CropBox, PreprocessingConfig]:
    """The part of a scan the network sees, and the preprocessing that gives its input.

    With ``config.input_fit == "field"`` this is :func:`crop_box_for_scan`'s window and
    ``config`` itself. With ``"leg"`` the window is narrowed to the leg's extent (pixels above
    ``leg_threshold_hu`` in at least 5 % of the slices, isolated noise pixels removed, the
    largest connected part) by :func:`fit_window_to_leg`, at the same pixel size.

    Returns
    -------
    (CropBox, PreprocessingConfig)
        The window, and ``config`` with ``crop_yx``/``input_yx`` set to the window's size and
        the network input's size.
    """
    _, box, fitted = crop_and_network_windows(hu_volume, config, chunk_slices)
    return box, fitted


def crop_and_network_windows(hu_volume: np.ndarray, config: PreprocessingConfig | None = None,
                             chunk_slices: int = 16
                             ) -> tuple[CropBox, CropBox, PreprocessingConfig]:
    """:func:`crop_box_for_scan`'s window and :func:`network_window`'s, from one pass.

    Returns
    -------
    (CropBox, CropBox, PreprocessingConfig)
        The crop window, the part of it the network sees, and the preprocessing of that part.
    """
    config = config or PreprocessingConfig()
    counts, nz = _leg_slice_counts(hu_volume, config, chunk_slices)
    box = _centred_window(counts, nz, config)
    if config.input_fit == "field":
        return box, box, config
    return box, *fit_window_to_leg(box, _leg_extent(counts, nz), config)


def fit_window_to_leg(box: CropBox, leg_extent_yx: tuple[int, int, int, int] | None,
                      config: PreprocessingConfig) -> tuple[CropBox, PreprocessingConfig]:
    """Narrow a crop window to the leg, keeping the network's pixel size and pixel grid.

    Parameters
    ----------
    box:
        The scan's crop window (``config.crop_yx`` voxels, resized to ``config.input_yx``).
    leg_extent_yx:
        The leg's bounding box in scan voxels, ``(y0, y1, x0, x1)`` (ends exclusive); None if
        no leg was found.
    config:
        The preprocessing of ``box``.

    Returns
    -------
    (CropBox, PreprocessingConfig)
        A sub-window of ``box`` holding the leg plus ``config.leg_margin_px`` network pixels on
        each side (within ``box``), its network-input sides rounded up to
        ``config.input_multiple_px``, and the matching config. The sub-window starts on a
        network-pixel boundary of ``box``, so its input pixels sample the scan where
        ``box``'s do. ``box`` and ``config`` come back unchanged when there is no leg, when
        the window is not an integer multiple of the input (a scan resampled to the model's
        voxel size), or when the leg needs the whole window.
    """
    scales = [c // i for c, i in zip(config.crop_yx, config.input_yx, strict=True)]
    exact = all(s >= 1 and s * i == c for s, i, c in zip(scales, config.input_yx,
                                                         config.crop_yx, strict=True))
    if leg_extent_yx is None or not exact:
        return box, config
    y0, y1, x0, x1 = (int(v) for v in leg_extent_yx)
    fitted = [_fit_axis(start, first, stop, n_input, scale, config)
              for start, first, stop, n_input, scale in zip(
                  (box.y0, box.x0), (y0, x0), (y1, x1), config.input_yx, scales, strict=True)]
    if any(axis is None for axis in fitted):
        return box, config
    (start_y, n_y), (start_x, n_x) = fitted
    if (n_y, n_x) == tuple(config.input_yx):
        return box, config
    window = CropBox(y0=start_y, x0=start_x, height=n_y * scales[0], width=n_x * scales[1])
    return window, replace(config, crop_yx=window.shape, input_yx=(n_y, n_x))


def _fit_axis(start: int, first: int, stop: int, n_input: int, scale: int,
              config: PreprocessingConfig) -> tuple[int, int] | None:
    """Along one axis: the fitted window's first scan voxel and its network-input size."""
    lo = max((first - start) // scale - config.leg_margin_px, 0)
    hi = min(-(-(stop - start) // scale) + config.leg_margin_px, n_input)
    if hi <= lo:
        return None  # the leg lies outside the window (not expected: it is centred on it)
    multiple = config.input_multiple_px
    size = min(max(-(-(hi - lo) // multiple) * multiple, MIN_FITTED_INPUT_PX), n_input)
    lo = min(max(lo - (size - (hi - lo)) // 2, 0), n_input - size)  # the extra, both sides
    return start + lo * scale, size


#: The smallest network input a fitted window gets (pixels per axis): a SegFormer's first
#: stage reduces its attention keys by 8 x 8 on the quarter-resolution map, so a smaller input
#: cannot run (a tiny leg with a small ``input_multiple_px`` would give one).
MIN_FITTED_INPUT_PX = 32

#: Share of the slices a pixel must be above the leg threshold in to widen the leg's
#: extent: low, so a leg that moves or tapers along the scan stays inside the network's
#: input, yet a pixel of noise above the threshold in a slice or two does not count.
LEG_EXTENT_SLICE_FRACTION = 0.05


def _leg_slice_counts(hu_volume: Any, config: PreprocessingConfig,
                      chunk_slices: int) -> tuple[np.ndarray, int]:
    """Per pixel, the number of slices above ``leg_threshold_hu``; and the slice count."""
    volume = as_hu_volume(hu_volume)
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    volume = validate_volume(volume)
    nz, ny, nx = volume.shape
    counts = np.zeros((ny, nx), dtype=np.uint16 if nz < 65535 else np.uint32)
    for z0 in range(0, nz, chunk_slices):
        counts += (volume[z0:z0 + chunk_slices] > config.leg_threshold_hu).sum(
            axis=0, dtype=counts.dtype)
    return counts, nz


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    components, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _centred_window(counts: np.ndarray, nz: int, config: PreprocessingConfig) -> CropBox:
    """:func:`crop_box_for_scan`'s window from the per-pixel slice counts."""
    ny, nx = counts.shape
    footprint = counts >= max(1, math.ceil(config.leg_slice_fraction * nz))
    centre_y, centre_x = (ny - 1) / 2.0, (nx - 1) / 2.0
    if footprint.any():
        footprint = _largest_component(footprint)
        rows = np.flatnonzero(footprint.any(axis=1))
        cols = np.flatnonzero(footprint.any(axis=0))
        centre_y = (rows[0] + rows[-1]) / 2.0
        centre_x = (cols[0] + cols[-1]) / 2.0
    height, width = config.crop_yx
    # Window of even size h centred on c covers c - h/2 + 0.5 .. c + h/2 - 0.5.
    y0 = math.floor(centre_y - (height - 1) / 2.0 + 0.5)
    x0 = math.floor(centre_x - (width - 1) / 2.0 + 0.5)
    return CropBox(y0=y0, x0=x0, height=height, width=width)


def _leg_extent(counts: np.ndarray, nz: int) -> tuple[int, int, int, int] | None:
    """The leg's bounding box ``(y0, y1, x0, x1)`` (ends exclusive), or None if no leg."""
    from scipy import ndimage

    mask = counts >= max(1, math.ceil(LEG_EXTENT_SLICE_FRACTION * nz))
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
    if not mask.any():
        return None
    mask = _largest_component(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_slice(image_slice: np.ndarray, box: CropBox, fill_value: float,
               dtype: np.dtype | type | None = None) -> np.ndarray:
    """Cut ``box`` out of a 2D slice, filling the part outside the slice with ``fill_value``."""
    image_slice = np.asarray(image_slice)
    if image_slice.ndim != 2:
        raise InvalidScanError(f"Expected a 2D slice, got shape {image_slice.shape}")
    out = np.full(box.shape, fill_value, dtype=dtype or image_slice.dtype)
    src_y, src_x, dst_y, dst_x = box.overlap(image_slice.shape)
    out[dst_y, dst_x] = image_slice[src_y, src_x]
    return out


def preprocess_slices(hu_slices: np.ndarray, box: CropBox,
                      config: PreprocessingConfig | None = None):
    """Batched :func:`preprocess_slice`: ``[n, y, x]`` HU -> torch float32 ``[n, 1, H, W]``.

    Returns a torch tensor (the network's input); values lie in [0, 1].
    """
    import torch

    config = config or PreprocessingConfig()
    hu_slices = np.asarray(hu_slices)
    if hu_slices.ndim != 3:
        raise InvalidScanError(f"Expected slices [n, y, x], got shape {hu_slices.shape}")
    crops = np.empty((hu_slices.shape[0], 1, *box.shape), dtype=np.float32)
    for i, hu_slice in enumerate(hu_slices):
        crops[i, 0] = config.scale_hu(crop_slice(hu_slice, box, config.pad_hu, np.float32))
    batch = torch.from_numpy(crops)
    if tuple(box.shape) != tuple(config.input_yx):
        shrinking = any(c > i for c, i in zip(box.shape, config.input_yx, strict=True))
        batch = torch.nn.functional.interpolate(
            batch, size=config.input_yx, mode="bicubic", align_corners=False,
            antialias=config.antialias and shrinking)
        # Bicubic kernels overshoot at sharp edges; keep the promised [0, 1] range.
        batch.clamp_(0.0, 1.0)
    return batch


def torch_available() -> bool:
    """Whether torch can be imported (it is then imported: callers are about to use it)."""
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. a DLL that fails to load)
        return False
    return True


def preprocess_slices_numpy(hu_slices: np.ndarray, box: CropBox,
                            config: PreprocessingConfig | None = None) -> np.ndarray:
    """:func:`preprocess_slices` without torch: ``[n, y, x]`` HU -> float32 ``[n, 1, H, W]``.

    Used where torch is not installed (ONNX Runtime alone). The crop, clipping and scaling
    are the same operations as with torch (bit-identical); the antialiased bicubic resize
    uses torch's weights exactly but sums the taps in plain float32 order, which torch's
    compiled kernel does not quite do: about 15 % of the network's input pixels differ from
    torch's by 1-2 units in the last place (at most 3e-7). On the demo scan that changed one
    of 20 million network-class voxels. When torch is installed, the engine keeps using
    :func:`preprocess_slices`, so results with torch are unchanged.

    A crop smaller than the network input (a scan coarser than the model's voxel size) is
    enlarged with plain bicubic interpolation, as torch does without antialiasing, to float32
    rounding (~1e-7).
    """
    from HRpQCTSegmentationEngine._numpy_resize import resize_bicubic, resize_bicubic_antialias

    config = config or PreprocessingConfig()
    hu_slices = np.asarray(hu_slices)
    if hu_slices.ndim != 3:
        raise InvalidScanError(f"Expected slices [n, y, x], got shape {hu_slices.shape}")
    out = np.empty((hu_slices.shape[0], 1, *config.input_yx), dtype=np.float32)
    resize = tuple(box.shape) != tuple(config.input_yx)
    shrinking = any(c > i for c, i in zip(box.shape, config.input_yx, strict=True))
    resizer = resize_bicubic_antialias if config.antialias and shrinking else resize_bicubic
    for i, hu_slice in enumerate(hu_slices):
        crop = config.scale_hu(crop_slice(hu_slice, box, config.pad_hu, np.float32))
        if resize:
            # Bicubic kernels overshoot at sharp edges; keep the promised [0, 1] range.
            crop = np.clip(resizer(crop, config.input_yx), 0.0, 1.0)
        out[i, 0] = crop
    return out


def preprocess_slice(hu_slice: np.ndarray, box: CropBox,
                     config: PreprocessingConfig | None = None) -> np.ndarray:
    """One HU slice ``[y, x]`` -> network input ``[H, W]`` (float32 numpy, values in [0, 1]).

    Crop/pad to ``box``, clip and scale, resize bicubically to ``config.input_yx``.
    """
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2:
        raise InvalidScanError(f"Expected a 2D slice, got shape {hu_slice.shape}")
    return preprocess_slices(hu_slice[np.newaxis], box, config)[0, 0].numpy()


def labels_to_model_grid(label_slice: np.ndarray, box: CropBox,
                         config: PreprocessingConfig | None = None) -> np.ndarray:
    """A label slice brought to the network's input grid (for training targets).

    Same crop as the image (padding is background), then nearest-neighbour resampling to
    ``config.input_yx`` (pixel centres, ``nearest-exact``), so each label pixel sits under
    the image pixel it annotates. Returns ``uint8`` ``[H, W]``.
    """
    import torch

    config = config or PreprocessingConfig()
    cropped = crop_slice(np.asarray(label_slice), box, BACKGROUND.label, np.uint8)
    if tuple(box.shape) == tuple(config.input_yx):
        return cropped
    tensor = torch.from_numpy(cropped)[None, None].float()
    resized = torch.nn.functional.interpolate(tensor, size=config.input_yx,
                                              mode="nearest-exact")
    return resized[0, 0].to(torch.uint8).numpy()


def logits_to_labels_batch(logits_lowres, box: CropBox, original_shape_yx: tuple[int, int],
                           config: PreprocessingConfig | None = None) -> np.ndarray:
    """Batched :func:`logits_to_labels`: ``[n, C, h, w]`` logits -> ``[n, y, x]`` uint8.

    Torch tensors are upsampled with torch (on their device); numpy arrays with
    :func:`logits_to_labels_numpy` (no torch needed).
    """
    if isinstance(logits_lowres, np.ndarray):
        return logits_to_labels_numpy(logits_lowres, box, original_shape_yx)
    import torch

    logits = torch.as_tensor(logits_lowres)
    if logits.ndim != 4:
        raise ValueError(f"Expected logits [n, C, h, w], got shape {tuple(logits.shape)}")
    ny, nx = (int(s) for s in original_shape_yx)
    out = np.full((logits.shape[0], ny, nx), BACKGROUND.label, dtype=np.uint8)
    src_y, src_x, dst_y, dst_x = box.overlap((ny, nx))
    if src_y.stop <= src_y.start or src_x.stop <= src_x.start:
        return out
    for i in range(logits.shape[0]):  # one slice at a time bounds the full-size float map
        one = logits[i:i + 1].float()
        if tuple(one.shape[-2:]) != tuple(box.shape):
            one = torch.nn.functional.interpolate(one, size=box.shape, mode="bilinear",
                                                  align_corners=False)
        out[i, src_y, src_x] = _argmax_uint8(one[0, :, dst_y, dst_x]).cpu().numpy()
    return out


def logits_to_labels_numpy(logits_lowres: np.ndarray, box: CropBox,
                           original_shape_yx: tuple[int, int]) -> np.ndarray:
    """:func:`logits_to_labels_batch` with numpy only: ``[n, C, h, w]`` -> ``[n, y, x]``.

    Bilinear upsampling (``align_corners=False``) in torch's CPU arithmetic, fused
    multiply-adds included, so for the bundled model's geometry (200 x 200 logits, a
    1600 x 1600 crop) the scores, and hence the labels, are bit-identical to torch's on
    CPUs where torch uses FMA (x86-64 with AVX2, ARM64). Only the part of the crop inside
    the scan is computed.
    """
    from HRpQCTSegmentationEngine._numpy_resize import bilinear_upsample_rows_cols

    logits = np.asarray(logits_lowres, dtype=np.float32)
    if logits.ndim != 4:
        raise ValueError(f"Expected logits [n, C, h, w], got shape {logits.shape}")
    ny, nx = (int(s) for s in original_shape_yx)
    out = np.full((logits.shape[0], ny, nx), BACKGROUND.label, dtype=np.uint8)
    src_y, src_x, dst_y, dst_x = box.overlap((ny, nx))
    if src_y.stop <= src_y.start or src_x.stop <= src_x.start:
        return out
    for i in range(logits.shape[0]):
        best, labels = None, None
        for c in range(logits.shape[1]):  # one class at a time bounds the full-size maps
            score = bilinear_upsample_rows_cols(logits[i, c], box.shape, dst_y, dst_x)
            if best is None:
                best, labels = score, np.zeros(score.shape, dtype=np.uint8)
                continue
            labels[score > best] = c  # first maximum wins, as in _argmax_uint8
            np.maximum(best, score, out=best)
        out[i, src_y, src_x] = labels
    return out


def _argmax_uint8(scores):
    """Arg-max over the first axis of ``[C, H, W]`` as uint8 (first maximum wins, as in
    ``torch.argmax``). A running maximum is ~10x faster on the CPU than ``argmax(dim=0)``,
    which reduces over the slowest-varying axis."""
    import torch

    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best
        labels[better] = c
        torch.maximum(best, scores[c], out=best)
    return labels


def logits_to_labels(logits_lowres, box: CropBox, original_shape_yx: tuple[int, int],
                     config: PreprocessingConfig | None = None) -> np.ndarray:
    """Network logits ``[C, h, w]`` -> uint8 label slice of shape ``original_shape_yx``.

    The exact inverse of the forward geometry: upsample bilinearly (``align_corners=False``)
    to the crop size, take the arg-max over classes, write the crop back at ``box``; voxels
    of the slice outside the crop are background. ``config`` is accepted for symmetry with
    the forward functions (the geometry is fully given by ``box``).
    """
    import torch

    logits = torch.as_tensor(logits_lowres)
    if logits.ndim != 3:
        raise ValueError(f"Expected logits [C, h, w], got shape {tuple(logits.shape)}")
    return logits_to_labels_batch(logits[None], box, original_shape_yx, config)[0]
