"""``hrpqct demo``: run the main job on the bundled example scan.

The example (:mod:`HRpQCTPhantom.example`) is written as a Scanco AIM when the installed Scanco
library can write one (else NIfTI), then ``hrpqct run`` reads it like any user scan (so the demo
exercises the same path as real data) and writes the regions, features, probability and report.
The demo writes only what a user looks at: the example scan, its true regions and the run's
outputs. It used to convert the example to a gzipped NIfTI copy too (660 MB and ~30 s for the
full example, read by nothing; ``hrpqct convert`` makes one), and to read the whole scan once
more just to print its size. Without the radiomics engine installed, only the segmentation
runs; missing bundled artefacts (model, classifier) are reported and their steps skipped.

Run again in the same folder, the demo reuses the example it made there (its record in
``demo_summary.json``: seed, slices, a checksum of the generator's code and of both files)
instead of making it again, and ``hrpqct run`` reuses its unchanged stages; an example that
differs in any of these is made afresh (replacing files needs ``--overwrite``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_progress_option,
    check_can_write,
)
from HRpQCTPhantom.example import EXAMPLE_SEED, EXAMPLE_SLICES, example_params

ORDER = 1
log = logging.getLogger("hrpqct")

#: The demo extracts features on every n-th slice (a full scan's radiomics takes minutes).
DEMO_SLICE_STEP = 4
#: The demo's summary in its output folder; it also records the example it made.
SUMMARY_NAME = "demo_summary.json"


def _step(title: str) -> float:
    print(f"== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from HRpQCTCore import io
    from HRpQCTCore.outputs import ensure_folder
    from HRpQCTPhantom import generate_phantom
    from HRpQCTPipeline.commands.info import collect_info

    out = ensure_folder(args.out)
    start = time.perf_counter()

    info = collect_info()
    print(f"hrpqct demo: Python {info['python']}, torch {info['versions'].get('torch')}, "
          f"output in {out}")

    writes_aim = hasattr(io, "write_scan_aim")
    example = out / ("example_scan.AIM" if writes_aim else "example_scan.nii.gz")
    truth = out / "example_truth_regions.nii.gz"
    made = _example_record(args.slices)
    t = _step(f"1. the bundled example scan ({args.slices} slices, seed {EXAMPLE_SEED})")
    reused = _made_here_before(out / SUMMARY_NAME, example, truth, made)
    if reused is not None:
        made = reused
        print(f"   reusing {example.name} and its 7-region truth: a demo made them here with "
              "this generator, and their checksums match")
    else:
        check_can_write([example, truth], args.overwrite)  # before minutes of work
        phantom = generate_phantom(example_params(args.slices), seed=EXAMPLE_SEED)
        if writes_aim:
            io.write_scan_aim(phantom.scan, example)
        else:
            io.write_scan(phantom.scan, example, dtype="int16")
        with ThreadPoolExecutor(max_workers=1) as pool:  # the scan's checksum (~1 s for a
            example_sha256 = pool.submit(sha256_file, example)  # full one) beside the truth
            io.write_label_map(phantom.regions, phantom.scan, truth)
            made.update(example_sha256=example_sha256.result(), truth_sha256=sha256_file(truth))
        del phantom
        print(f"   wrote {example.name} and its 7-region truth ({time.perf_counter() - t:.1f} s)")

    summary: dict = {"example": str(example), "truth": str(truth), "example_made": made}
    from HRpQCTCore.atomic import write_text_atomic

    summary_path = out / SUMMARY_NAME
    # at once: a demo stopped later finds its example here and need not make it again
    write_text_atomic(summary_path, json.dumps(summary, indent=2))
    try:
        from HRpQCTPipeline.pipeline import RunSettings, ScanJob, run_scan
    except ImportError:  # the segmentation engine alone: segment, no features or report
        _segment_only(args, io.read_scan(example), out, summary)
    else:
        _run_job(args, example, out, summary, RunSettings, ScanJob, run_scan)
    write_text_atomic(summary_path, json.dumps(summary, indent=2))
    print(f"== done in {time.perf_counter() - start:.0f} s; summary: {summary_path}")
    print("   Synthetic example and models trained on synthetic phantoms: research use only, "
          "not for clinical decisions.")
    return 0


def _generator_sha256() -> str:
    """One SHA256 over the source of the code that makes and writes the example."""
    import HRpQCTCore.io
    import HRpQCTPhantom

    digest = hashlib.sha256()
    for package in (HRpQCTPhantom, HRpQCTCore.io):
        folder = Path(package.__file__).parent
        for source in sorted(folder.rglob("*.py")):
            digest.update(source.relative_to(folder).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _example_record(n_slices: int) -> dict:
    """What defines the example a demo makes: its seed, slices and the code that makes it."""
    return {"seed": EXAMPLE_SEED, "slices": int(n_slices), "generator_sha256": _generator_sha256()}


def _made_here_before(summary_path: Path, example: Path, truth: Path, wanted: dict) -> dict | None:
    """The record of an example a demo made in this folder, if it is the one wanted, unchanged.

    A rerun then skips minutes of making it again (and ``hrpqct run`` reuses its own
    unchanged stages). The record must name the same seed, slices and generator code, and the
    files' SHA256 must still be those written; anything else (no record, a damaged or edited
    file) gives None and the example is made afresh.
    """
    try:
        record = json.loads(summary_path.read_text(encoding="utf-8"))["example_made"]
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in wanted.items()):
            return None
        if not (example.is_file() and truth.is_file()):
            return None
        if (sha256_file(example), sha256_file(truth)) != (record.get("example_sha256"),
                                                          record.get("truth_sha256")):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def _run_job(args: argparse.Namespace, example: Path, out: Path, summary: dict,
             RunSettings, ScanJob, run_scan) -> None:  # noqa: N803 (classes passed in)
    """Step 2: ``hrpqct run`` on the example file, read like a user scan."""
    from HRpQCTCore.cli_options import progress_from_args

    t = _step(f"2. the whole job (hrpqct run) on {example.name}, read like a user scan: "
              "seven regions, features, probability, QC report")
    settings = RunSettings(model=args.model, classifier=args.classifier,
                           features=args.features, slice_step=args.slice_step,
                           accept_unusual_scan=args.accept_unusual_scan,
                           uncertainty=args.uncertainty)
    if args.slice_step > 1:
        print(f"   features on every {args.slice_step}th slice to keep the demo short "
              "(hrpqct run uses all slices unless told otherwise)")
    result = run_scan(ScanJob(scan=example, scan_id="example"), out, settings,
                      overwrite=args.overwrite, progress=progress_from_args(args))
    for message in result.skipped:
        print(f"   {message}")
    summary["region_volumes_mm3"] = {k: round(v, 1) for k, v in result.volumes_mm3.items()}
    summary["warnings"] = result.warnings
    summary["probability"] = result.probability
    summary["outputs"] = result.outputs
    if result.volumes_mm3:
        from HRpQCTCore.regions import REGIONS

        for r in REGIONS:
            print(f"   {r.name:26s} {result.volumes_mm3[r.key]:10.1f} mm3")
    for warning in result.warnings:
        print(f"   WARNING ({warning['code']}): {warning['message']}")
    if result.probability is not None:
        print(f"   osteoporosis probability {result.probability:.3f}")
    elif result.probability_withheld:
        print(f"   osteoporosis probability {result.probability_withheld}")
    if "regions_seg_nrrd" in result.outputs:
        print(f"   {Path(result.outputs['regions_seg_nrrd']).name}: open it in 3D Slicer")
    if "report" in result.outputs:
        print(f"   report: {result.outputs['report']}")
    print(f"   ({time.perf_counter() - t:.1f} s)")
    print(f"   the scan in NIfTI (HU), if wanted: hrpqct convert {example} "
          f"{out / 'example_scan_hu.nii.gz'}")


def _segment_only(args: argparse.Namespace, scan, out: Path, summary: dict) -> None:
    """Step 2 without the radiomics engine installed: segmentation only."""
    from HRpQCTCore.errors import ArtefactError
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder

    t = _step("2. segmenting into the seven regions")
    try:
        folder = resolve_model_folder(args.model)
    except ArtefactError as exc:
        print(f"   skipped: {exc}")
        return
    from HRpQCTCore.io import write_label_map
    from HRpQCTCore.regions import REGIONS
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.postprocess import postprocess

    seg = run_segmentation(scan.hu, folder, spacing_mm=scan.spacing_mm)
    result = postprocess(seg.labels, scan.hu, scan.spacing_mm)
    seg_path = out / "example_regions.seg.nrrd"
    check_can_write([seg_path], args.overwrite)
    write_label_map(result.regions, scan, seg_path)
    voxel_mm3 = float(scan.spacing_mm[0] * scan.spacing_mm[1] * scan.spacing_mm[2])
    counts = {r.key: int((result.regions == r.label).sum()) for r in REGIONS}
    summary["regions_seg_nrrd"] = str(seg_path)
    summary["region_volumes_mm3"] = {k: round(v * voxel_mm3, 1) for k, v in counts.items()}
    summary["warnings"] = result.warnings
    for r in REGIONS:
        print(f"   {r.name:26s} {counts[r.key] * voxel_mm3:10.1f} mm3")
    print(f"   wrote {seg_path.name} (open it in 3D Slicer) ({time.perf_counter() - t:.1f} s)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the pipeline on the bundled example scan",
        formatter_class=EXAMPLES_FORMATTER,
        description=(
            "Make the bundled example scan (a synthetic phantom, generated from a fixed seed), "
            "read it back like a user scan and run the pipeline on it, leaving every output "
            "in OUT. Run again in OUT, it reuses the example it made there (checked by "
            "checksum) and the run's unchanged steps.\n\nexamples:\n"
            "  hrpqct demo --out demo-output\n"
            "  hrpqct demo --out /tmp/d --slices 16      # quicker, fewer slices"))
    p.add_argument("--out", default="demo-output", help="output folder (default %(default)s)")
    p.add_argument("--slices", type=int, default=EXAMPLE_SLICES,
                   help="slices of the example scan (default %(default)s, a full stack)")
    p.add_argument("--model", help="segmentation model folder (default: the bundled model)")
    p.add_argument("--classifier",
                   help="classifier file (default: the bundled one; 'none' to skip)")
    p.add_argument("--features", default="auto",
                   choices=("auto", "classifier", "basic", "full", "none"),
                   help="feature set, as in hrpqct run (default %(default)s)")
    p.add_argument("--slice-step", type=int, default=DEMO_SLICE_STEP,
                   help="features of every n-th slice (default %(default)s, to keep the demo "
                        "within minutes; 1: all)")
    from HRpQCTPipeline.commands.run import add_trust_options

    add_trust_options(p)
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run)
