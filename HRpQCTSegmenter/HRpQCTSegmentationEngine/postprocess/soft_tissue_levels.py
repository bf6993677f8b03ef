"""The scan's own soft-tissue levels, motion streaks and slow HU drifts in soft tissue.

HR-pQCT's HU scale is calibrated for bone, not for soft tissue: between scanners the fat and
muscle levels move by 100 HU or more, and motion adds streaks and broad bright or dark bands
whose amplitude is as large as the fat-muscle contrast (~150 HU). Fixed HU thresholds then
label artefacts, not tissue. Three remedies, each switchable in
:class:`.config.PostprocessConfig` and measured in ``benchmarks/RESULTS.md``:

* :func:`suppress_streaks` -- motion streaks are parallel lines within a narrow fan of
  directions (the directions of the inconsistent projections), so in the slice's 2D spectrum
  they are excess power in a narrow sector of orientations. Per ring of spatial frequencies,
  orientations whose power exceeds ``threshold`` times the median over all orientations are
  scaled back to the median (a spectral equaliser); tissue, whose texture has no such narrow
  sector, passes unchanged, and a still scan is left as it is.
* :func:`estimate_levels` -- the fat and muscle levels from the histogram of the local-mean HU
  of the scan's inner soft tissue; the split lies between them (``split_fraction``).
* :func:`correct_drift` -- what remains is a slow drift (broad motion bands, beam hardening):
  the mean residual against the level of each voxel's tissue, over a window of a few mm, is
  subtracted before the split is applied again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import pairwise

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage as ndi

__all__ = ["SoftTissueLevels", "suppress_streaks", "estimate_levels", "correct_drift",
           "NOMINAL_FAT_HU", "NOMINAL_MUSCLE_HU"]

#: Clinical CT levels of fat and muscle: the reference for mapping HU windows onto a scan's
#: own levels.
NOMINAL_FAT_HU = -100.0
NOMINAL_MUSCLE_HU = 50.0

#: Rings of spatial frequency (cycles/mm) in which streak orientations are looked for. Below
#: 0.2 cycles/mm (structures over 5 mm) the leg's own anatomy is anisotropic (elongated
#: muscle bellies), so the equaliser would remove tissue there.
STREAK_RINGS_PER_MM = (0.2, 0.5, 1.0, 2.0, 4.0)
#: Orientation smoothing of the power spectrum, in degrees each side.
STREAK_SMOOTHING_DEG = 3
#: An orientation is a streak direction when its power exceeds this multiple of the median.
STREAK_THRESHOLD = 2.0
#: Fewer soft-tissue pixels than this in a slice: nothing to equalise.
_MIN_PIXELS = 1000

#: Plausible fat-to-muscle contrast (HU) of a scan's histogram; outside it the histogram is
#: taken to show one tissue only, and the fixed split is used (the levels say so).
CONTRAST_RANGE_HU = (60.0, 400.0)
#: The muscle peak is looked for this far above the fat peak: past the tail of the fat
#: peak's local means (their SD is 15-35 HU at HR-pQCT noise).
MUSCLE_SEARCH_ABOVE_FAT_HU = 80.0


@dataclass(frozen=True)
class SoftTissueLevels:
    """Fat and muscle levels of one scan and the myotendinous/adipose split between them.

    Attributes
    ----------
    fat_hu, muscle_hu:
        Levels of the two tissues (HU of the local mean).
    split_hu:
        Local-mean HU above which soft tissue is myotendinous.
    source:
        ``"histogram"`` (both levels found), ``"one peak"`` (the histogram shows a single
        tissue, which could be fat or muscle: the configured ``split_hu`` is used) or
        ``"fixed"`` (the configured ``split_hu``, by choice).
    """

    fat_hu: float
    muscle_hu: float
    split_hu: float
    source: str

    def to_scan_hu(self, nominal_hu: float) -> float:
        """Map a clinical HU value (fat -100, muscle +50) onto this scan's levels."""
        scale = (self.muscle_hu - self.fat_hu) / (NOMINAL_MUSCLE_HU - NOMINAL_FAT_HU)
        return self.fat_hu + (nominal_hu - NOMINAL_FAT_HU) * scale

    def describe(self) -> str:
        if self.source == "fixed":
            return f"soft-tissue split at {self.split_hu:.0f} HU (fixed)"
        if self.source == "one peak":
            return (f"soft-tissue split at {self.split_hu:.0f} HU (fixed): the soft tissue's "
                    "histogram shows one tissue only, so the scan's own fat and muscle levels "
                    "could not be found; check the split if the scanner's soft-tissue "
                    "calibration differs")
        text = (f"soft-tissue split at {self.split_hu:.0f} HU between the scan's fat "
                f"({self.fat_hu:.0f} HU) and muscle ({self.muscle_hu:.0f} HU) levels")
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_levels(split_hu: float) -> SoftTissueLevels:
    """Levels for the paper's rule: a fixed split, nominal tissue levels."""
    return SoftTissueLevels(NOMINAL_FAT_HU, NOMINAL_MUSCLE_HU, float(split_hu), "fixed")


