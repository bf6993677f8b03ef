"""Time and peak memory of post-processing one full-size scan (168 x 1600 x 1600), per step.

Usage: python benchmarks/bench_postprocess.py [--slices 168] [--size 1600] [--paper]
       [--source phantom|disks] [--hu-dtype native|float32] [--workers 2] [--speckle 1e-4]

The input is either a full-size phantom (``--source phantom``, default: its true 5-class map
stands in for a prediction) or a constructed leg of disks (``--source disks``); neither needs a
trained model, and the work per voxel is the same as on a real prediction. A network's output
also has specks and fragments, which the clean-up must remove: ``--speckle F`` sets a fraction
F of the voxels to random classes (1..5) to include that work.

Each step is reported with its wall time, its CPU time (all threads; on a shared machine the
figure to compare, as other jobs stretch wall time but not CPU time) and the peak resident
memory of the process during the step (Linux: the high-water mark is reset before each step).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_gb

from HRpQCTSegmentationEngine.postprocess import (
    PAPER,
    PostprocessConfig,
    clean_classes,
    distance_rings,
    refine_surfaces,
    subdivide_soft_tissue,
)


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux >= 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _current_peak_rss_gb() -> float:
    """The high-water mark since the last reset (VmHWM), else the lifetime peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return peak_rss_gb()


def _rss_gb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def measure(name: str, fn, rows: list):
    """Run ``fn()``; append (name, wall s, CPU s, RSS before GB, peak RSS GB) to ``rows``.

    The step's own memory is the peak minus the RSS before (inputs, earlier results and the
    interpreter).
    """
    _reset_peak_rss()
    before = _rss_gb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rows.append((name, wall, usage.ru_utime + usage.ru_stime - cpu0, before,
                 _current_peak_rss_gb()))
    return result


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
    parser.add_argument("--hu-dtype", choices=("native", "float32"), default="native",
                        help="HU as the source gives them (the phantom: int16) or float32")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speckle", type=float, default=0.0,
                        help="fraction of voxels set to random classes (prediction errors)")
    args = parser.parse_args()
    pixel_mm = 0.0607
    if args.source == "phantom":
        from HRpQCTPhantom import PhantomParams, generate_phantom

        phantom = generate_phantom(PhantomParams(n_slices=args.slices, field_px=args.size),
                                   seed=11)
        classes, hu = phantom.classes, phantom.scan.hu
        del phantom
    else:
        classes, hu = constructed_leg(args.slices, args.size, pixel_mm)
    if args.speckle > 0:
        classes = np.ascontiguousarray(classes)
        rng = np.random.default_rng(5)
        where = rng.integers(0, classes.size, int(classes.size * args.speckle))
        classes.reshape(-1)[where] = rng.integers(1, 6, where.size).astype(classes.dtype)
    if args.hu_dtype == "float32":
        hu = np.asarray(hu, dtype=np.float32)
    inputs_gb = (classes.nbytes + hu.nbytes) / 2**30
    generation_peak_gb = peak_rss_gb()  # before the first reset of the high-water mark
    config = PAPER if args.paper else PostprocessConfig()
    spacing = (pixel_mm,) * 3
    rows: list = []
    cleaned, _ = measure("clean-up (bone rules)", lambda: clean_classes(
        classes, spacing, config, workers=args.workers), rows)
    measure("surface refinement", lambda: refine_surfaces(
        cleaned, hu, spacing, config, workers=args.workers), rows)
    regions = measure("soft-tissue subdivision", lambda: subdivide_soft_tissue(
        cleaned, hu, spacing, config, workers=args.workers), rows)
    measure("distance rings (optional)", lambda: distance_rings(
        cleaned, spacing, config.ring_radii_mm, workers=args.workers), rows)
    print(machine())
    print(f"input ({args.source}) {args.slices} x {args.size} x {args.size}, classes "
          f"{classes.dtype} + HU {hu.dtype} = {inputs_gb:.2f} GB, preset "
          f"{'paper' if args.paper else 'default'}, speckle {args.speckle:g}, {args.workers} "
          f"worker thread(s); peak RSS "
          f"while making the input {generation_peak_gb:.2f} GB")
    print(f"{'step':<28} {'wall s':>8} {'CPU s':>8} {'RSS before GB':>14} {'peak RSS GB':>12}")
    for name, wall, cpu, before, peak in rows:
        print(f"{name:<28} {wall:8.1f} {cpu:8.1f} {before:14.2f} {peak:12.2f}")
    wall, cpu = (sum(r[i] for r in rows[:3]) for i in (1, 2))
    print(f"{'post-processing (3 steps)':<28} {wall:8.1f} {cpu:8.1f} {'':>14} "
          f"{max(r[4] for r in rows[:3]):12.2f}")
    print("regions present:", np.unique(regions).tolist())


if __name__ == "__main__":
    main()
