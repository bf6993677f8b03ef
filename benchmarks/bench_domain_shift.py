"""Another site's scanner: what hurts the bundled model, and how far fine-tuning on a few
corrected scans brings it back (issue #17, item 5).

Three steps, each a sub-command (synthetic phantoms only; CPU-heavy, run one at a time):

``sweep``
    One image-formation change at a time, then all together, on the same subjects: the
    bundled model's raw output against the 5-class truth (IoU %). Shows what hurts most.
``make``
    Writes the shifted site (:data:`SITES`): a pool of training scans whose truth stands
    for a radiologist's corrections, held-out test scans, and the same test subjects
    rendered by the in-domain scanner (the reference the gap is measured to). Manifests for
    1, 2 and 4 corrected scans, with every slice corrected ("full") or only
    ``--corrected-slices`` of each ("partial": the ``slices`` column, the others are left
    out of the loss).
``adapt``
    Fine-tunes the bundled model on each manifest with ``hrpqct train-segmenter
    --init-from bundled`` and the command's own fine-tuning defaults (the same call a user
    or the Slicer module makes), then scores the bundled model in-domain and on the site,
    and every fine-tuned model on the site and in-domain (does it forget?). Prints the gap
    recovered, ``(fine-tuned - bundled) / (in-domain - bundled)`` of mean IoU on the site,
    and each fine-tune's CPU and wall time. Writes ``OUT/results.json``.

Usage:
  python benchmarks/bench_domain_shift.py sweep --subjects 3 --slices 3
  python benchmarks/bench_domain_shift.py make --out /work/data/site1
  python benchmarks/bench_domain_shift.py adapt --out /work/data/site1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_gb
from bench_segmentation_accuracy import read_test_case, score_raw

from HRpQCTCore.regions import BACKGROUND, NETWORK_CLASSES
from HRpQCTPhantom import PhantomParams, generate_phantom, write_phantom
from HRpQCTPipeline.cli import main as hrpqct
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.inference import prepare_segmenter
from HRpQCTSegmentationEngine.metrics import summarise_scores

#: First-generation XtremeCT at another site, as far as the phantom can draw it: 82 um
#: voxels over the same 97 mm field, a blurrier point-spread function, coarser and stronger
#: noise, another HU calibration, legs placed off the scanner's centre.
#: The default, ``xtremect1``, is where the bundled model fails; ``xtremect1-mild``, the same
#: with a less blurred point-spread function (0.15 mm), is where it still copes.
_XTREMECT1 = {"voxel_mm": 0.082, "field_px": 1184, "noise_sd_hu": 220.0,
              "noise_corr_mm": 0.12, "calibration_scale": 0.8, "calibration_offset_hu": 60.0}
SITES: dict[str, dict] = {
    "xtremect1": {**_XTREMECT1, "blur_sigma_mm": 0.18},
    "xtremect1-mild": {**_XTREMECT1, "blur_sigma_mm": 0.15},
}
OFF_CENTRE_MM = 12.0  # distance of the leg from the field's centre at the shifted site

#: One change at a time for ``sweep`` (name -> PhantomParams fields), then all of them.
SWEEP: dict[str, dict] = {
    "82 um voxels (same field)": {"voxel_mm": 0.082, "field_px": 1184},
    "blur sigma 0.13 mm (0.07)": {"blur_sigma_mm": 0.13},
    "blur sigma 0.15 mm": {"blur_sigma_mm": 0.15},
    "blur sigma 0.18 mm": {"blur_sigma_mm": 0.18},
    "noise texture 0.12 mm (0.045)": {"noise_corr_mm": 0.12},
    "noise SD 220 HU (100-200)": {"noise_sd_hu": 220.0},
    "calibration x0.85 +100 HU": {"calibration_scale": 0.85, "calibration_offset_hu": 100.0},
    "calibration x0.8 +60 HU": {"calibration_scale": 0.8, "calibration_offset_hu": 60.0},
    "leg 12 mm off centre": {"off_centre": True},
    "blur sigma 0.20 mm": {"blur_sigma_mm": 0.20},
    "noise SD 300 HU, texture 0.12 mm": {"noise_sd_hu": 300.0, "noise_corr_mm": 0.12},
    "calibration x0.7": {"calibration_scale": 0.7},
    "motion grade 4": {"motion_grade": 4},
    "motion grade 5": {"motion_grade": 5},
    "cast": {"cast": True},
    "leg tilted 8 degrees": {"tilt_deg": 8.0},
}

TRAIN_SEED_BASE, TEST_SEED_BASE = 9700, 9800  # >= 9000: never drawn by training cohorts
SCAN_COUNTS = (1, 2, 4)


# ------------------------------------------------------------------------------------------
# Phantoms
# ------------------------------------------------------------------------------------------
def subject_params(seed: int, n_slices: int, motion_grade: int, change: dict) -> PhantomParams:
    """One subject (alternating groups) with an image-formation change applied."""
    rng = np.random.default_rng(seed)
    change = dict(change)
    params = PhantomParams.sample(rng, osteoporotic=bool(seed % 2), n_slices=n_slices,
                                  motion_grade=motion_grade)
    if change.pop("off_centre", False):
        angle = rng.uniform(0.0, 2.0 * np.pi)
        change["translation_mm"] = (OFF_CENTRE_MM * float(np.cos(angle)),
                                    OFF_CENTRE_MM * float(np.sin(angle)))
    return replace(params, **change)


def site_change(site: str) -> dict:
    """The PhantomParams changes of a named site, off-centre legs included."""
    return {**SITES[site], "off_centre": True}


def foreground_iou(summary) -> dict[str, float]:
    """IoU % per foreground class and the mean over scans of each scan's class mean, from a
    :class:`~HRpQCTSegmentationEngine.metrics.ScoreSummary`."""
    out = {c.name: 100.0 * float(summary.iou_mean[c.label]) for c in NETWORK_CLASSES
           if c.label != BACKGROUND.label}
    out["mean"] = 100.0 * float(summary.mean_iou[0])
    return out


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> dict:
    """The bundled model under each change alone and all together, on the same subjects."""
    runner, config = prepare_segmenter(resolve_model_folder(None))
    changes = {"in-domain (reference)": {}, **SWEEP,
               f"all together ({args.site})": site_change(args.site)}
    if args.only:
        changes = {name: change for name, change in changes.items()
                   if name.startswith("in-domain") or any(o in name for o in args.only)}
    rows = {}
    for name, change in changes.items():
        per_scan = []
        for k in range(args.subjects):
            seed = TEST_SEED_BASE + 50 + k
            params = subject_params(seed, args.slices, 1 + k % 3, change)
            phantom = generate_phantom(params, seed=seed)
            raw, _, _ = score_raw(phantom.scan, phantom.classes, runner, config)
            per_scan.append(raw)
        rows[name] = foreground_iou(summarise_scores(per_scan))
        print(f"{name}: mean IoU {rows[name]['mean']:.1f}", flush=True)
    print_table(f"Bundled model, raw output, {args.subjects} subjects x {args.slices} slices "
                "(IoU %)", rows, reference="in-domain (reference)")
    return {"sweep": rows}


# ------------------------------------------------------------------------------------------
# make
# ------------------------------------------------------------------------------------------
def write_subject(out: Path, stem: str, params: PhantomParams, seed: int) -> dict:
    """Generate and write one phantom; its manifest row (paths relative to ``out``)."""
    paths = write_phantom(generate_phantom(params, seed=seed), out / stem, stem)
    return {"subject": stem, "image": str(paths["scan"].relative_to(out)),
            "labels": str(paths["classes"].relative_to(out)),
            "regions": str(paths["regions"].relative_to(out)),
            "motion_grade": params.motion_grade}


def write_manifest(path: Path, rows: list[dict]) -> None:
    """A CSV of rows with the columns of the first."""
    fields = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def corrected_slices(n_slices: int, n_corrected: int) -> str:
    """Evenly spaced slice numbers a user corrected, as the manifest's ``slices`` column."""
    chosen = np.unique(np.linspace(0, n_slices - 1, n_corrected).round().astype(int))
    return ",".join(str(z) for z in chosen)


