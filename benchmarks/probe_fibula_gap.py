"""Where a fibula close to the tibia goes wrong: the network or the post-processing (issue #17).

Usage: python benchmarks/probe_fibula_gap.py [--gap-mm 0.8 [--gap-mm 0.6 ...]] [--seed 9990]
           [--slices 4] [--model NAME=FOLDER ...]

Makes one full-resolution phantom per gap (parameters sampled as the cohort does, normal bone,
then the narrowest tibia-fibula distance set to ``--gap-mm``; the default cohorts draw 1.2 to
4.5 mm, so the bundled model never saw less), segments it with each model (default: the
bundled one) and the default post-processing, and prints the 7-region confusions above 300
voxels and, for the true adipose voxels labelled tibial trabecular (the wedge between the
bones), the network's raw class there. All data are synthetic.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap-mm", type=float, action="append")
    parser.add_argument("--seed", type=int, default=9990)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--model", action="append", metavar="NAME=FOLDER",
                        help="a model folder to probe (default: bundled=the bundled model)")
    args = parser.parse_args()
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder

    print(machine())
    models = [m.split("=", 1) for m in (args.model or [])] or [
        ("bundled", str(resolve_model_folder(None)))]
    for gap_mm in args.gap_mm or [0.8]:
        params = PhantomParams.sample(np.random.default_rng(args.seed), osteoporotic=False)
        params = replace(params, fibula_gap_mm=gap_mm, n_slices=args.slices)
        phantom = generate_phantom(params, seed=args.seed)
        for name, folder in models:
            print(f"fibula gap {gap_mm} mm, seed {args.seed}, {args.slices} slices, "
                  f"model {name}")
            probe(phantom, folder)


def probe(phantom, folder: str) -> None:
    """Print the confusions of one phantom segmented with one model folder."""
    from HRpQCTCore.regions import REGIONS, region_by_name
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.postprocess import postprocess

    seg = run_segmentation(phantom.scan.hu, folder, spacing_mm=phantom.scan.spacing_mm)
    raw = seg.labels.copy()
    regions = postprocess(seg.labels, phantom.scan.hu, phantom.scan.spacing_mm).regions
    names = {0: "background", **{d.label: d.key for d in REGIONS}}
    truth = phantom.regions
    for t in names:
        for p in names:
            n = int(np.count_nonzero((truth == t) & (regions == p)))
            if t != p and n > 300:
                print(f"  true {names[t]:20s} labelled {names[p]:20s} {n:8d} voxels")
    wedge = (truth == region_by_name("adipose").label) & (
        regions == region_by_name("tibial_trabecular").label)
    print(f"  true adipose labelled tibial trabecular: {int(wedge.sum())} voxels; the network's "
          f"raw classes there (0-5): {np.bincount(raw[wedge], minlength=6).tolist()}")


if __name__ == "__main__":
    main()
