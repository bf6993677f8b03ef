"""The bundled model on scans of another voxel size: with and without resampling.

First-generation XtremeCT scans have 82 um voxels; the bundled model was trained on
60.7 um phantoms (``training_voxel_mm`` in its metadata). This makes a few phantoms at
82 um with the same field of view in mm (the leg's: ``field_px * voxel_mm`` of the default
1600 x 60.7 um = 97 mm) and scores the raw network output (per-class IoU on the scan's
own grid) when each slice is resampled to the model's voxel size (the default,
:func:`HRpQCTSegmentationEngine.inference.model_grid`) and when it is not (the behaviour
before). The same subjects at 60.7 um are the reference.

Usage:
  python benchmarks/bench_voxel_size.py --subjects 3 --slices 4 --json voxel.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTPhantom import PhantomParams, generate_phantom
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.inference import prepare_segmenter, run_segmentation
from HRpQCTSegmentationEngine.metrics import scores_from_labels, summarise_scores

FIELD_MM = 1600 * 0.0607


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--voxel-mm", type=float, default=0.082)
    parser.add_argument("--seed", type=int, default=9100)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    runner, config = prepare_segmenter(resolve_model_folder(None))
    print(f"model training voxel: {runner.training_voxel_mm} mm", flush=True)
    runs = {f"{args.voxel_mm * 1000:.1f} um, resampled to the model": [],
            f"{args.voxel_mm * 1000:.1f} um, not resampled (before)": [],
            "60.7 um (reference)": []}
    keys = list(runs)
    seconds = {k: [] for k in keys}
    rng = np.random.default_rng(args.seed)
    for i in range(args.subjects):
        base = PhantomParams.sample(rng, osteoporotic=bool(i % 2))
        base = replace(base, n_slices=args.slices)
        field_px = round(FIELD_MM / args.voxel_mm)
        coarse = generate_phantom(replace(base, voxel_mm=args.voxel_mm, field_px=field_px),
                                  seed=args.seed + i)
        fine = generate_phantom(replace(base, voxel_mm=0.0607, field_px=1600),
                                seed=args.seed + i)
        for key, phantom, spacing in (
                (keys[0], coarse, coarse.scan.spacing_mm), (keys[1], coarse, None),
                (keys[2], fine, fine.scan.spacing_mm)):
            t0 = time.perf_counter()
            seg = run_segmentation(phantom.scan.hu, runner, config=config, spacing_mm=spacing)
            seconds[key].append((time.perf_counter() - t0) / args.slices)
            assert seg.labels.shape == phantom.classes.shape
            runs[key].append(scores_from_labels(phantom.classes, seg.labels))
        print(f"subject {i}: field {field_px} px x {args.voxel_mm} mm = "
              f"{field_px * args.voxel_mm:.1f} mm", flush=True)
    names = [c.key for c in NETWORK_CLASSES]
    header = "| class | " + " | ".join(keys) + " |"
    lines = [header, "|---" * (len(keys) + 1) + "|"]
    summaries = {k: summarise_scores(v) for k, v in runs.items()}
    for c, name in enumerate(names):
        if c == 0:
            continue
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * summaries[k].iou_mean[c]:.1f} ± {100 * summaries[k].iou_sd[c]:.1f}"
            for k in keys) + " |")
    lines.append("| **mean (foreground)** | " + " | ".join(
        f"{100 * summaries[k].mean_iou[0]:.1f}" for k in keys) + " |")
    lines.append("| seconds per slice | " + " | ".join(
        f"{np.mean(seconds[k]):.2f}" for k in keys) + " |")
    print("\n" + "\n".join(lines))
    print("\n" + machine())
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "subjects": args.subjects, "slices": args.slices,
             "voxel_mm": args.voxel_mm, "runs": {k: s.to_dict() for k, s in summaries.items()},
             "seconds_per_slice": {k: float(np.mean(v)) for k, v in seconds.items()}},
            indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
