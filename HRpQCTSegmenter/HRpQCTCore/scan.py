"""The in-memory scan: a 3D array in Hounsfield units plus its geometry and calibration.

Conventions (the whole engine follows them):

* ``Scan.hu`` is a 3D numpy array indexed ``[z, y, x]`` (slice, row, column) -- the order
  SimpleITK's ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return.
* ``spacing_mm`` is given in the same array-axis order ``(z, y, x)``, as scikit-image does.
* ``origin_mm`` and ``direction`` are physical, in ITK's LPS convention: ``origin_mm`` is the
  (x, y, z) position of voxel ``[0, 0, 0]``, and ``direction`` is the 3 x 3 matrix whose
  columns are the directions of the x, y and z index axes (SimpleITK's ``GetDirection``).

Units: HR-pQCT scanners store *native* values (scaled linear attenuation); Scanco's header
calibration converts them to HU and to density (mg HA/cm3). :class:`Calibration` holds those
constants and does the conversions; :func:`to_hu` turns any array in a known unit into HU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Units",
    "Calibration",
    "Scan",
    "XTREMECT2_VOXEL_MM",
    "XTREMECT1_VOXEL_MM",
    "DEFAULT_CALIBRATION",
    "to_hu",
    "from_hu",
]

#: Isotropic voxel size of Scanco XtremeCT II (second generation), in mm.
XTREMECT2_VOXEL_MM = 0.0607
#: Isotropic voxel size of Scanco XtremeCT (first generation), in mm.
XTREMECT1_VOXEL_MM = 0.082


class Units(str, Enum):
    """Units a scan's grey values can be in."""

    HU = "hu"
    NATIVE = "native"  # Scanco scaled attenuation (integer, air = 0)
    DENSITY = "density"  # mg HA / cm3

    @classmethod
    def parse(cls, value: str | Units) -> Units:
        """Parse ``"hu"``, ``"native"`` or ``"density"`` (case-insensitive)."""
        if isinstance(value, Units):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(
                f"Unknown units {value!r}: use one of {', '.join(u.value for u in cls)}"
            ) from None


