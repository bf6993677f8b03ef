"""Which per-slice uncertainty signal tracks the bundled model's errors? (synthetic phantoms)

Full-resolution phantoms (1600 x 1600, 60.7 um) with induced failures -- HU offset and
calibration-slope errors, blur, off-centre legs cut by the field, zeroed or noise-filled rows,
strong motion, heavy noise -- are segmented with the bundled SegFormer (ONNX Runtime, the
pipeline's path) with the flipped second pass on, so every candidate of
:mod:`HRpQCTSegmentationEngine.uncertainty` is computed for every slice. The truth is the
phantom's 5-class map; a slice "fails" when the mean IoU of the four bone classes (tibial and
fibular cortical and trabecular, classes present in truth or prediction) is below 90 %. The
table gives each candidate's AUROC for separating failed slices from the rest, and the extra
CPU time per scan of each method. A label-only candidate (``area_outlier``: the slice's tibia
area against the scan's median, no network cost) is added for comparison.

Everything is synthetic: the numbers say how the signals behave on this project's phantoms,
not on real scans.

Usage::

    python benchmarks/bench_uncertainty.py                      # 10 scans x 8 slices
    python benchmarks/bench_uncertainty.py --scans 12 --slices 12 --json unc.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

BONE = (1, 2, 3, 4)
FAIL_IOU = 0.9


# --- induced failures -------------------------------------------------------------------------

def _rows(hu: np.ndarray, z: int, rng: np.random.Generator, fill: str) -> None:
    """Replace a band of ~30 % of the rows of slice ``z`` (a damaged reconstruction)."""
    ny = hu.shape[1]
    start = int(rng.integers(ny // 4, ny // 2))
    band = slice(start, start + int(0.3 * ny))
    if fill == "zero":
        hu[z, band] = 0.0
    else:
        hu[z, band] = rng.normal(0.0, 800.0, hu[z, band].shape)


def _blur(hu: np.ndarray, z: int, sigma_px: float) -> None:
    from scipy import ndimage

    hu[z] = ndimage.gaussian_filter(hu[z], sigma_px)


#: name -> (phantom parameter changes, per-slice perturbation or None, slices it hits)
CONDITIONS = {
    "clean": ({}, None, "none"),
    "clean-left": ({"side": "left", "rotation_deg": -10.0}, None, "none"),
    "hu-offset+500": ({}, lambda hu, z, rng: hu.__setitem__(z, hu[z] + 500.0), "half"),
    "slope-0.6": ({}, lambda hu, z, rng: hu.__setitem__(z, (hu[z] + 1000.0) * 0.6 - 1000.0),
                  "half"),
    "blur-0.5mm": ({}, lambda hu, z, rng: _blur(hu, z, 0.5 / 0.0607), "half"),
    "off-centre-25mm": ({"translation_mm": (25.0, -8.0)}, None, "none"),
    "zeroed-rows": ({}, lambda hu, z, rng: _rows(hu, z, rng, "zero"), "half"),
    "noise-rows": ({}, lambda hu, z, rng: _rows(hu, z, rng, "noise"), "half"),
    "motion-5": ({"motion_grade": 5}, None, "none"),
    "noise-350": ({"noise_sd_hu": 350.0}, None, "none"),
    "blur-1mm": ({}, lambda hu, z, rng: _blur(hu, z, 1.0 / 0.0607), "half"),
    "hu-offset-400": ({}, lambda hu, z, rng: hu.__setitem__(z, hu[z] - 400.0), "half"),
}


def make_scan(condition: str, n_slices: int, seed: int):
    """A phantom with its condition applied: ``(hu float32, truth classes, perturbed mask)``."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    changes, perturb, _which = CONDITIONS[condition]
    phantom = generate_phantom(PhantomParams(n_slices=n_slices, **changes), seed=seed)
    hu = phantom.scan.hu.astype(np.float32)
    hit = np.zeros(n_slices, dtype=bool)
    rng = np.random.default_rng(seed)
    if perturb is not None:
        hit[1::2] = True  # every other slice: failures and their clean neighbours in one scan
        for z in np.flatnonzero(hit):
            perturb(hu, z, rng)
    return hu, phantom.classes, hit


# --- measures ---------------------------------------------------------------------------------

