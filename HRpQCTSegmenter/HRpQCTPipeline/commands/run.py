"""``hrpqct run`` (one scan, the whole job) and ``hrpqct batch`` (a cohort, resumable)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_progress_option,
    add_units_options,
    calibration_from_args,
    progress_from_args,
)
from HRpQCTCore.errors import BatchFailuresError, HRpQCTError
from HRpQCTPipeline.commands.radiomics import add_settings_options

ORDER = 10

log = logging.getLogger("hrpqct")

_EPILOG_RUN = """examples:
  hrpqct run scan.AIM --out results/scan1
  hrpqct run scan.nii.gz --out r --model my_model/ --classifier adipose_logistic.json
  hrpqct run scan.nii.gz --out r --regions corrected.seg.nrrd      # skip segmentation
  hrpqct run scan.nii.gz --out r --features full --jobs 2         # all 939 features (slow)
  hrpqct run scan.nii.gz --out r --scheduler tcp://10.0.0.5:8786  # radiomics on a cluster

Outputs in OUT (named after the scan): <id>_regions.seg.nrrd (open in 3D Slicer) and
<id>_regions.nii.gz, <id>_features.csv, <id>_probability.json, <id>_report.html with its
PNGs, <id>_qc.json, run.json (what ran, with hashes) and run.log.

Running again resumes: steps whose input file, settings, model and classifier are
unchanged are skipped; changed ones are redone. Files not written by an earlier run,
or changed since, are never replaced without --overwrite.

Features: auto (default) extracts only what the classifier needs, or the cheap 'basic'
set (shape and first order) without a classifier; full = the whole --preset.
Without a bundled model or classifier (and no --model/--classifier) that step is
skipped with a message. Research use only; the bundled models are trained on synthetic
phantoms.
"""

_EPILOG_BATCH = """examples:
  hrpqct batch scans/ --out cohort_results
  hrpqct batch manifest.csv --out results --model my_model/ --classifier clf.json
  hrpqct batch manifest.csv --out results --scan-jobs 2          # two scans at a time
  hrpqct batch manifest.csv --out results --scheduler tcp://10.0.0.5:8786

Manifest: a CSV with a 'scan' column (paths relative to the CSV) and optionally
'scan_id', 'subject' and 'regions' (a ready 7-region map: no segmentation). A folder
takes every scan file in it (AIM, ISQ, NIfTI, NRRD, MHA, DICOM series folders).

Each scan goes to OUT/<scan_id>/ (as `hrpqct run`). A failing scan does not stop the
batch: OUT/failures.csv says which and why, and the exit code is 7. Re-running resumes.
Cohort files: OUT/cohort_features.csv (all feature rows; input for train-classifier),
OUT/cohort_summary.csv (probability, warnings, region volumes per scan), OUT/index.html,
OUT/batch.log. A Dask cluster (--scheduler) needs this package on every worker and the
input and output folders on a shared file system.
"""


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``batch`` (same names as in segment/radiomics/classify)."""
    # From .features, not .pipeline: building the parser must not import the classifier
    # code (scikit-learn), which `hrpqct segment` in Slicer does not install.
    from HRpQCTPipeline.features import FEATURE_SETS

    group = parser.add_argument_group("models")
    group.add_argument("--model", help="segmentation model folder (default: the bundled model)")
    group.add_argument("--classifier",
                       help="classifier file (.json) from train-classifier (default: the bundled "
                            "one; 'none' for no classification)")
    group = parser.add_argument_group("segmentation")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    group.add_argument("--batch-size", type=int,
                       help="slices per forward pass (default: 1 on CPU, 4 on GPU)")
    group.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto",
                       help="auto: ONNX Runtime on the CPU when installed (fastest), else torch")
    group.add_argument("--no-fast", action="store_true",
                       help="disable the exact folded decoder")
    group.add_argument("--postprocess-preset", choices=("default", "paper"), default="default",
                       help="post-processing settings (as `hrpqct segment --preset`)")
    add_trust_options(group)
    group = parser.add_argument_group("radiomics")
    group.add_argument("--features", choices=FEATURE_SETS, default="auto",
                       help="feature set (default %(default)s; see below)")
    add_settings_options(group)
    group.add_argument("--jobs", type=int, default=None,
                       help="worker processes for per-slice radiomics (default: CPU cores)")
    group.add_argument("--slice-step", type=int, default=1,
                       help="features of every n-th slice only (default 1: all)")
    parser.add_argument("--no-report", action="store_true", help="do not write the QC report")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler address (e.g. tcp://host:8786): run the tasks on "
                             "that cluster instead of locally")
    add_units_options(parser)
    add_progress_option(parser)
    add_overwrite_option(parser)


