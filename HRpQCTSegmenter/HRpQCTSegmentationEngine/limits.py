"""Checks made before a segmentation starts: the device exists, the memory suffices.

Both fail late and with a traceback otherwise: ``--device cuda`` on a machine without CUDA
deep inside torch's model transfer, and a nonsensical voxel size (1e-9 mm) in post-processing,
whose structuring elements are sized in mm and so grow as ``(width / voxel size)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields

from HRpQCTCore.errors import HRpQCTError, InvalidScanError
from HRpQCTCore.memory import require_memory

__all__ = ["check_device", "postprocess_memory_bytes", "require_segmentation_memory"]

#: Bytes per voxel that post-processing keeps besides the scan: the cleaned classes, the
#: regions, the rings (uint8 each) and slack for per-slice work arrays.
_POSTPROCESS_BYTES_PER_VOXEL = 4
#: Bytes per voxel of the network's labels and per-slice confidence buffers.
_SEGMENTATION_BYTES_PER_VOXEL = 2
#: Bytes per structuring-element pixel: float64 offset tables and their temporaries.
_KERNEL_BYTES_PER_PIXEL = 24


def _device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used here (None: it can)."""
    if name in ("auto", "cpu"):
        return None
    try:
        import torch
    except ImportError:
        return "it needs PyTorch, which is not installed (only the CPU is available here)"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "it is not a device name"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ("CUDA is not available (PyTorch was built without CUDA, or no NVIDIA GPU "
                    "and driver is visible)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"there are only {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "Apple MPS is not available on this machine"
    elif device.type != "cpu":
        return f"devices of type {device.type!r} are not supported"
    return None


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` value this machine cannot use, before any work starts.

    Raises
    ------
    HRpQCTError
        (exit code 2) naming the device, why it cannot be used, and the alternatives.
    """
    name = str(device or "auto").strip().lower()
    problem = _device_problem(name)
    if problem:
        raise HRpQCTError(
            f"Cannot use --device {device}: {problem}. Use --device cpu (or auto, which picks "
            "a GPU only when one is usable).")


def _widest_mm(config) -> float:
    """The largest distance (mm) any post-processing step of ``config`` works over."""
    widths = [float(getattr(config, f.name)) for f in fields(config)
              if f.name.endswith("_mm") and isinstance(getattr(config, f.name), (int, float))]
    widths += [float(r) for r in getattr(config, "ring_radii_mm", ())]
    return max([w for w in widths if math.isfinite(w)] or [0.0])


def postprocess_memory_bytes(shape: Sequence[int], spacing_mm: Sequence[float],
                             config=None) -> float:
    """Estimated memory (bytes) post-processing needs beyond the scan itself.

    Parameters
    ----------
    shape:
        ``(z, y, x)`` of the volume.
    spacing_mm:
        Voxel size ``(z, y, x)``.
    config:
        A :class:`~HRpQCTSegmentationEngine.postprocess.PostprocessConfig` (default: the
        default preset).
    """
    config = config or _default()
    pixel = min(float(spacing_mm[1]), float(spacing_mm[2]))
    kernel_px = _widest_mm(config) / pixel + 2 if pixel > 0 else math.inf
    return (_POSTPROCESS_BYTES_PER_VOXEL * math.prod(int(n) for n in shape)
            + _KERNEL_BYTES_PER_PIXEL * kernel_px * kernel_px)


def require_segmentation_memory(shape: Sequence[int], spacing_mm: Sequence[float],
                                config=None, *, segment: bool = True,
                                available: int | None = None) -> None:
    """Refuse a segmentation (and post-processing) that cannot fit in memory, with numbers.

    Parameters
    ----------
    shape, spacing_mm, config:
        As :func:`postprocess_memory_bytes`.
    segment:
        Count the network's label buffers too (False: post-processing of given classes).
    available:
        Memory available in bytes (default: measured); for tests.

    Raises
    ------
    InvalidScanError
        (exit code 4) when the estimate exceeds the memory available: usually a voxel size
        that is wrong in the file.
    """
    config = config or _default()
    needed = postprocess_memory_bytes(shape, spacing_mm, config)
    if segment:
        needed += _SEGMENTATION_BYTES_PER_VOXEL * math.prod(int(n) for n in shape)
    voxel = " x ".join(f"{s:g}" for s in spacing_mm)
    require_memory(
        needed, f"post-processing a scan of {' x '.join(str(n) for n in shape)} voxels of "
        f"{voxel} mm (its mm-sized steps span {_widest_mm(config):g} mm)",
        "Check the scan's voxel size (HR-pQCT: 0.0607 mm); if the file's is wrong, export the "
        "scan again or resample it (`hrpqct convert IN OUT --resample-mm 0.0607`).",
        error=InvalidScanError, available=available)


def _default():
    """The default post-processing settings (imported late: the package imports scipy)."""
    from HRpQCTSegmentationEngine.postprocess import DEFAULT

    return DEFAULT