def bone_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean IoU of the bone classes present in either map (1.0 if none in both)."""
    scores = []
    for c in BONE:
        t, p = truth == c, pred == c
        union = np.count_nonzero(t | p)
        if union:
            scores.append(np.count_nonzero(t & p) / union)
    return float(np.mean(scores)) if scores else 1.0


def area_outlier(labels: np.ndarray) -> np.ndarray:
    """|tibia area - the scan's median| / median per slice (labels only, no network)."""
    area = np.array([np.count_nonzero(np.isin(s, (1, 2))) for s in labels], dtype=np.float64)
    median = np.median(area)
    return np.abs(area - median) / max(median, 1.0)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count half; NaN scores rank highest)."""
    score = np.where(np.isfinite(score), score, np.inf)
    pos, neg = score[positive], score[~positive]
    if not pos.size or not neg.size:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _cpu_s() -> float:
    return time.process_time()  # every thread of this process (ONNX Runtime's too)


# --- the run ----------------------------------------------------------------------------------

def run(n_scans: int, n_slices: int, seed: int) -> dict:
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.inference import prepare_segmenter, run_segmentation
    from HRpQCTSegmentationEngine.uncertainty import CANDIDATES

    runner, config = prepare_segmenter(resolve_model_folder(None), device="cpu")
    names = list(CONDITIONS)
    rows, costs = [], {"none": [], "margin": [], "flip": []}
    for i in range(n_scans):
        condition = names[i % len(names)]
        hu, truth, hit = make_scan(condition, n_slices, seed + i)
        per_method = {}
        for method in ("none", "margin", "flip") if i < 2 else ("flip",):
            c0, w0 = _cpu_s(), time.perf_counter()
            seg = run_segmentation(hu, runner, config=config, uncertainty=method)
            costs[method].append((_cpu_s() - c0, time.perf_counter() - w0))
            per_method[method] = seg
        seg = per_method["flip"]
        if "none" in per_method:
            assert np.array_equal(per_method["none"].labels, seg.labels), "labels changed"
        outlier = area_outlier(seg.labels)
        for z in range(n_slices):
            row = {"scan": i, "condition": condition, "slice": z, "perturbed": bool(hit[z]),
                   "iou": bone_iou(truth[z], seg.labels[z]),
                   "area_outlier": float(outlier[z])}
            for name in CANDIDATES:
                row[name] = float(seg.uncertainty_signals[name][z])
            rows.append(row)
        ious = [r["iou"] for r in rows if r["scan"] == i]
        print(f"scan {i:2d} {condition:16s} bone IoU min {min(ious):.3f} mean "
              f"{np.mean(ious):.3f}  ({seg.seconds:.0f} s)", flush=True)
    return {"rows": rows, "costs": costs, "candidates": [*CANDIDATES, "area_outlier"]}


def summarise(result: dict) -> str:
    rows = result["rows"]
    failed = np.array([r["iou"] < FAIL_IOU for r in rows])
    lines = [f"{len(rows)} slices, {int(failed.sum())} with bone IoU < {FAIL_IOU:.0%}", "",
             "| signal | passes | AUROC (IoU < 90 %) | median, ok slices | median, failed |",
             "|---|---|---|---|---|"]
    passes = {"msp": 1, "entropy": 1, "margin": 1, "energy": 1, "flip_change": 2,
              "flip_l1": 2, "area_outlier": "labels"}
    for name in result["candidates"]:
        score = np.array([r[name] for r in rows])
        fin = np.isfinite(score)
        lines.append(
            f"| {name} | {passes[name]} | {auroc(score, failed):.3f} | "
            f"{np.median(score[fin & ~failed]):.4f} | "
            f"{np.median(score[fin & failed]) if (fin & failed).any() else float('nan'):.4f} |")
    costs = result["costs"]
    lines += ["", "| method | CPU s per scan | wall s per scan | extra CPU s vs none |",
              "|---|---|---|---|"]
    base = np.mean([c for c, _ in costs["none"]]) if costs["none"] else float("nan")
    for method, values in costs.items():
        if values:
            cpu = np.mean([c for c, _ in values])
            wall = np.mean([w for _, w in values])
            lines.append(f"| {method} | {cpu:.1f} | {wall:.1f} | {cpu - base:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=10)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--json", help="write every slice's numbers here")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"load average: {os.getloadavg()}, date {time.strftime('%Y-%m-%d %H:%M')}")
    result = run(args.scans, args.slices, args.seed)
    print(summarise(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