def add_trust_options(parser) -> None:
    """``--accept-unusual-scan`` and ``--uncertainty`` (segment, run, batch, demo)."""
    from HRpQCTSegmentationEngine.uncertainty import DEFAULT_UNCERTAINTY, UNCERTAINTY_METHODS

    parser.add_argument(
        "--accept-unusual-scan", action="store_true",
        help="segment a scan that does not look like a distal tibia/fibula HR-pQCT scan "
             "(refused by default with exit code 4; the results then carry an "
             "'unusual_scan' warning and no probability)")
    parser.add_argument(
        "--uncertainty", choices=UNCERTAINTY_METHODS, default=DEFAULT_UNCERTAINTY,
        help="per-slice model uncertainty for the QC (default %(default)s): flip = a second, "
             "mirrored network pass (about twice the segmentation time), margin = free but "
             "weaker, none = off. Labels are the same with every choice")


def settings_from_args(args: argparse.Namespace):
    """:class:`~HRpQCTPipeline.pipeline.RunSettings` from the shared options."""
    from HRpQCTPipeline.pipeline import RunSettings

    return RunSettings(
        model=args.model, classifier=args.classifier, features=args.features,
        preset=args.preset, params=args.params, postprocess=args.postprocess_preset,
        device=args.device, engine=args.engine, batch_size=args.batch_size,
        fast=not args.no_fast, units=args.units, calibration=calibration_from_args(args),
        jobs=args.jobs, slice_step=args.slice_step, report=not args.no_report,
        accept_unusual_scan=args.accept_unusual_scan, uncertainty=args.uncertainty)


