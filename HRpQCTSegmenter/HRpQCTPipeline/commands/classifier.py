"""``hrpqct train-classifier`` and ``hrpqct classify``: osteoporosis probability from features."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np

from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_progress_option,
    add_units_options,
    calibration_from_args,
    check_can_write,
    progress_from_args,
)
from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTPipeline.commands.radiomics import add_settings_options

ORDER = 45

log = logging.getLogger("hrpqct")

_EPILOG_TRAIN = """examples:
  hrpqct train-classifier features/*.csv --labels cohort/manifest.csv --regions adipose \\
      -o adipose_logistic.json --report adipose_report.json
  hrpqct train-classifier f.csv --labels labels.csv --label-column osteoporosis \\
      --regions myotendinous,adipose --model random_forest -o soft_rf.json
  hrpqct train-classifier f.csv --labels c3/manifest.csv --target diagnosis \\
      --regions tibial_cortical -o three_class.json     # normal/osteopenia/osteoporosis

Labels: a CSV with a subject column (default subject_id) and a 0/1 label column (default
osteoporosis), e.g. the manifest.csv of `hrpqct cohort`. Feature rows without a subject
use the scan identifier as subject. Splits and cross-validation are grouped by subject.
Several classes: with --target diagnosis (or by default when the labels file has a
'diagnosis' column with three or more classes, as `hrpqct cohort --classes 3` writes) the
label column (default diagnosis) holds class names and the model is multinomial; the
classifier then gives one probability per class. --target osteoporosis keeps 0/1 training.
"""

_EPILOG_CLASSIFY = """examples:
  hrpqct classify model.json --features features.csv -o predictions.csv
  hrpqct classify model.json --scan scan.nii.gz --regions-map regions.seg.nrrd -o p.csv

With --scan, only the features the classifier uses are extracted (prediction mode), with
the radiomics settings stored in the classifier. A binary classifier writes one
osteoporosis_probability column; a multiclass one (e.g. normal/osteopenia/osteoporosis) one
<class>_probability column per class.
"""


# --- train --------------------------------------------------------------------------------

def _label_records(path: str | Path, subject_column: str, label_column: str):
    """(subject, label text, path) of every row of a labels CSV, its columns checked."""
    from HRpQCTCore.io.textfiles import ensure_text_file

    path = ensure_text_file(path, "Labels file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in (subject_column, label_column) if c not in header]
        if missing:
            raise InputFileError(
                f"{path} lacks column(s) {missing}; it has {header}. Use --subject-column / "
                "--label-column.")
        return [(record[subject_column].strip(), (record[label_column] or "").strip(), path)
                for record in reader]


def read_labels(path: str | Path, subject_column: str, label_column: str) -> dict[str, int]:
    """Subject -> 0/1 label from a CSV."""
    labels: dict[str, int] = {}
    for subject, text, where in _label_records(path, subject_column, label_column):
        try:
            labels[subject] = int(float(text))
        except ValueError:
            raise InputFileError(f"{where}: label {text!r} of subject {subject!r} is not 0 "
                                 "or 1.") from None
    return labels


def read_class_labels(path: str | Path, subject_column: str,
                      label_column: str) -> dict[str, str]:
    """Subject -> class name from a CSV (multiclass training)."""
    labels: dict[str, str] = {}
    for subject, text, where in _label_records(path, subject_column, label_column):
        if not text:
            raise InputFileError(f"{where}: subject {subject!r} has no {label_column!r} "
                                 "label.")
        labels[subject] = text
    return labels


def resolve_target(labels_path: str | Path, target: str) -> str:
    """``osteoporosis`` (0/1) or ``diagnosis`` (several classes); ``auto`` looks at the file.

    ``auto`` picks ``diagnosis`` when the labels file has a ``diagnosis`` column with three
    or more distinct values, so binary manifests train exactly as before.
    """
    if target != "auto":
        return target
    from HRpQCTCore.io.textfiles import ensure_text_file

    path = ensure_text_file(labels_path, "Labels file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "diagnosis" not in (reader.fieldnames or []):
            return "osteoporosis"
        values = {(r["diagnosis"] or "").strip() for r in reader} - {""}
    return "diagnosis" if len(values) >= 3 else "osteoporosis"


def _labels_for_target(args: argparse.Namespace):
    """(labels, class names or None) for ``--target``."""
    from HRpQCTRadiomicsEngine.classification import class_order

    target = resolve_target(args.labels, args.target)
    if target == "osteoporosis":
        return read_labels(args.labels, args.subject_column,
                           args.label_column or "osteoporosis"), None
    labels = read_class_labels(args.labels, args.subject_column, args.label_column or "diagnosis")
    return labels, class_order(labels.values())


def _rows_with_subjects(paths):
    from HRpQCTRadiomicsEngine.table import read_feature_csv

    rows = read_feature_csv(paths)
    for ids in rows.ids:
        if not ids["subject"]:
            ids["subject"] = ids["scan"]
    return rows


def _settings_of_rows(rows, settings):
    hashes = {ids["settings_sha256"] for ids in rows.ids}
    if hashes != {settings.sha256}:
        raise HRpQCTError(
            f"The feature tables were made with radiomics settings {sorted(hashes)} "
            f"(sha256), not with {settings.name} ({settings.sha256[:12]}...). Pass the same "
            "--preset/--params that `hrpqct radiomics` used.")


def run_train(args: argparse.Namespace) -> int:
    from HRpQCTRadiomicsEngine.classification import CAVEAT, assemble_dataset, train_classifier
    from HRpQCTRadiomicsEngine.model_io import save_classifier
    from HRpQCTRadiomicsEngine.settings import load_settings

    output = Path(args.output)
    outputs = [output] + ([Path(args.report)] if args.report else [])
    check_can_write(outputs, args.overwrite, inputs=[*args.features, args.labels])
    settings = load_settings(args.params or args.preset)
    rows = _rows_with_subjects(args.features)
    _settings_of_rows(rows, settings)
    labels, class_names = _labels_for_target(args)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    # Only the subjects with features: a class missing among them is reported by training.
    data = assemble_dataset(rows, regions, labels, class_names=class_names)
    if args.drop_nonfinite:
        finite = np.isfinite(data.X).all(axis=0)
        if not finite.all():
            log.info("Leaving out %d feature(s) with NaN/infinite values", int((~finite).sum()))
            data.X = data.X[:, finite]
            data.feature_names = [n for n, ok in zip(data.feature_names, finite, strict=True)
                                  if ok]
    result = train_classifier(data, regions, args.model, args.test_fraction, args.cv,
                              args.seed, args.bootstrap)
    save_classifier(output, result, settings)
    if args.report:
        from HRpQCTRadiomicsEngine.model_io import _jsonable

        write_text_atomic(args.report, json.dumps(_jsonable(result.report), indent=1) + "\n")
    test = result.report["test"]
    print(f"{args.model} on {', '.join(regions)}: {len(result.feature_names)} feature(s) "
          "selected")
    if class_names is not None:
        _print_multiclass(test, class_names)
        print(f"Saved {output}. {CAVEAT}")
        return 0
    for level in ("image", "patient"):
        m, ci = test[level]["metrics"], test[level]["ci95"]
        print(f"  test {level:7s} AUROC {m['auroc']:.3f} [{ci['auroc'][0]:.3f}, "
              f"{ci['auroc'][1]:.3f}]  accuracy {m['accuracy']:.3f}  F1 {m['f1']:.3f}  "
              f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
              f"(n={m['n']})")
    print(f"Saved {output}. {CAVEAT}")
    return 0


def _print_multiclass(test: dict, class_names: list[str]) -> None:
    for level in ("image", "patient"):
        m, ci = test[level]["metrics"], test[level]["ci95"]
        sens = "  ".join(f"{c} {m[f'sensitivity_{c}']:.3f}" for c in class_names)
        print(f"  test {level:7s} macro AUROC {m['auroc']:.3f} [{ci['auroc'][0]:.3f}, "
              f"{ci['auroc'][1]:.3f}]  accuracy {m['accuracy']:.3f}  sensitivity: {sens}  "
              f"(n={m['n']})")
        print(f"    confusion (rows true, columns predicted: {', '.join(class_names)}): "
              f"{m['confusion']}")


# --- classify -----------------------------------------------------------------------------

def run_classify(args: argparse.Namespace) -> int:
    from HRpQCTRadiomicsEngine.classification import CAVEAT
    from HRpQCTRadiomicsEngine.model_io import load_classifier
    from HRpQCTRadiomicsEngine.prediction import predict_rows

    output = Path(args.output)
    check_can_write([output], args.overwrite,
                    inputs=[args.model, *(args.features or ()), args.scan, args.regions_map])
    model = load_classifier(args.model)
    if bool(args.features) == bool(args.scan):
        raise HRpQCTError("Give either --features CSV or --scan with --regions-map.")
    if args.features:
        rows = _rows_with_subjects(args.features)
        hashes = {ids["settings_sha256"] for ids in rows.ids}
        if hashes != {model.settings["sha256"]}:
            log.warning("The feature table's radiomics settings differ from the classifier's "
                        "(%s): probabilities may be meaningless.", model.settings.get("name"))
        blockers = []
    else:
        if not args.regions_map:
            raise HRpQCTError("--scan needs --regions-map (the scan's 7-region label map).")
        rows, blockers = _extract_for_model(model, args)
    prediction = predict_rows(model, rows)
    if blockers:
        return _write_withheld(output, prediction, blockers)
    if prediction.class_names is not None:
        write_text_atomic(output, _multiclass_prediction_csv(prediction, model.aggregation))
        print(CAVEAT)
        return 0
    lines = [["scan", "subject", "level", "slice", "osteoporosis_probability"]]
    for (scan, slice_), subject, p in zip(prediction.sample_ids, prediction.groups,
                                          prediction.probabilities, strict=True):
        lines.append([scan, subject, "image", slice_, repr(float(p))])
    for subject, p in zip(prediction.subjects, prediction.subject_probabilities, strict=True):
        lines.append(["", subject, "subject", model.aggregation, repr(float(p))])
        print(f"{subject}: osteoporosis probability {p:.3f} ({model.aggregation} of "
              f"{prediction.slices_of(subject)} slice(s))")
    text = "\n".join(",".join(str(c) for c in line) for line in lines) + "\n"
    write_text_atomic(output, text)
    print(CAVEAT)
    return 0


def _write_withheld(output: Path, prediction, blockers) -> int:
    """The predictions CSV without a number: the classifier's regions failed quality control
    on this scan (as ``hrpqct run`` withholds it), so every probability cell stays empty."""
    from HRpQCTPipeline.qc import withheld_reason
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    names = (["osteoporosis"] if prediction.class_names is None
             else list(prediction.class_names))
    reason = withheld_reason(blockers)
    lines = [["scan", "subject", "level", "slice", *(f"{c}_probability" for c in names),
              "withheld_reason"]]
    for (scan, slice_), subject in zip(prediction.sample_ids, prediction.groups, strict=True):
        lines.append([scan, subject, "image", slice_, *([""] * len(names)), reason])
    for subject in prediction.subjects:
        lines.append(["", subject, "subject", "", *([""] * len(names)), reason])
        print(f"{subject}: osteoporosis probability {reason}")
    write_text_atomic(output, "\n".join(",".join(f'"{c}"' if "," in str(c) else str(c)
                                                 for c in line) for line in lines) + "\n")
    print(CAVEAT)
    return 0


def _multiclass_prediction_csv(prediction, aggregation: str) -> str:
    """Predictions CSV of a multiclass classifier: one ``<class>_probability`` column each."""
    names = list(prediction.class_names)
    lines = [["scan", "subject", "level", "slice", *(f"{c}_probability" for c in names)]]
    for (scan, slice_), subject, row in zip(prediction.sample_ids, prediction.groups,
                                            prediction.class_probabilities, strict=True):
        lines.append([scan, subject, "image", slice_, *(repr(float(p)) for p in row)])
    for subject, row in zip(prediction.subjects, prediction.subject_class_probabilities,
                            strict=True):
        lines.append(["", subject, "subject", aggregation, *(repr(float(p)) for p in row)])
        shown = ", ".join(f"{c} {p:.3f}" for c, p in zip(names, row, strict=True))
        print(f"{subject}: probabilities {shown} ({aggregation} of "
              f"{prediction.slices_of(subject)} slice(s))")
    return "\n".join(",".join(str(c) for c in line) for line in lines) + "\n"


def _extract_for_model(model, args):
    from HRpQCTCore.io import read_scan
    from HRpQCTRadiomicsEngine.extraction import extract_features
    from HRpQCTRadiomicsEngine.inputs import read_region_map, scan_id_from_path
    from HRpQCTRadiomicsEngine.prediction import features_by_region
    from HRpQCTRadiomicsEngine.table import read_feature_csv, write_feature_csv

    scan = read_scan(args.scan, units=args.units, calibration=calibration_from_args(args))
    regions_map = read_region_map(args.regions_map, scan)
    settings = model.radiomics_settings()
    table = extract_features(scan.hu, regions_map, scan.spacing_mm, settings=settings,
                             features=features_by_region(model.features),
                             n_jobs=args.jobs, scan=scan_id_from_path(args.scan),
                             subject=args.subject or scan_id_from_path(args.scan),
                             progress=progress_from_args(args))
    # Round-trip through the CSV reader so both input paths share one code path.
    tmp = Path(args.output).with_suffix(".features.tmp.csv")
    try:
        write_feature_csv(tmp, table)
        rows = read_feature_csv(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, _blockers(model, regions_map, scan)


def _blockers(model, regions_map, scan) -> list:
    """The QC warnings that withhold a probability from ``model`` on this region map."""
    from HRpQCTPipeline.qc import classification_blockers, quality_warnings, region_stats

    warnings = quality_warnings(region_stats(regions_map, scan.spacing_mm, scan.hu))
    return classification_blockers(warnings, model.regions)


def register(subparsers) -> None:
    from HRpQCTRadiomicsEngine.classification import DEFAULT_MODEL, MODEL_KINDS

    t = subparsers.add_parser(
        "train-classifier", help="train an osteoporosis classifier on radiomic features",
        description="Feature selection (variance 0.02 -> |r| > 0.9 -> LASSO) and a classifier, "
                    "trained and evaluated with subject-grouped splits; image- and "
                    "patient-level metrics with bootstrap confidence intervals. Research use; "
                    "not a diagnostic device.",
        epilog=_EPILOG_TRAIN, formatter_class=EXAMPLES_FORMATTER)
    t.add_argument("features", nargs="+", help="feature CSV(s) from `hrpqct radiomics`")
    t.add_argument("--labels", required=True, help="CSV with subject and 0/1 label columns")
    t.add_argument("--subject-column", default="subject_id", help="default %(default)s")
    t.add_argument("--label-column", default=None,
                   help="label column (default osteoporosis; diagnosis with --target diagnosis)")
    t.add_argument("--target", choices=("auto", "osteoporosis", "diagnosis"), default="auto",
                   help="osteoporosis: 0/1 binary model; diagnosis: one class per distinct "
                        "label (multinomial); auto (default): diagnosis when the labels file "
                        "has a 'diagnosis' column with 3+ classes")
    t.add_argument("--regions", required=True,
                   help="comma-separated regions whose features are used (e.g. adipose)")
    t.add_argument("--model", choices=MODEL_KINDS, default=DEFAULT_MODEL,
                   help="classifier (default %(default)s)")
    t.add_argument("-o", "--output", required=True, help="classifier file (.json)")
    t.add_argument("--report", help="also write the evaluation report (JSON)")
    t.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of subjects held out for testing (default %(default)s)")
    t.add_argument("--cv", type=int, default=5, help="cross-validation folds (default 5)")
    t.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for confidence intervals (default 1000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--drop-nonfinite", action="store_true",
                   help="leave out features with NaN/infinite values instead of stopping")
    add_settings_options(t)
    add_overwrite_option(t)
    t.set_defaults(func=run_train)

    c = subparsers.add_parser(
        "classify", help="osteoporosis probability from a scan or a feature table",
        description="Apply a trained classifier: per-slice and per-subject osteoporosis "
                    "probability. Research use only, not a diagnosis; the bundled/phantom "
                    "classifiers are trained on synthetic data.",
        epilog=_EPILOG_CLASSIFY, formatter_class=EXAMPLES_FORMATTER)
    c.add_argument("model", help="classifier file (.json) from train-classifier")
    c.add_argument("--features", nargs="+", help="feature CSV(s) from `hrpqct radiomics`")
    c.add_argument("--scan", help="scan file: extract the needed features first")
    c.add_argument("--regions-map", help="7-region label map of --scan")
    c.add_argument("--subject", help="subject identifier (default: scan file name)")
    c.add_argument("--jobs", type=int, default=None, help="worker processes for extraction")
    c.add_argument("-o", "--output", required=True, help="predictions CSV")
    add_units_options(c)
    add_progress_option(c)
    add_overwrite_option(c)
    c.set_defaults(func=run_classify)
