"""Where a fibula close to the tibia goes wrong: the network or the post-processing (issue #17).

Usage: python benchmarks/probe_fibula_gap.py [--gap-mm 0.8] [--seed 9990] [--slices 4]

Makes one full-resolution phantom (parameters sampled as the cohort does, normal bone, then the
narrowest tibia-fibula distance set to ``--gap-mm``; the generator's own sampler draws 1.2 to
4.5 mm, so the bundled model never saw less), segments it with the bundled model and the
default post-processing, and prints the 7-region confusions above 300 voxels and, for the true
adipose voxels labelled tibial trabecular (the wedge between the bones), the network's raw
class there. All data are synthetic.
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
    parser.add_argument("--gap-mm", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=9990)
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    from HRpQCTCore.regions import REGIONS, region_by_name
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.postprocess import postprocess

    print(machine())
    params = PhantomParams.sample(np.random.default_rng(args.seed), osteoporotic=False)
    params = replace(params, fibula_gap_mm=args.gap_mm, n_slices=args.slices)
    phantom = generate_phantom(params, seed=args.seed)
    seg = run_segmentation(phantom.scan.hu, resolve_model_folder(None),
                           spacing_mm=phantom.scan.spacing_mm)
    raw = seg.labels.copy()
    regions = postprocess(seg.labels, phantom.scan.hu, phantom.scan.spacing_mm).regions
    names = {0: "background", **{d.label: d.key for d in REGIONS}}
    truth = phantom.regions
    print(f"fibula gap {args.gap_mm} mm, seed {args.seed}, {args.slices} slices")
    for t in names:
        for p in names:
            n = int(np.count_nonzero((truth == t) & (regions == p)))
            if t != p and n > 300:
                print(f"  true {names[t]:20s} labelled {names[p]:20s} {n:8d} voxels")
    wedge = (truth == region_by_name("adipose").label) & (
        regions == region_by_name("tibial_trabecular").label)
    print(f"true adipose labelled tibial trabecular: {int(wedge.sum())} voxels; the network's "
          f"raw classes there (0-5): {np.bincount(raw[wedge], minlength=6).tolist()}")


if __name__ == "__main__":
    main()
