"""Scan and label-map input/output: every format users bring, with the same checks everywhere.

Scans are read into a :class:`~HRpQCTCore.scan.Scan` in HU; label maps are Slicer ``.seg.nrrd``
files or integer images on a scan's grid. Heavy libraries (SimpleITK, aimio-py) are imported
only when a function needs them.
"""

from HRpQCTCore.io.labelmaps import (
    LABEL_MAP_SUFFIXES,
    label_map_format,
    read_label_map,
    write_label_map,
)
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
from HRpQCTCore.io.suffixes import compound_suffix
from HRpQCTCore.io.writers import (
    WRITE_EXTENSIONS,
    output_format,
    write_label_image,
    write_scan,
    write_scan_aim,
)

__all__ = [
    "read_scan",
    "write_scan",
    "read_label_map",
    "write_label_map",
    "write_label_image",
    "label_map_format",
    "write_scan_aim",
    "resample_to_spacing",
    "compound_suffix",
    "detect_format",
    "output_format",
    "hu_plausibility",
    "spacing_warning",
    "SCAN_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "LABEL_MAP_SUFFIXES",
    "HU_AIR_RANGE",
    "HU_MAX_PLAUSIBLE",
]