def make(args: argparse.Namespace) -> dict:
    """Write the site's training pool, its test scans, their in-domain twins and manifests."""
    change = site_change(args.site)
    site, train, reference = args.out / "site-test", args.out / "site-train", args.out / "in-domain"
    pool = [write_subject(train, f"train-{k:02d}", subject_params(
        TRAIN_SEED_BASE + k, args.train_slices, 1 + k % 3, change), TRAIN_SEED_BASE + k)
        for k in range(max(SCAN_COUNTS))]
    tests, twins = [], []
    for k in range(args.test_subjects):
        seed, grade = TEST_SEED_BASE + k, 1 + k % 3
        tests.append(write_subject(site, f"test-{k:02d}",
                                   subject_params(seed, args.test_slices, grade, change), seed))
        twins.append(write_subject(reference, f"test-{k:02d}",
                                   subject_params(seed, args.test_slices, grade, {}), seed))
        print(f"test subject {k}: written", flush=True)
    write_manifest(site / "manifest.csv", tests)
    write_manifest(reference / "manifest.csv", twins)
    partial = corrected_slices(args.train_slices, args.corrected_slices)
    for n in SCAN_COUNTS:
        full_rows = [{**row, **{key: str(train / row[key]) for key in ("image", "labels",
                                                                         "regions")},
                      "slices": ""} for row in pool[:n]]
        write_manifest(args.out / f"train-{n}-full.csv", full_rows)
        write_manifest(args.out / f"train-{n}-partial.csv",
                       [{**row, "slices": partial} for row in full_rows])
    return {"site": args.site, "change": change, "partial_slices": partial}


