"""Dice of the soft-tissue subdivision against phantom tissue truth, by noise level and rules.

The bone/soft-tissue split is taken from the phantom's true 5-class map, so this measures the
soft-tissue rules alone (skin band, seeds, growth, -50 HU split), for the paper's rules and for
this project's default (local HU mean before the rules).

Usage: python benchmarks/bench_soft_tissue.py [--seeds 3] [--slices 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from HRpQCTCore.regions import SOFT_TISSUE_REGIONS
from HRpQCTPhantom import PhantomParams, generate_phantom
from HRpQCTSegmentationEngine.postprocess import DEFAULT, PAPER, PostprocessConfig
from HRpQCTSegmentationEngine.postprocess.soft_tissue import subdivide_soft_tissue

NOISE_LEVELS_HU = (100.0, 150.0, 200.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denominator = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / denominator) if denominator else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=6)
    args = parser.parse_args()
    configs: dict[str, PostprocessConfig] = {
        "paper rules (raw HU)": PAPER,
        "default (0.3 mm local mean)": DEFAULT,
        "0.6 mm local mean": PostprocessConfig(smoothing_window_mm=0.6),
    }
    rows = []
    for noise in NOISE_LEVELS_HU:
        scores: dict[str, list[list[float]]] = {name: [] for name in configs}
        for seed in range(args.seeds):
            params = PhantomParams(n_slices=args.slices, noise_sd_hu=noise, motion_grade=1)
            phantom = generate_phantom(params, seed=500 + seed)
            hu = phantom.scan.hu.astype(np.float32)
            for name, config in configs.items():
                regions = subdivide_soft_tissue(phantom.classes, hu, phantom.scan.spacing_mm,
                                                config)
                scores[name].append([dice(regions == r.label, phantom.regions == r.label)
                                     for r in SOFT_TISSUE_REGIONS])
        for name, values in scores.items():
            mean = np.mean(values, axis=0)
            rows.append((noise, name, *mean))
            print(f"noise {noise:.0f} HU  {name:30s} " + "  ".join(
                f"{r.key} {m:.3f}" for r, m in zip(SOFT_TISSUE_REGIONS, mean, strict=True)),
                flush=True)
    print()
    print(machine())
    print(f"{args.seeds} phantoms x {args.slices} slices (1600 x 1600, 60.7 um) per noise level")
    print("| noise SD (HU) | rules | skin | myotendinous | adipose |")
    print("|---|---|---|---|---|")
    for noise, name, *values in rows:
        print(f"| {noise:.0f} | {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
