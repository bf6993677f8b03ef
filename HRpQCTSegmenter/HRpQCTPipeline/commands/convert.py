"""``hrpqct convert``: any supported scan -> NIfTI/NRRD/MetaImage in HU."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_units_options,
    calibration_from_args,
    check_can_write,
)
from HRpQCTCore.errors import HRpQCTError

ORDER = 5

log = logging.getLogger("hrpqct")

_EXAMPLES = """\
examples:
  hrpqct convert C0001234.AIM scan.nii.gz
  hrpqct convert dicom_folder/ scan.nrrd --dtype int16
  hrpqct convert raw.nii.gz scan.nii.gz --units native --mu-scaling 8192 --mu-water 0.2409
  hrpqct convert xtremect1.aim scan.nii.gz --resample-mm 0.0607

Reads Scanco AIM/ISQ, NIfTI, NRRD, MetaImage or a DICOM series and writes HU with the same
geometry. No header fields (patient name, IDs, dates) are copied into the output.
"""


def summary_line(scan, output: Path) -> str:
    """One line: shape, spacing, HU range and the units found."""
    import numpy as np

    meta = scan.metadata
    units = meta.get("units_on_disk", "?")
    source = meta.get("units_source", "")
    cal = meta.get("calibration_source")
    low, high = (float(np.min(scan.hu)), float(np.max(scan.hu)))
    shape = "x".join(str(n) for n in scan.shape)
    spacing = "x".join(f"{s:.4g}" for s in scan.spacing_mm)
    cal_text = f", calibration: {cal}" if cal else ""
    return (f"{output}: {shape} voxels (z,y,x), spacing {spacing} mm, HU {low:.1f}..{high:.1f}; "
            f"input {meta.get('source_format', '?')} in {units} units ({source}{cal_text})")


def run(args: argparse.Namespace) -> int:
    from HRpQCTCore.io import output_format, read_scan, resample_to_spacing, write_scan

    output = Path(args.output)
    try:
        output_format(output)
    except HRpQCTError as exc:
        raise HRpQCTError(str(exc)) from None  # a usage problem (exit 2), not an input file
    check_can_write([output], args.overwrite, inputs=[args.input])
    scan = read_scan(args.input, units=args.units, calibration=calibration_from_args(args))
    if args.resample_mm is not None:
        if not args.resample_mm > 0:
            raise HRpQCTError(f"--resample-mm must be a positive voxel size in mm, not "
                              f"{args.resample_mm}")
        scan = resample_to_spacing(scan, args.resample_mm)
    write_scan(scan, output, dtype=args.dtype)
    print(summary_line(scan, output))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a scan (AIM, ISQ, DICOM, NIfTI, NRRD, MHA) to NIfTI/NRRD in HU",
        description="Convert a scan to NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha) "
                    "in Hounsfield units, keeping its geometry. Prints one summary line.",
        epilog=_EXAMPLES, formatter_class=EXAMPLES_FORMATTER)
    p.add_argument("input", help="scan file, or a folder holding a DICOM series")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd or .mha)")
    add_units_options(p)
    p.add_argument("--resample-mm", type=float, metavar="MM",
                   help="resample (linear) to this isotropic voxel size, e.g. 0.0607")
    p.add_argument("--dtype", choices=("float32", "int16"), default="float32",
                   help="output voxel type: float32 (exact) or int16 (whole HU, half the size; "
                        "default %(default)s)")
    add_overwrite_option(p)
    p.set_defaults(func=run)
