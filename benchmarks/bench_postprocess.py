"""Time and peak memory of post-processing one full-size scan (168 x 1600 x 1600).

Usage: python benchmarks/bench_postprocess.py [--slices 168] [--size 1600] [--paper]

The input is either a full-size phantom (``--source phantom``, default: its true 5-class map
stands in for a prediction) or a constructed leg of disks (``--source disks``); neither needs a
trained model, and the work per voxel is the same as on a real prediction.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_gb

from HRpQCTSegmenterLib.postprocess import (
    PAPER,
    PostprocessConfig,
    distance_rings,
    postprocess,
)


def constructed_leg(n_slices: int, size: int, pixel_mm: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    c = size / 2

    def disk(cy, cx, r_mm):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= (r_mm / pixel_mm) ** 2

    plane = np.zeros((size, size), np.uint8)
    plane[disk(c, c, 34)] = 5
    plane[disk(c - 2 / pixel_mm, c - 3 / pixel_mm, 15.5)] = 1
    plane[disk(c - 2 / pixel_mm, c - 3 / pixel_mm, 14)] = 2
    plane[disk(c + 12 / pixel_mm, c + 14 / pixel_mm, 6)] = 3
    plane[disk(c + 12 / pixel_mm, c + 14 / pixel_mm, 4.5)] = 4
    classes = np.repeat(plane[None], n_slices, axis=0)
    hu_plane = np.select([plane == 5, plane == 1, plane == 3, plane > 0],
                         [40.0, 2200.0, 2200.0, 400.0], -1000.0).astype(np.float32)
    hu = np.empty(classes.shape, np.float32)
    for z in range(n_slices):
        hu[z] = hu_plane + rng.normal(0, 150, (size, size)).astype(np.float32)
    return classes, hu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=168)
    parser.add_argument("--size", type=int, default=1600)
    parser.add_argument("--paper", action="store_true", help="the paper's rules (2D, raw HU)")
    parser.add_argument("--source", choices=("phantom", "disks"), default="phantom")
    args = parser.parse_args()
    pixel_mm = 0.0607
    if args.source == "phantom":
        from HRpQCTSegmenterLib.phantom import PhantomParams, generate_phantom

        phantom = generate_phantom(PhantomParams(n_slices=args.slices, field_px=args.size),
                                   seed=11)
        classes, hu = phantom.classes, phantom.scan.hu
        del phantom
    else:
        classes, hu = constructed_leg(args.slices, args.size, pixel_mm)
    base_gb = peak_rss_gb()
    config = PAPER if args.paper else PostprocessConfig()
    t0 = time.perf_counter()
    result = postprocess(classes, hu, (pixel_mm,) * 3, config)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    distance_rings(result.classes, (pixel_mm,) * 3, config.ring_radii_mm)
    ring_seconds = time.perf_counter() - t0
    print(machine())
    print(f"input ({args.source}) {args.slices} x {args.size} x {args.size}, preset "
          f"{'paper' if args.paper else 'default'}: {seconds:.1f} s, peak RSS "
          f"{peak_rss_gb():.2f} GB (inputs alone {base_gb:.2f} GB); distance rings "
          f"(optional) {ring_seconds:.1f} s more")
    print("regions present:", np.unique(result.regions).tolist())


if __name__ == "__main__":
    main()
