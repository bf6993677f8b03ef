"""``hrpqct radiomics``: per-region radiomic features of a scan to CSV."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_progress_option,
    add_units_options,
    calibration_from_args,
    check_can_write,
    progress_from_args,
)
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.regions import region_by_name

ORDER = 40

log = logging.getLogger("hrpqct")

_EPILOG = """examples:
  hrpqct radiomics scan.nii.gz regions.seg.nrrd -o features.csv
  hrpqct radiomics scan.aim regions.nii.gz -o f.csv --preset complete --jobs 2
  hrpqct radiomics scan.nii.gz regions.nii.gz -o f.csv --regions adipose,myotendinous \\
      --slices 0:168:4 --subject sub-001
  hrpqct radiomics scan.nii.gz regions.nii.gz -o f.csv --mode scan      # 3D, one row/region

Presets: paper (default; 939 features per region and slice, as the paper), complete (1311:
LoG and LBP-2D contribute). --params FILE uses your own YAML (same layout as the presets in
HRpQCTRadiomicsEngine/resources). The CSV schema is documented in HRpQCTRadiomicsEngine.table.
"""


def parse_regions(text: str | None) -> list[int] | None:
    """``"adipose,skin"`` -> region labels (None: all)."""
    if not text:
        return None
    try:
        return [region_by_name(part).label for part in text.split(",") if part.strip()]
    except KeyError as exc:
        raise HRpQCTError(str(exc)) from None


def parse_slices(text: str | None, n_slices: int) -> list[int] | None:
    """``"10"``, ``"0:168"``, ``"0:168:4"`` or ``"3,7,9"`` -> slice indices."""
    if not text:
        return None
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            return list(range(n_slices))[slice(*parts)]
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise HRpQCTError(f"--slices {text!r}: use START:STOP[:STEP] or a comma list") from None


def run(args: argparse.Namespace) -> int:
    from HRpQCTCore.io import read_scan
    from HRpQCTRadiomicsEngine.extraction import extract_features
    from HRpQCTRadiomicsEngine.inputs import read_region_map, scan_id_from_path
    from HRpQCTRadiomicsEngine.settings import load_settings
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    output = Path(args.output)
    check_can_write([output], args.overwrite)
    settings = load_settings(args.params or args.preset)
    scan = read_scan(args.scan, units=args.units, calibration=calibration_from_args(args))
    regions_map = read_region_map(args.regions_map, scan.hu.shape)
    table = extract_features(
        scan.hu, regions_map, scan.spacing_mm, settings=settings, mode=args.mode,
        regions=parse_regions(args.regions),
        slices=parse_slices(args.slices, scan.n_slices) if args.mode == "slice" else None,
        n_jobs=args.jobs, scan=args.scan_id or scan_id_from_path(args.scan),
        subject=args.subject or "", progress=progress_from_args(args))
    write_feature_csv(output, table, long=args.long)
    n_ok = len(table.ok_rows())
    skipped = len(table.rows) - n_ok
    log.info("%d region result(s) with %d features (settings %s) written to %s; %d skipped "
             "(see the status/reason columns)", n_ok, len(table.feature_names), settings.name,
             output, skipped)
    return 0


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """``--preset`` / ``--params``: which radiomics settings to use."""
    from HRpQCTRadiomicsEngine.settings import DEFAULT_PRESET, PRESETS

    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS),
                       help="bundled feature set (default %(default)s)")
    group.add_argument("--params", help="your own YAML parameter file instead of a preset")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "radiomics", help="per-region radiomic features of a scan to CSV",
        description="Extract pyradiomics features for each of the seven regions, per slice "
                    "(image level, as the paper) or per scan (3D), and write them as CSV. "
                    "Empty or tiny regions are reported with a reason, not computed.",
        epilog=_EPILOG, formatter_class=EXAMPLES_FORMATTER)
    p.add_argument("scan", help="scan file (AIM/ISQ, NIfTI, NRRD, MHA, DICOM folder)")
    p.add_argument("regions_map", metavar="regions",
                   help="7-region label map on the scan's grid (.seg.nrrd, .nii.gz, .nrrd)")
    p.add_argument("-o", "--output", required=True, help="output CSV")
    add_settings_options(p)
    p.add_argument("--mode", choices=("slice", "scan"), default="slice",
                   help="per slice (2D, default) or per scan (3D)")
    p.add_argument("--regions", help="comma-separated region names (default: all seven)")
    p.add_argument("--slices", help="slices START:STOP[:STEP] or a comma list (default all)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: CPU cores)")
    p.add_argument("--long", action="store_true",
                   help="long format: one line per feature instead of one column")
    p.add_argument("--scan-id", help="scan identifier in the CSV (default: file name)")
    p.add_argument("--subject", help="subject identifier in the CSV (default empty)")
    add_units_options(p)
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run)
