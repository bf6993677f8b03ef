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
  hrpqct radiomics scan.nii.gz regions.seg.nrrd -o f.csv --classifier model.json \\
      --classifier-features --probabilities p.json   # only what the classifier needs

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
    _check_classifier_options(args)
    outputs = [output, *([Path(args.probabilities)] if args.probabilities else [])]
    check_can_write(outputs, args.overwrite,
                    inputs=[args.scan, args.regions_map, *args.classifier])
    classifiers = _load_classifiers(args.classifier)
    if args.classifier_features:  # prediction mode: what the classifiers need, their settings
        settings, features = _classifier_request(classifiers)
    else:
        settings, features = load_settings(args.params or args.preset), None
    scan = read_scan(args.scan, units=args.units, calibration=calibration_from_args(args))
    regions_map = read_region_map(args.regions_map, scan)
    table = extract_features(
        scan.hu, regions_map, scan.spacing_mm, settings=settings, mode=args.mode,
        regions=None if features else parse_regions(args.regions), features=features,
        slices=parse_slices(args.slices, scan.n_slices) if args.mode == "slice" else None,
        n_jobs=args.jobs, scan=args.scan_id or scan_id_from_path(args.scan),
        subject=args.subject or "", progress=progress_from_args(args))
    write_feature_csv(output, table, long=args.long)
    if classifiers:
        write_probabilities(args.probabilities, classifiers, output,
                            warnings=_region_warnings(regions_map, scan))
    n_ok = len(table.ok_rows())
    skipped = len(table.rows) - n_ok
    log.info("%d region result(s) with %d features (settings %s) written to %s; %d skipped "
             "(see the status/reason columns)", n_ok, len(table.feature_names), settings.name,
             output, skipped)
    return 0


# --- probabilities (the Slicer module's prediction mode) -----------------------------------
def _check_classifier_options(args: argparse.Namespace) -> None:
    if args.classifier_features and not args.classifier:
        raise HRpQCTError("--classifier-features needs --classifier FILE.")
    if args.classifier and not args.probabilities:
        raise HRpQCTError("--classifier needs --probabilities FILE.json (where they go).")
    if args.classifier and (args.long or args.mode != "slice"):
        raise HRpQCTError("Classifiers work on per-slice features in the wide CSV: omit "
                          "--long and --mode scan with --classifier.")


def _load_classifiers(paths):
    if not paths:
        return []
    from HRpQCTRadiomicsEngine.model_io import load_classifier

    return [load_classifier(path) for path in paths]


def _classifier_request(classifiers):
    """The settings and per-region features the classifiers need (one extraction for all)."""
    from HRpQCTRadiomicsEngine.prediction import features_by_region

    if len({c.settings.get("sha256") for c in classifiers}) > 1:
        raise HRpQCTError("The classifiers were trained with different radiomics settings; "
                          "run them one at a time.")
    features: dict[int, list[str]] = {}
    for classifier in classifiers:
        for label, names in features_by_region(classifier.features).items():
            wanted = features.setdefault(label, [])
            wanted += [name for name in names if name not in wanted]
    return classifiers[0].radiomics_settings(), features


def _region_warnings(regions_map, scan) -> list:
    """The QC warnings of the regions the features come from (as ``hrpqct run`` checks them)."""
    from HRpQCTPipeline.qc import quality_warnings, region_stats

    return quality_warnings(region_stats(regions_map, scan.spacing_mm, scan.hu))


def scan_probabilities(classifiers, rows, warnings=()) -> dict:
    """Each classifier's osteoporosis probability of one scan, then their unweighted mean.

    Per classifier: its slice probabilities aggregated as it was trained (mean or median);
    ``overall`` is a summary, not a validated combined model. A classifier whose regions
    fail quality control (``warnings``, see :func:`HRpQCTPipeline.qc.classification_blockers`)
    gets no number: ``probability`` is None, ``withheld`` True and ``withheld_reason`` says
    why, exactly as ``hrpqct run`` withholds it. A multiclass classifier's entry also has
    ``class_probabilities`` (class -> probability, every value None when withheld);
    ``probability`` is then its osteoporosis class.
    """
    from HRpQCTPipeline.qc import classification_blockers, withheld_reason
    from HRpQCTRadiomicsEngine.classification import CAVEAT
    from HRpQCTRadiomicsEngine.prediction import predict_rows

    for ids in rows.ids:  # one scan: its slices group together even without a subject
        ids["subject"] = ids["subject"] or ids["scan"]
    entries = []
    for classifier in classifiers:
        prediction = predict_rows(classifier, rows)
        subject = prediction.subjects[0]
        entry = {
            "classifier": Path(classifier.path).name if classifier.path else classifier.kind,
            "regions": list(classifier.regions),
            "slices_used": prediction.slices_of(subject),
            "probability": float(prediction.subject_probabilities[0]),
            "aggregation": classifier.aggregation}
        classes = prediction.subject_class_dict(subject)
        if classes is not None:  # multiclass: every class, osteoporosis also as "probability"
            entry["class_probabilities"] = classes
        blockers = classification_blockers(warnings, classifier.regions)
        if blockers:
            entry.update(probability=None, withheld=True,
                         withheld_reason=withheld_reason(blockers))
            if classes is not None:  # withheld means withheld for every class
                entry["class_probabilities"] = dict.fromkeys(classes)
        entries.append(entry)
    return {"caveat": CAVEAT, "classifiers": entries, "overall": _overall(entries)}


def _overall(entries: list[dict]) -> dict:
    kept = [e["probability"] for e in entries if e["probability"] is not None]
    overall = {"probability": sum(kept) / len(kept) if kept else None,
               "slices_used": max(e["slices_used"] for e in entries),
               "note": "unweighted mean of the classifiers above that were not withheld; not "
                       "a validated combined model"}
    if not kept:
        overall.update(withheld=True, withheld_reason=entries[0]["withheld_reason"])
    return overall


def write_probabilities(path, classifiers, features_csv, warnings=()) -> None:
    """:func:`scan_probabilities` of the features just written, as JSON (atomically)."""
    import json

    from HRpQCTCore.atomic import write_text_atomic
    from HRpQCTRadiomicsEngine.table import read_feature_csv

    result = scan_probabilities(classifiers, read_feature_csv(features_csv), warnings)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    for entry in result["classifiers"]:
        if entry["probability"] is None:
            log.warning("%s: osteoporosis probability %s", entry["classifier"],
                        entry["withheld_reason"])
            continue
        log.info("%s: osteoporosis probability %.3f (%s of %d slice(s))", entry["classifier"],
                 entry["probability"], entry["aggregation"], entry["slices_used"])
        if entry.get("class_probabilities"):
            log.info("%s: class probabilities %s", entry["classifier"],
                     ", ".join(f"{c} {p:.3f}" for c, p in entry["class_probabilities"].items()))
    log.info("%s", result["caveat"])


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
    p.add_argument("--classifier", action="append", default=[], metavar="FILE",
                   help="also the osteoporosis probability of this classifier (.json from "
                        "train-classifier; repeatable), written to --probabilities")
    p.add_argument("--classifier-features", action="store_true",
                   help="extract only what the classifiers need, with the settings they were "
                        "trained with (instead of --preset/--params and --regions)")
    p.add_argument("--probabilities", metavar="FILE.json",
                   help="where the classifiers' probabilities go (JSON, with the caveat)")
    add_units_options(p)
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run)
