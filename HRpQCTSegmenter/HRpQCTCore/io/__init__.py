"""Scan input/output: every format users bring, read into a :class:`~..scan.Scan` in HU.

Public API
----------
* :func:`read_scan` -- Scanco AIM/ISQ, NIfTI, NRRD, MetaImage, DICOM series -> Scan (float32 HU).
* :func:`write_scan` -- Scan -> NIfTI/NRRD/MetaImage (float32 or int16 HU).
* :func:`write_label_map` -- uint8 labels with a reference scan's geometry.
* :func:`write_scan_aim` -- Scan -> Scanco AIM (int16 native + calibration).
* :func:`resample_to_spacing` -- linear resampling to a voxel size.
* :func:`detect_format`, :func:`hu_plausibility`, :func:`spacing_warning` -- the checks
  :func:`read_scan` applies, for callers that want them separately.

Slicer ``.seg.nrrd`` files: :mod:`.segnrrd`. Scanco library details: :mod:`.scanco`.
Heavy libraries (SimpleITK, aimio-py) are imported only when a function needs them.
"""

from HRpQCTCore.io.readers import (
    HU_AIR_RANGE,
    HU_MAX_PLAUSIBLE,
    SCAN_EXTENSIONS,
    detect_format,
    hu_plausibility,
    read_scan,
    spacing_warning,
)
from HRpQCTCore.io.resample import resample_to_spacing
from HRpQCTCore.io.writers import (
    WRITE_EXTENSIONS,
    output_format,
    write_label_map,
    write_scan,
    write_scan_aim,
)

__all__ = [
    "read_scan",
    "write_scan",
    "write_label_map",
    "write_scan_aim",
    "resample_to_spacing",
    "detect_format",
    "output_format",
    "hu_plausibility",
    "spacing_warning",
    "SCAN_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "HU_AIR_RANGE",
    "HU_MAX_PLAUSIBLE",
]