# --- streaks -----------------------------------------------------------------------------

def _orientation_grid(shape: tuple[int, int], voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Radius (cycles/mm) and orientation (whole degrees, 0..179) of each rfft2 coefficient."""
    ky = sp_fft.fftfreq(shape[0], voxel_mm).astype(np.float32)[:, None]
    kx = sp_fft.rfftfreq(shape[1], voxel_mm).astype(np.float32)[None, :]
    radius = np.hypot(ky, kx)
    degrees = np.degrees(np.arctan2(ky, kx)) % 180.0
    return radius, np.minimum(degrees.astype(np.int32), 179)


def _circular_mean(values: np.ndarray, half_width: int) -> np.ndarray:
    if half_width <= 0:
        return values
    padded = np.concatenate([values[-half_width:], values, values[:half_width]])
    kernel = np.full(2 * half_width + 1, 1.0 / (2 * half_width + 1))
    return np.convolve(padded, kernel, mode="valid")


def _streak_gain(power: np.ndarray, radius: np.ndarray, degrees: np.ndarray,
                 threshold: float) -> np.ndarray | None:
    """Per-coefficient gain that brings streak orientations back to the median power."""
    gain = None
    for low, high in pairwise(STREAK_RINGS_PER_MM):
        ring = (radius >= low) & (radius < high)
        angles = degrees[ring]
        if angles.size < 180:
            continue
        counts = np.bincount(angles, minlength=180)
        mean = np.bincount(angles, weights=power[ring], minlength=180) / np.maximum(counts, 1)
        mean = _circular_mean(mean, STREAK_SMOOTHING_DEG)
        median = np.median(mean)
        if median <= 0:
            continue
        ratio = mean / median
        if not (ratio > threshold).any():
            continue
        per_angle = np.where(ratio > threshold, 1.0 / ratio, 1.0).astype(np.float32)
        if gain is None:
            gain = np.ones(power.shape, np.float32)
        gain[ring] = per_angle[angles]
    return gain


def _half_resolution(image: np.ndarray) -> np.ndarray:
    """2 x 2 block means (an odd last row or column is dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _streak_component(image: np.ndarray, voxel_mm: float, threshold: float) -> np.ndarray | None:
    """The streak part of a zero-mean image (float32, its shape), or None when it has none.

    Computed at half resolution -- the streak rings end at 4 cycles/mm, the Nyquist limit of
    2 x 60.7 um -- and on a zero-padded grid of fast FFT sizes: 10-15x faster than the full
    slice at its own size (leg boxes have sizes like 1159 = 19 x 61).
    """
    small = _half_resolution(image)
    fast = (sp_fft.next_fast_len(small.shape[0], real=True),
            sp_fft.next_fast_len(small.shape[1], real=True))
    spectrum = sp_fft.rfft2(small, s=fast)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    radius, degrees = _orientation_grid(fast, 2.0 * voxel_mm)
    gain = _streak_gain(power, radius, degrees, threshold)
    if gain is None:
        return None
    spectrum *= 1.0 - np.sqrt(gain)  # gain is for power; the removed amplitude is 1 - sqrt
    removed = sp_fft.irfft2(spectrum, s=fast)[: small.shape[0], : small.shape[1]]
    full = np.zeros(image.shape, np.float32)
    up = np.repeat(np.repeat(removed.astype(np.float32), 2, axis=0), 2, axis=1)
    full[: up.shape[0], : up.shape[1]] = up
    return full


def suppress_streaks(hu2d: np.ndarray, soft2d: np.ndarray, voxel_mm: float,
                     threshold: float = STREAK_THRESHOLD) -> np.ndarray:
    """HU of one slice with motion streaks in its soft tissue scaled back (float32 copy).

    Only soft-tissue pixels change. Bone and air are replaced by the soft tissue's median
    before the transform, so their edges add no power; a slice without a streak sector comes
    back unchanged (bit for bit, as float32).

    Parameters
    ----------
    hu2d:
        One slice (or a box of it) in HU.
    soft2d:
        Its soft-tissue mask.
    voxel_mm:
        In-plane pixel size (square pixels assumed; the mean of the two is fine for
        near-square ones).
    """
    out = np.array(hu2d, dtype=np.float32)
    if np.count_nonzero(soft2d) < _MIN_PIXELS:
        return out
    ys = np.flatnonzero(soft2d.any(axis=1))
    xs = np.flatnonzero(soft2d.any(axis=0))
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    soft = soft2d[box]
    image = out[box].copy()
    level = np.float32(np.median(image[soft]))
    image[~soft] = level
    image -= level
    streaks = _streak_component(image, voxel_mm, threshold)
    if streaks is not None:
        view = out[box]
        view[soft] -= streaks[soft]
    return out


# --- levels ------------------------------------------------------------------------------

def _mode(values: np.ndarray, bin_hu: float = 4.0, smooth_hu: float = 10.0) -> float:
    low, high = np.percentile(values, [0.5, 99.5])
    if high - low < bin_hu:
        return float(np.median(values))
    edges = np.arange(low, high + bin_hu, bin_hu)
    counts, _ = np.histogram(values, bins=edges)
    counts = ndi.gaussian_filter1d(counts.astype(np.float64), smooth_hu / bin_hu)
    k = int(np.argmax(counts))
    return float((edges[k] + edges[k + 1]) / 2)


def estimate_levels(values: np.ndarray, split_fraction: float = 0.5,
                    fallback_split_hu: float = -50.0) -> SoftTissueLevels:
    """Fat and muscle levels from local-mean HU of a scan's inner soft tissue.

    Fat is the strongest peak of the lower part of the histogram; muscle (with tendon) the
    median of what lies clearly above fat (``MUSCLE_SEARCH_ABOVE_FAT_HU`` beyond the fat peak,
    where the tail of the fat peak has died out). A peak for fat, so that partial-volume
    voxels and streak residue do not move it; a median for muscle, whose histogram has two
    peaks (muscle and tendon) of varying weight, so that it does not jump between them.

    Parameters
    ----------
    values:
        Local-mean HU of soft-tissue voxels outside the skin band (any order; a sample does).
    split_fraction:
        Where the split lies between fat (0) and muscle (1).
    fallback_split_hu:
        The split when the histogram shows a single tissue (no plausible contrast between
        its low peak and what lies above it).
    """
    values = np.asarray(values, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size < 100:
        raise ValueError("Too few soft-tissue voxels to estimate the fat and muscle levels")
    # fat: the mode of the lower part (a leg with much muscle could otherwise peak at muscle)
    lower = values[values <= np.percentile(values, 60)]
    fat = _mode(lower)
    above = values[values > fat + MUSCLE_SEARCH_ABOVE_FAT_HU]
    muscle = float(np.median(above)) if above.size >= max(100, values.size // 50) else np.nan
    if not (CONTRAST_RANGE_HU[0] <= muscle - fat <= CONTRAST_RANGE_HU[1]):
        return SoftTissueLevels(NOMINAL_FAT_HU, NOMINAL_MUSCLE_HU, float(fallback_split_hu),
                                "one peak")
    split = fat + split_fraction * (muscle - fat)
    return SoftTissueLevels(float(fat), float(muscle), float(split), "histogram")


# --- slow drift --------------------------------------------------------------------------

def correct_drift(hu2d: np.ndarray, inner2d: np.ndarray, levels: SoftTissueLevels,
                  window_px: tuple[int, int], iterations: int = 2) -> np.ndarray:
    """Local-mean HU of one slice with its slow drift against the tissue levels removed.

    Each voxel's residual against the level of the tissue it is assigned to (by the split),
    averaged over a ``window_px`` box of inner soft tissue, is the drift; it is subtracted and
    the assignment repeated ``iterations`` times. A uniform offset of the whole slice is
    removed too, so the levels must come from the same (uncorrected) values.

    Returns float32; pixels outside ``inner2d`` keep their values.
    """
    out = np.array(hu2d, dtype=np.float32)
    if not inner2d.any():
        return out
    weight = inner2d.astype(np.float32)
    den = ndi.uniform_filter(weight, window_px, mode="constant")
    have = inner2d & (den > 0.05)
    fat, muscle = np.float32(levels.fat_hu), np.float32(levels.muscle_hu)
    for _ in range(iterations):
        residual = np.where(out > levels.split_hu, out - muscle, out - fat)
        residual[~inner2d] = 0
        drift = ndi.uniform_filter(residual, window_px, mode="constant")
        np.divide(drift, den, out=drift, where=have)
        out[have] -= drift[have]
    return out
