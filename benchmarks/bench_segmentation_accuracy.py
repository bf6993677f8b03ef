"""Segmentation accuracy on the held-out phantom test set, before and after post-processing.

For each model given, every test scan is segmented, scored against the 5-class truth as the
network predicts it ("raw"), and again after post-processing (the 7-region result collapsed
back to 5 classes) with the default settings, with the default settings but the network's
surfaces kept (no surface refinement), and with the paper's preset (2D components, raw HU).
The 7-region result is also scored against the phantom's tissue truth (skin, myotendinous,
adipose). Prints tables in the layout of the paper's segmentation table and writes all scores
as JSON.

``--input-fit field --input-fit leg`` scores each model twice, with the network seeing the
whole crop window (the paper's) and only the leg's part of it (the default), side by side.

Usage:
  python benchmarks/make_test_set.py /tmp/test_set
  python benchmarks/bench_segmentation_accuracy.py /tmp/test_set/manifest.csv \\
      --model segformer=path/to/model --model unet=path/to/unet --json scores.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from HRpQCTCore.io import read_scan
from HRpQCTCore.regions import REGIONS, regions_to_classes
from HRpQCTSegmentationEngine.inference import prepare_segmenter, run_segmentation
from HRpQCTSegmentationEngine.metrics import (
    format_class_table,
    format_comparison_table,
    scores_from_labels,
    summarise_scores,
)
from HRpQCTSegmentationEngine.postprocess import DEFAULT, PAPER, postprocess
from HRpQCTSegmentationEngine.preprocessing import INPUT_FITS


def region_dice(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    out = {}
    for r in REGIONS:
        a, b = truth == r.label, pred == r.label
        den = a.sum() + b.sum()
        out[r.key] = float(2 * np.logical_and(a, b).sum() / den) if den else float("nan")
    return out


def input_fit(text: str) -> dict:
    """``field``, ``leg`` or ``leg:MARGIN`` -> PreprocessingConfig fields to replace."""
    fit, _, margin = text.partition(":")
    if fit not in INPUT_FITS or (margin and not margin.isdigit()):
        raise argparse.ArgumentTypeError(f"expected field, leg or leg:MARGIN_PX, not {text!r}")
    return {"input_fit": fit, **({"leg_margin_px": int(margin)} if margin else {})}


def read_test_case(manifest: Path, row: dict) -> tuple:
    """A test-set row's scan, 5-class truth and 7-region truth (paths relative to the
    manifest, as ``make_test_set.py`` writes them)."""
    scan = read_scan(manifest.parent / row["image"])
    truth = read_scan(manifest.parent / row["labels"], units="hu").hu.astype(np.uint8)
    truth_regions = read_scan(manifest.parent / row["regions"], units="hu").hu.astype(np.uint8)
    return scan, truth, truth_regions


def score_raw(scan, truth: np.ndarray, runner, config) -> tuple:
    """Segment ``scan`` and score the raw network output against the 5-class truth.

    Returns ``(ClassScores, SegmentationResult, seconds)``. The scan's voxel size is passed
    on, so a scan off the model's training voxel size is resampled to it (at the test sets'
    0.0607 mm nothing changes).
    """
    t0 = time.perf_counter()
    seg = run_segmentation(scan.hu, runner, config=config, spacing_mm=scan.spacing_mm)
    seconds = time.perf_counter() - t0
    return scores_from_labels(truth, seg.labels), seg, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--limit", type=int, help="only the first N scans")
    parser.add_argument("--input-fit", action="append", type=input_fit,
                        metavar="{field,leg}[:MARGIN_PX]",
                        help="what of the crop window the network sees, e.g. 'field', 'leg' "
                             "or 'leg:16' (16 network pixels of air around the leg); repeat "
                             "to compare (default: the model's setting)")
    args = parser.parse_args()
    manifest = Path(args.manifest)
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[: args.limit]
    variants = {"post-processed (default)": DEFAULT,
                "post-processed, surfaces as predicted": DEFAULT.without_surface_refinement(),
                "post-processed (paper preset)": PAPER}
    results: dict = {"machine": machine(), "scans": len(rows), "models": {}}
    comparison = {}
    for spec, fit in [(m, f) for m in args.model for f in (args.input_fit or [None])]:
        name, folder = spec.split("=", 1)
        runner, config = prepare_segmenter(folder)
        if fit is not None:
            config = replace(config, **fit)
            name = f"{name} ({':'.join(str(v) for v in fit.values())})"
        raw_scores, post_scores = [], {k: [] for k in variants}
        tissue = {k: [] for k in variants}
        seconds, windows = [], []
        for row in rows:
            scan, truth, truth_regions = read_test_case(manifest, row)
            raw, seg, took = score_raw(scan, truth, runner, config)
            seconds.append(took)
            windows.append(list(seg.crop_box.shape))
            raw_scores.append(raw)
            for key, pp_config in variants.items():
                result = postprocess(seg.labels, scan.hu, scan.spacing_mm, pp_config)
                post_scores[key].append(scores_from_labels(truth,
                                                           regions_to_classes(result.regions)))
                tissue[key].append(region_dice(truth_regions, result.regions))
            print(f"{name} {row['subject']}: done", flush=True)
        entry = {"raw": summarise_scores(raw_scores).to_dict(),
                 "seconds_per_scan": float(np.mean(seconds)), "network_windows": windows}
        print(f"\n{name}: segmentation {np.mean(seconds):.1f} s per scan; network windows "
              f"(voxels) {', '.join('x'.join(map(str, w)) for w in windows)}")
        print(f"\n### {name}: raw network output\n")
        print(format_class_table(summarise_scores(raw_scores)))
        comparison[f"{name} (raw)"] = summarise_scores(raw_scores)
        for key in variants:
            summary = summarise_scores(post_scores[key])
            entry[key] = summary.to_dict()
            entry[f"{key} tissue dice"] = {
                r.key: float(np.nanmean([t[r.key] for t in tissue[key]])) for r in REGIONS}
            comparison[f"{name} {key}"] = summary
            print(f"\n### {name}: {key}\n")
            print(format_class_table(summary))
            print("tissue Dice:", json.dumps(entry[f"{key} tissue dice"], indent=None))
        results["models"][name] = entry
    print("\n### comparison (IoU per class, %)\n")
    print(format_comparison_table(comparison))
    print("\n" + machine())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