def keep_console_quiet() -> None:
    """Give the console handlers the root level explicitly.

    The per-run log files lower the engine's loggers to INFO; the console must still show
    only what ``--quiet``/``-v`` asked for.
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.level == logging.NOTSET:
            handler.setLevel(root.getEffectiveLevel())


def _new_warnings(result) -> list[dict]:
    """The QC warnings not yet on the console: post-processing logs its own as it finds them
    (when the segmentation ran in this process), so repeating them would print each twice."""
    if result.stages.get("segmentation") != "ran":
        return list(result.warnings)
    return [w for w in result.warnings if w.get("code") != "postprocess"]


def _print_result(result) -> None:
    print(f"{result.scan_id}: {result.action} ({result.seconds:.0f} s) -> {result.out_dir}")
    for message in result.skipped:
        print(f"  note: {message}")
    for warning in _new_warnings(result):
        print(f"  WARNING ({warning['code']}): {warning['message']}")
    if result.probability is not None:
        print(f"  osteoporosis probability {result.probability:.3f} (research use only, "
              "not a diagnosis)")
    elif result.probability_withheld:
        print(f"  osteoporosis probability {result.probability_withheld}")
    if "report" in result.outputs:
        print(f"  report: {result.outputs['report']}")


def run(args: argparse.Namespace) -> int:
    from HRpQCTPipeline.pipeline import ScanJob, run_scan

    keep_console_quiet()
    settings = settings_from_args(args)
    job = ScanJob.from_path(args.scan, args.scan_id, args.subject or "", args.regions)
    client = None
    if args.scheduler:
        from HRpQCTPipeline.batch import connect

        client = connect(args.scheduler)
    try:
        result = run_scan(job, Path(args.out), settings, overwrite=args.overwrite,
                          client=client, progress=progress_from_args(args))
    finally:
        if client is not None:
            client.close()
    _print_result(result)
    return 0


def run_batch_command(args: argparse.Namespace) -> int:
    from HRpQCTPipeline.batch import connect, jobs_from_folder, read_manifest, run_batch

    keep_console_quiet()
    settings = settings_from_args(args)
    source = Path(args.input)
    if not source.is_dir():
        from HRpQCTCore.io.textfiles import ensure_text_file

        ensure_text_file(source, "Manifest", "a manifest CSV (or a folder of scans)")
    jobs = jobs_from_folder(source) if source.is_dir() else read_manifest(source)
    if args.scan_jobs < 1:
        raise HRpQCTError("--scan-jobs must be at least 1.")
    client = connect(args.scheduler) if args.scheduler else None
    scans_bar = _scans_bar(args)
    try:
        result = run_batch(jobs, Path(args.out), settings, client=client,
                           n_jobs=args.scan_jobs, overwrite=args.overwrite,
                           progress=scans_bar,
                           scan_progress=progress_from_args(args) if args.scan_jobs == 1
                           and client is None else None)
    finally:
        if client is not None:
            client.close()
    for row in result.scans:
        flag = f"  warnings: {', '.join(row['warning_codes'])}" if row["warning_codes"] else ""
        prob = ("" if row["probability"] is None
                else f"  probability {row['probability']:.3f}")
        if row.get("probability_withheld"):
            prob = "  probability withheld (QC)"
        print(f"{row['scan_id']}: {row['action']}{prob}{flag}")
    for row in result.failures:
        print(f"{row['scan_id']}: FAILED ({row['error']}): {row['message']}", file=sys.stderr)
    print(f"{len(result.scans)} scan(s) done, {len(result.failures)} failed; cohort report: "
          f"{result.files.get('report')}")
    if result.failures:
        raise BatchFailuresError(
            f"{len(result.failures)} of {len(jobs)} scan(s) failed; see "
            f"{result.files['failures']}. Fix them and run the same command again: finished "
            "scans are not redone.")
    return 0


def _scans_bar(args: argparse.Namespace):
    if args.progress == "none":
        return None
    if args.progress == "machine":
        from HRpQCTCore.progress import machine_progress_printer

        return machine_progress_printer(sys.stdout)
    from tqdm import tqdm

    state: dict = {}

    def _bar(done: int, total: int, stage: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=stage, file=sys.stderr, position=1,
                                      dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return _bar


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the whole job for one scan: regions, features, probability, QC report",
        description="Segment a scan into the seven regions, extract radiomic features, compute "
                    "the osteoporosis probability and write a quality-control report, all in "
                    "one output folder. Every step is also a command of its own (segment, "
                    "postprocess, radiomics, classify).",
        epilog=_EPILOG_RUN, formatter_class=EXAMPLES_FORMATTER)
    p.add_argument("scan", help="scan file (AIM, ISQ, NIfTI, NRRD, MHA) or DICOM folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--regions", metavar="MAP",
                   help="use this 7-region map (e.g. corrected in Slicer) instead of segmenting")
    p.add_argument("--scan-id", help="identifier in file names and tables (default: file name)")
    p.add_argument("--subject", help="subject identifier (default: the scan id)")
    add_pipeline_options(p)
    p.set_defaults(func=run)

    b = subparsers.add_parser(
        "batch", help="run a cohort (manifest CSV or folder); resumable, failures reported",
        description="Run `hrpqct run` for every scan of a manifest or folder, locally or on a "
                    "Dask cluster, and write cohort tables and a summary page.",
        epilog=_EPILOG_BATCH, formatter_class=EXAMPLES_FORMATTER)
    b.add_argument("input", help="manifest CSV or a folder of scans")
    b.add_argument("--out", required=True, help="output folder (one sub-folder per scan)")
    b.add_argument("--scan-jobs", type=int, default=1,
                   help="scans processed at the same time without --scheduler (default 1)")
    add_pipeline_options(b)
    b.set_defaults(func=run_batch_command)
