"""Soft-tissue Dice by motion grade and under calibration changes, on the held-out test sets.

For every scan of the given test-set manifests (``make_test_set.py``: noise 100/150/200 HU x
motion grade 1/2/3), the soft tissue is split into skin, myotendinous and adipose tissue by
several rule sets and scored (Dice) against the phantom's tissue truth, per motion grade:

* the bone/soft-tissue split is either the phantom's true 5-class map ("truth": the rules
  alone) or the bundled network's output after the bone clean-up and surface refinement
  ("network": what a user gets);
* the scan's HU are optionally re-calibrated (``--calibration``: offsets of +-150 HU and a
  0.85 scale, the differences between scanners' soft-tissue HU), with the bone/soft-tissue
  split kept, so only the soft-tissue rules see the change.

Usage:
  python benchmarks/bench_soft_tissue_motion.py SET_A/manifest.csv SET_B/manifest.csv \\
      [--network] [--calibration] [--json scores.json]
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
from bench_segmentation_accuracy import read_test_case

from HRpQCTCore.regions import SOFT_TISSUE_REGIONS
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.inference import prepare_segmenter, run_segmentation
from HRpQCTSegmentationEngine.postprocess import DEFAULT, PAPER, clean_classes, refine_surfaces
from HRpQCTSegmentationEngine.postprocess.soft_tissue import (
    soft_tissue_levels,
    subdivide_soft_tissue,
)

_RULES_ONLY = replace(DEFAULT, soft_tissue_model="none")
RULES = {
    "paper rules (raw HU, fixed thresholds)": PAPER,
    "before: 0.3 mm local mean, fixed -50 HU split": DEFAULT.with_fixed_split(),
    "scan's own levels only": replace(_RULES_ONLY, streak_suppression=False,
                                      drift_window_mm=0.0, myotendinous_opening_mm=0.0),
    "own levels + streak suppression": replace(_RULES_ONLY, drift_window_mm=0.0,
                                               myotendinous_opening_mm=0.0),
    "own levels, streaks, drift": replace(_RULES_ONLY, myotendinous_opening_mm=0.0),
    "rules: own levels, streaks, drift, opening": _RULES_ONLY,
    "**default** (the rules, then the learned split)": DEFAULT,
}
#: Under re-calibration and on the network's split only these (the ablation steps, on the
#: true split, say what each step adds).
CALIBRATION_RULES = ("paper rules (raw HU, fixed thresholds)",
                     "before: 0.3 mm local mean, fixed -50 HU split",
                     "rules: own levels, streaks, drift, opening",
                     "**default** (the rules, then the learned split)")
CALIBRATIONS = {"as scanned": (1.0, 0.0), "+150 HU": (1.0, 150.0), "-150 HU": (1.0, -150.0),
                "x 0.85": (0.85, 0.0)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    den = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / den) if den else float("nan")


def network_classes(scan, runner, config) -> np.ndarray:
    """The bundled network's classes after the default bone clean-up and surface refinement."""
    seg = run_segmentation(scan.hu, runner, config=config, spacing_mm=scan.spacing_mm)
    cleaned, _ = clean_classes(seg.labels, scan.spacing_mm, DEFAULT)
    refine_surfaces(cleaned, scan.hu, scan.spacing_mm, DEFAULT)
    return cleaned