# ------------------------------------------------------------------------------------------
# adapt
# ------------------------------------------------------------------------------------------
def fine_tune(manifest: Path, out: Path) -> dict:
    """``hrpqct train-segmenter --init-from bundled`` with the fine-tuning defaults."""
    command = ["train-segmenter", "--manifest", str(manifest), "--out", str(out),
               "--init-from", "bundled", "--device", "cpu", "--progress", "none",
               "--overwrite"]
    printed = io.StringIO()
    cpu0, wall0 = _children_cpu() + time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = hrpqct(command)
    cpu = _children_cpu() + time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    if code != 0:
        raise SystemExit(f"hrpqct {' '.join(command)} failed with exit code {code}")
    summary = json.loads(printed.getvalue())
    print(f"{out.name}: {summary['step']} steps, best validation mIoU "
          f"{summary['best']['val_mean_iou']:.4f}; {cpu:.0f} CPU s, {wall:.0f} s wall",
          flush=True)
    return {"command": "hrpqct " + " ".join(command), "cpu_seconds": cpu,
            "wall_seconds": wall, "steps": summary["step"], "best": summary["best"]}


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def score(manifest: Path, model: Path) -> dict:
    """Raw-output IoU % of one model over one test set's scans."""
    runner, config = prepare_segmenter(model)
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    per_scan = [score_raw(*read_test_case(manifest, row)[:2], runner, config)[0]
                for row in rows]
    return foreground_iou(summarise_scores(per_scan))


