"""Write the held-out phantom test set used for the segmentation accuracy table.

Subjects are drawn with seeds never used for training (phantom seeds 9000+; the training
cohort of the bundled model, `hrpqct cohort --seed 1000`, draws its 48 phantom seeds from
31,939,429 up), on a grid of noise SD {100, 150, 200} HU x motion grade {1, 2, 3}, half
osteoporotic. ``--seed-base`` draws another set of the same design (e.g. 9500 for a
confirmation set of settings chosen while looking at the first). Writes NIfTI scans, 5-class
and 7-region truth, and ``manifest.csv`` with columns ``subject, image, labels, regions,
noise_sd_hu, motion_grade``.

``--fibula-gap-mm 0.5 1.2`` draws a set whose fibulae come closer to the tibia than the
default cohorts' (a set for the wedge between the bones; the same seeds give the same subjects
otherwise).

Usage: python benchmarks/make_test_set.py OUT_DIR [--slices 12] [--repeats 1] [--seed-base 9000]
                                          [--fibula-gap-mm LOW HIGH]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from HRpQCTPhantom import FIBULA_GAP_RANGE_MM, PhantomParams, generate_phantom, write_phantom

TEST_SEED_BASE = 9000
NOISE_LEVELS_HU = (100.0, 150.0, 200.0)
MOTION_GRADES = (1, 2, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed-base", type=int, default=TEST_SEED_BASE,
                        help="first seed (>= 9000: never used by training cohorts)")
    parser.add_argument("--fibula-gap-mm", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=FIBULA_GAP_RANGE_MM,
                        help="range of the narrowest tibia-fibula distance (default 1.2 4.5)")
    args = parser.parse_args()
    if args.seed_base < TEST_SEED_BASE:
        parser.error(f"--seed-base must be >= {TEST_SEED_BASE} (lower seeds are training seeds)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for repeat in range(args.repeats):
        for noise in NOISE_LEVELS_HU:
            for motion in MOTION_GRADES:
                seed = args.seed_base + k
                rng = np.random.default_rng(seed)
                params = PhantomParams.sample(rng, osteoporotic=bool(k % 2), n_slices=args.slices,
                                              noise_sd_hu=noise, motion_grade=motion,
                                              fibula_gap_range_mm=tuple(args.fibula_gap_mm))
                phantom = generate_phantom(params, seed=seed)
                stem = f"test-{k:03d}"
                paths = write_phantom(phantom, out / stem, stem)
                rows.append({"subject": stem, "image": paths["scan"].relative_to(out),
                             "labels": paths["classes"].relative_to(out),
                             "regions": paths["regions"].relative_to(out),
                             "noise_sd_hu": noise, "motion_grade": motion, "repeat": repeat})
                print(stem, noise, motion, flush=True)
                k += 1
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