@dataclass(frozen=True)
class Calibration:
    """Scanco grey-value calibration, as found in AIM/ISQ headers.

    Attributes
    ----------
    mu_scaling:
        Integer scaling of the linear attenuation coefficient (native = mu * mu_scaling * 1 cm).
    mu_water:
        Linear attenuation of water in 1/cm at the scanner's effective energy.
    density_slope, density_intercept:
        ``density [mg HA/cm3] = native * density_slope / mu_scaling + density_intercept``.
    source:
        Where the constants came from (``"header"``, ``"user"`` or ``"default"``), so reports
        can say whether the numbers are the scanner's own.
    """

    mu_scaling: float = 8192.0
    mu_water: float = 0.2409
    density_slope: float = 1603.51904
    density_intercept: float = -391.209015
    source: str = "default"

    def __post_init__(self) -> None:
        for name in ("mu_scaling", "mu_water", "density_slope"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Calibration {name} must be a positive number, got {value!r}")
        if not math.isfinite(self.density_intercept):
            raise ValueError("Calibration density_intercept must be finite")

    # --- native <-> HU ------------------------------------------------------------------
    @property
    def hu_per_native(self) -> float:
        """Slope of the native -> HU conversion."""
        return 1000.0 / (self.mu_water * self.mu_scaling)

    def native_to_hu(self, native: np.ndarray) -> np.ndarray:
        """``HU = native * 1000 / (mu_water * mu_scaling) - 1000`` (float32 out)."""
        return _affine(native, self.hu_per_native, -1000.0)

    def hu_to_native(self, hu: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`native_to_hu` (float32 out; round yourself if storing ints)."""
        return _affine(hu, 1.0 / self.hu_per_native, 1000.0 / self.hu_per_native)

    # --- native <-> density -------------------------------------------------------------
    def native_to_density(self, native: np.ndarray) -> np.ndarray:
        """``density = native * slope / mu_scaling + intercept`` in mg HA/cm3."""
        return _affine(native, self.density_slope / self.mu_scaling, self.density_intercept)

    def density_to_native(self, density: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`native_to_density`."""
        a = self.mu_scaling / self.density_slope
        return _affine(density, a, -self.density_intercept * a)

    # --- HU <-> density (through native) ------------------------------------------------
    def hu_to_density(self, hu: np.ndarray) -> np.ndarray:
        """Convert HU to mg HA/cm3 through the native scale (one affine map, no copy chain)."""
        a_n, b_n = 1.0 / self.hu_per_native, 1000.0 / self.hu_per_native
        a_d, b_d = self.density_slope / self.mu_scaling, self.density_intercept
        return _affine(hu, a_d * a_n, a_d * b_n + b_d)

    def density_to_hu(self, density: np.ndarray) -> np.ndarray:
        """Convert mg HA/cm3 to HU through the native scale."""
        a_n = self.mu_scaling / self.density_slope
        b_n = -self.density_intercept * a_n
        return _affine(density, self.hu_per_native * a_n, self.hu_per_native * b_n - 1000.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for metadata, reports and provenance)."""
        return {
            "mu_scaling": self.mu_scaling,
            "mu_water": self.mu_water,
            "density_slope": self.density_slope,
            "density_intercept": self.density_intercept,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        keys = ("mu_scaling", "mu_water", "density_slope", "density_intercept", "source")
        return cls(**{k: data[k] for k in keys if k in data})


#: Typical XtremeCT II calibration; used only when the user asks for it explicitly.
DEFAULT_CALIBRATION = Calibration()


def _affine(values: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Return ``values * scale + offset`` as float32 without a float64 temporary."""
    out = np.asarray(values, dtype=np.float32).copy() if np.ndim(values) else np.float32(values)
    if np.ndim(out):
        out *= np.float32(scale)
        out += np.float32(offset)
        return out
    return np.float32(float(values) * scale + offset)


def to_hu(values: np.ndarray, units: Units | str, calibration: Calibration | None) -> np.ndarray:
    """Convert ``values`` in ``units`` to HU.

    Raises
    ------
    ValueError
        If ``units`` is native or density and no calibration is given.
    """
    units = Units.parse(units)
    if units is Units.HU:
        return np.asarray(values, dtype=np.float32)
    if calibration is None:
        raise ValueError(
            f"The scan is in {units.value} units and carries no calibration, so it cannot be "
            "converted to HU. Pass the scanner's calibration (mu_scaling, mu_water, density "
            "slope/intercept; e.g. --mu-scaling/--mu-water on the command line), or declare the "
            "data as HU if it already is."
        )
    if units is Units.NATIVE:
        return calibration.native_to_hu(values)
    return calibration.density_to_hu(values)


def from_hu(hu: np.ndarray, units: Units | str, calibration: Calibration | None) -> np.ndarray:
    """Convert HU to ``units`` (inverse of :func:`to_hu`)."""
    units = Units.parse(units)
    if units is Units.HU:
        return np.asarray(hu, dtype=np.float32)
    if calibration is None:
        raise ValueError(f"Converting HU to {units.value} needs a calibration")
    if units is Units.NATIVE:
        return calibration.hu_to_native(hu)
    return calibration.hu_to_density(hu)


@dataclass
class Scan:
    """A 3D HR-pQCT scan in HU with its geometry.

    Attributes
    ----------
    hu:
        Grey values in HU, shape ``(z, y, x)``: a float32 array, or (files stored as 16-bit
        integers) a :class:`~HRpQCTCore.hu_volume.StoredHUVolume` that keeps the integers and
        gives the same float32 HU wherever it is read, in half the memory. Read it a slice,
        slab or box at a time (``hu[z]``, ``hu[z0:z1]``); ``numpy.asarray(hu)`` converts all.
    spacing_mm:
        Voxel size per array axis ``(z, y, x)`` in mm.
    origin_mm:
        Physical LPS position ``(x, y, z)`` of voxel ``[0, 0, 0]`` in mm.
    direction:
        3 x 3 direction cosines (columns: x, y, z index axes), row-major tuple of 9.
    calibration:
        The calibration used or found, or ``None`` when the file was already in HU.
    metadata:
        Non-identifying facts about the acquisition (scanner, units on disk, source format,
        processing log excerpt). Patient identifiers are never stored here.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    calibration: Calibration | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(
                f"A scan must be a 3D volume; got {self.hu.ndim}D data of shape {self.hu.shape}")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        self.origin_mm = tuple(float(o) for o in self.origin_mm)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)
        if len(self.spacing_mm) != 3 or any(not (s > 0 and math.isfinite(s))
                                            for s in self.spacing_mm):
            raise ValueError(f"Spacing must be three positive numbers, got {self.spacing_mm}")
        if len(self.direction) != 9:
            raise ValueError("direction must hold 9 numbers (a 3 x 3 matrix, row-major)")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        """Number of axial slices."""
        return int(self.hu.shape[0])

    def with_array(self, array: np.ndarray) -> Scan:
        """A scan with the same geometry and metadata but other voxel values."""
        if array.shape != self.hu.shape:
            raise ValueError(f"Array shape {array.shape} differs from the scan's {self.hu.shape}")
        return replace(self, hu=array, metadata=dict(self.metadata))

    # --- SimpleITK bridge ---------------------------------------------------------------
    def to_sitk(self, array: np.ndarray | None = None):
        """Return a SimpleITK image with this scan's geometry (``array`` defaults to ``hu``)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.hu if array is None else array)
        img.SetSpacing(tuple(reversed(self.spacing_mm)))
        img.SetOrigin(self.origin_mm)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, image, calibration: Calibration | None = None,
                  metadata: dict[str, Any] | None = None) -> Scan:
        """Build a scan from a SimpleITK image whose voxels are already HU."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError(
                f"A scan must be a 3D volume; got a {image.GetDimension()}D image "
                f"of size {image.GetSize()}")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"A scan must have one value per voxel; got "
                f"{image.GetNumberOfComponentsPerPixel()} components (a 4D or colour image?)")
        array = sitk.GetArrayFromImage(image)
        return cls(
            hu=array,
            spacing_mm=tuple(reversed(image.GetSpacing())),
            origin_mm=image.GetOrigin(),
            direction=image.GetDirection(),
            calibration=calibration,
            metadata=dict(metadata or {}),
        )