def adapt(args: argparse.Namespace) -> dict:
    """Fine-tune on 1, 2, 4 corrected scans (full and partial), score, compare with the gap."""
    bundled = resolve_model_folder(None)
    site = args.out / "site-test" / "manifest.csv"
    reference = args.out / "in-domain" / "manifest.csv"
    scores = {"in-domain: bundled": score(reference, bundled),
              "site: bundled": score(site, bundled)}
    print_table("so far", scores)
    arms = {}
    for n in SCAN_COUNTS:
        for labels in ("full", "partial"):
            name = f"{n} scan{'s' if n > 1 else ''}, {labels}"
            folder = args.out / f"model-{n}-{labels}"
            arms[name] = fine_tune(args.out / f"train-{n}-{labels}.csv", folder)
            scores[f"site: {name}"] = score(site, folder)
            scores[f"in-domain: {name}"] = score(reference, folder)
            print_table("so far", scores)
    gap = scores["in-domain: bundled"]["mean"] - scores["site: bundled"]["mean"]
    print_table("Raw network output against the 5-class truth (IoU %, mean over scans)",
                scores)
    print("| fine-tuned on | steps | CPU s | wall s | site mean IoU | gap recovered |")
    print("|---|---|---|---|---|---|")
    for name, arm in arms.items():
        gained = scores[f"site: {name}"]["mean"] - scores["site: bundled"]["mean"]
        arm["gap_recovered"] = gained / gap if gap > 0 else None
        recovered = f"{100 * arm['gap_recovered']:.0f} %" if gap > 0 else "no gap"
        print(f"| {name} | {arm['steps']} | {arm['cpu_seconds']:.0f} | "
              f"{arm['wall_seconds']:.0f} | {scores[f'site: {name}']['mean']:.1f} | "
              f"{recovered} |")
    return {"scores": scores, "arms": arms, "gap_points": gap}


# ------------------------------------------------------------------------------------------
def print_table(title: str, rows: dict[str, dict], reference: str | None = None) -> None:
    """A Markdown table of IoU % per class (and the change from ``reference``)."""
    classes = [c.name for c in NETWORK_CLASSES if c.label != BACKGROUND.label]
    print(f"\n### {title}\n")
    extra = " | vs reference" if reference else ""
    print("| | " + " | ".join(classes) + f" | mean{extra} |")
    print("|---" * (len(classes) + 2 + bool(reference)) + "|")
    for name, row in rows.items():
        delta = f" | {row['mean'] - rows[reference]['mean']:+.1f}" if reference else ""
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in classes)
              + f" | {row['mean']:.1f}{delta} |")
    print(flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Usage" + __doc__.split("Usage", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("sweep", help="what hurts the bundled model")
    one.add_argument("--subjects", type=int, default=3)
    one.add_argument("--slices", type=int, default=3)
    one.add_argument("--json", type=Path, help="also write the results here")
    one.add_argument("--only", action="append", metavar="TEXT",
                     help="only the changes whose name contains TEXT (repeatable)")
    two = commands.add_parser("make", help="write the shifted site's scans and manifests")
    two.add_argument("--train-slices", type=int, default=30)
    two.add_argument("--corrected-slices", type=int, default=10,
                     help="slices per scan corrected in the partial manifests")
    two.add_argument("--test-subjects", type=int, default=6)
    two.add_argument("--test-slices", type=int, default=6)
    three = commands.add_parser("adapt", help="fine-tune and score (after make)")
    for sub in (one, two, three):
        sub.add_argument("--site", choices=sorted(SITES), default="xtremect1")
    for sub in (two, three):
        sub.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; print the machine, load and date with its results."""
    args = parse_args(argv)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    if getattr(args, "out", None):
        args.out.mkdir(parents=True, exist_ok=True)
    results = {"sweep": sweep, "make": make, "adapt": adapt}[args.command](args)
    results.update(machine=machine(), started=started, load_before=load_before,
                   load_after=os.getloadavg(), peak_rss_gb=peak_rss_gb(),
                   arguments={k: str(v) for k, v in vars(args).items()})
    print(f"Synthetic phantoms only. {machine()}; load average before {load_before[0]:.1f}, "
          f"after {results['load_after'][0]:.1f}; started {started}")
    target = getattr(args, "json", None) or (getattr(args, "out", None) and
                                              args.out / f"{args.command}.json")
    if target:
        Path(target).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
