"""A scan's HU kept as the integers it was stored in, converted where they are read.

HR-pQCT scans are stored as 16-bit integers (Scanco native values, or int16 HU): a full
168 x 1600 x 1600 scan is 0.8 GiB as stored and 1.6 GiB as float32 HU. Every step of the
pipeline reads the scan a slice, a slab or a box at a time, so it never needs the whole
float32 volume: :class:`StoredHUVolume` holds the stored integers and converts exactly what
is indexed. The conversion (a cast, then a float32 affine map: :mod:`HRpQCTCore.scan`) works
voxel by voxel, so every value read is bit-identical to the same voxel of the whole volume
converted at once.

It behaves as a read-only float32 array wherever that can be done without converting the
whole volume: ``shape``, ``ndim``, ``dtype``, ``len``, iteration over slices, ``min`` and
``max``, and indexing: an index that keeps all three axes as a plain view (``hu[z0:z1]``,
``hu[box]`` with slices) gives another :class:`StoredHUVolume`; any other index (a slice
``hu[z]``, a list of slices, a mask) gives a float32 ``numpy.ndarray``. Everything else
(``numpy.asarray``, arithmetic, other array methods) converts the whole volume first, as a
float32 array would have been to begin with: correct, only without the memory saving (logged
at debug level, so that a step that should stream can be found).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__all__ = ["StoredHUVolume", "as_hu_volume", "keeps_stored"]

log = logging.getLogger(__name__)

#: Slices converted at once when the whole volume is converted (bounded temporaries).
_CONVERT_SLICES = 8


class StoredHUVolume(NDArrayOperatorsMixin):
    """Read-only HU volume ``[z, y, x]``: stored integers, float32 HU where indexed.

    Parameters
    ----------
    stored:
        The voxels as stored, an integer array ``[z, y, x]`` (kept, not copied).
    to_hu:
        Voxel-wise conversion of stored values to float32 HU (e.g.
        :meth:`~HRpQCTCore.scan.Calibration.native_to_hu`); must be picklable for the volume
        to be sent to another process.
    """

    __slots__ = ("_part", "_stored", "_to_hu")

    def __init__(self, stored: np.ndarray, to_hu: Callable[[np.ndarray], np.ndarray], *,
                 _part: bool = False) -> None:
        if not isinstance(stored, np.ndarray) or not np.issubdtype(stored.dtype, np.integer):
            raise TypeError("StoredHUVolume keeps an integer numpy array")
        if stored.ndim != 3:
            raise ValueError(f"StoredHUVolume holds a 3D volume, got shape {stored.shape}")
        self._stored = stored
        self._to_hu = to_hu
        self._part = _part  # a view of another stored volume (a slab, a box)

    # --- what an array says about itself ---------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)``."""
        return tuple(self._stored.shape)  # type: ignore[return-value]

    @property
    def ndim(self) -> int:
        """Always 3."""
        return 3

    @property
    def size(self) -> int:
        """Number of voxels."""
        return int(self._stored.size)

    @property
    def dtype(self) -> np.dtype:
        """float32: the type of every value read."""
        return np.dtype(np.float32)

    @property
    def stored(self) -> np.ndarray:
        """The stored integers (read-only view)."""
        view = self._stored.view()
        view.flags.writeable = False
        return view

    @property
    def stored_nbytes(self) -> int:
        """Bytes held (the stored integers); a float32 volume would hold ``4 * size``."""
        return int(self._stored.nbytes)

    def __len__(self) -> int:
        return int(self._stored.shape[0])

    def __repr__(self) -> str:
        return (f"StoredHUVolume(shape={self.shape}, stored as {self._stored.dtype}, "
                f"{self.stored_nbytes / 2**30:.2f} GiB)")

    # --- reading ------------------------------------------------------------------------
    def _convert(self, stored: np.ndarray) -> np.ndarray:
        return np.asarray(self._to_hu(stored), dtype=np.float32)

    def __getitem__(self, key: Any) -> StoredHUVolume | np.ndarray:
        part = self._stored[key]
        if part.ndim == 3 and np.may_share_memory(part, self._stored):
            return StoredHUVolume(part, self._to_hu, _part=True)  # every axis kept: still lazy
        return self._convert(part)

    def __iter__(self) -> Iterator[np.ndarray]:
        for z in range(len(self)):
            yield self._convert(self._stored[z])

    def _reduce(self, name: str, axis: Any, kwargs: dict[str, Any]) -> Any:
        if axis is None and not {k: v for k, v in kwargs.items() if v is not None}:
            reduce = min if name == "min" else max
            return np.float32(reduce(getattr(self._convert(plane), name)()
                                     for plane in self._stored))
        return getattr(self.__array__(), name)(axis=axis, **kwargs)

    def min(self, axis: Any = None, **kwargs: Any) -> Any:
        """Smallest HU (slice by slice for the whole volume; else as numpy)."""
        return self._reduce("min", axis, kwargs)

    def max(self, axis: Any = None, **kwargs: Any) -> Any:
        """Largest HU (slice by slice for the whole volume; else as numpy)."""
        return self._reduce("max", axis, kwargs)

    # --- everything else: as the whole float32 volume -----------------------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("A StoredHUVolume cannot give its HU without converting them")
        if not self._part:  # a slab or a box is what streaming reads; the whole is not
            log.debug("converting the whole stored volume %s to float32 HU", self.shape)
        out = np.empty(self.shape, dtype=np.float32)
        for z0 in range(0, len(self), _CONVERT_SLICES):
            z1 = min(len(self), z0 + _CONVERT_SLICES)
            out[z0:z1] = self._convert(self._stored[z0:z1])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(np.asarray(x) if isinstance(x, StoredHUVolume) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) if isinstance(x, StoredHUVolume) else x
                                  for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # only what an ndarray has: ``getattr(volume, "hu", volume)`` must not convert it
        if name.startswith("__") or name in StoredHUVolume.__slots__ \
                or not hasattr(np.ndarray, name):
            raise AttributeError(name)
        return getattr(self.__array__(), name)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("A scan's HU volume is read-only; make a float32 copy to change it "
                        "(numpy.asarray(scan.hu))")

    def __reduce__(self):
        return (StoredHUVolume, (self._stored, self._to_hu))


def keeps_stored(dtype: Any) -> bool:
    """Whether voxels of ``dtype`` are kept as stored: integers of up to 16 bits."""
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2)


def as_hu_volume(volume: Any) -> np.ndarray | StoredHUVolume:
    """``volume`` as something indexable slice by slice: a stored volume as it is (no whole
    conversion), anything else through ``numpy.asarray``."""
    return volume if isinstance(volume, StoredHUVolume) else np.asarray(volume)