def middle_slices(n: int, scan, truth: np.ndarray, truth_regions: np.ndarray) -> tuple:
    """The middle ``n`` slices of a test case (the scan's geometry kept, the stack cut)."""
    z0 = max(0, (scan.n_slices - n) // 2)
    cut = slice(z0, z0 + n)
    return (replace(scan, hu=np.ascontiguousarray(scan.hu[cut])), truth[cut],
            truth_regions[cut])


def score_scan(classes, hu, spacing_mm, truth_regions, rules: dict) -> dict:
    out = {}
    for name, config in rules.items():
        t0 = time.process_time()
        regions = subdivide_soft_tissue(classes, hu, spacing_mm, config)
        out[name] = {"dice": {r.key: dice(regions == r.label, truth_regions == r.label)
                              for r in SOFT_TISSUE_REGIONS},
                     "cpu_s": time.process_time() - t0}
    return out


def table(records: list[dict], split: str, calibration: str) -> str:
    """Markdown: one row per rule set, Dice per region for motion 1 and motion 2-3 per set."""
    sets = sorted({r["set"] for r in records})
    head = ["rules"] + [f"{s} {g}: {r.key}" for s in sets for g in ("m1", "m2-3")
                        for r in SOFT_TISSUE_REGIONS[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [n for n in RULES if all(n in r["scores"] for r in records
                                     if r["split"] == split and r["calibration"] == calibration)]
    for name in names:
        cells = [name]
        for s in sets:
            for grades in ((1,), (2, 3)):
                chosen = [r for r in records if r["set"] == s and r["motion"] in grades
                          and r["split"] == split and r["calibration"] == calibration]
                for region in SOFT_TISSUE_REGIONS[1:]:
                    values = [c["scores"][name]["dice"][region.key] for c in chosen]
                    cells.append(f"{np.mean(values):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--network", action="store_true",
                        help="also score on the bundled network's bone/soft-tissue split")
    parser.add_argument("--calibration", action="store_true",
                        help="also under +-150 HU offsets and a 0.85 scale (true split)")
    parser.add_argument("--calibration-sets", type=int, default=None, metavar="N",
                        help="re-calibrate only the scans of the first N manifests")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="score only the middle N slices of each scan (all by default)")
    parser.add_argument("--no-ablation", action="store_true",
                        help="on the true split too, only the rule sets of the calibration rows")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    runner = config = None
    if args.network:
        runner, config = prepare_segmenter(resolve_model_folder(None))
    records = []
    for index, manifest in enumerate(map(Path, args.manifests)):
        recalibrate = args.calibration and (args.calibration_sets is None
                                            or index < args.calibration_sets)
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            scan, truth, truth_regions = read_test_case(manifest, row)
            if args.slices:
                scan, truth, truth_regions = middle_slices(args.slices, scan, truth,
                                                           truth_regions)
            hu = np.asarray(scan.hu, dtype=np.float32)
            splits = {"truth": truth}
            if args.network:
                splits["network"] = network_classes(scan, runner, config)
            calibrations = CALIBRATIONS if recalibrate else {"as scanned": (1.0, 0.0)}
            base = {"set": manifest.parent.name, "subject": row["subject"],
                    "motion": int(row["motion_grade"]), "noise_sd_hu": float(row["noise_sd_hu"])}
            for split, classes in splits.items():
                for cal, (scale, offset) in calibrations.items():
                    if split == "network" and cal != "as scanned":
                        continue  # the network would see the change too: not the rules alone
                    shifted = hu * np.float32(scale) + np.float32(offset)
                    levels = soft_tissue_levels(classes, shifted, scan.spacing_mm, DEFAULT)
                    # the ablation steps on the true split only
                    ablation = cal == "as scanned" and split == "truth" and not args.no_ablation
                    rules = RULES if ablation else {k: RULES[k] for k in CALIBRATION_RULES}
                    records.append({**base, "split": split, "calibration": cal,
                                    "levels": levels.to_dict(),
                                    "scores": score_scan(classes, shifted, scan.spacing_mm,
                                                         truth_regions, rules)})
            print(f"{manifest.parent.name} {row['subject']} (motion {row['motion_grade']}): done",
                  flush=True)
    print()
    print(machine())
    for split in ("truth", "network"):
        for cal in CALIBRATIONS:
            if any(r["split"] == split and r["calibration"] == cal for r in records):
                print(f"\n### bone/soft-tissue split: {split}; calibration: {cal}\n")
                print(table(records, split, cal))
    skin = [s["dice"]["skin"] for r in records for s in r["scores"].values()]
    print(f"\nskin Dice (identical rules in every variant): {min(skin):.3f}..{max(skin):.3f}")
    cpu = {name: np.mean([r["scores"][name]["cpu_s"] for r in records if name in r["scores"]])
           for name in RULES}
    print("CPU s per scan: " + ", ".join(f"{k}: {v:.1f}" for k, v in cpu.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
