"""Time and peak memory of one full-size phantom (168 x 1600 x 1600), plus figures.

Usage: python benchmarks/bench_phantom.py [--slices 168] [--size 1600] [--motion 1]
                                          [--write DIR] [--figures]

Generation is timed separately from writing (gzip of ~0.9 GB of int16 dominates writing).
``--figures`` also renders the PNGs of benchmarks/RESULTS.md into benchmarks/figures/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_gb

from HRpQCTCore.regions import REGIONS
from HRpQCTPhantom import PhantomParams, generate_phantom, write_phantom

FIGURES = Path(__file__).parent / "figures"


def _overlay(ax, hu, regions, title, window=(-400, 2200)):
    lut = np.zeros((8, 4))
    for r in REGIONS:
        lut[r.label, :3] = np.array(r.color_rgb) / 255
        lut[r.label, 3] = 0.4
    ax.imshow(hu, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    if regions is not None:
        ax.imshow(lut[regions], interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def figures(ph, name: str, z: int, crop=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu, reg = ph.scan.hu[z], ph.regions[z]
    if crop is not None:
        hu, reg = hu[crop], reg[crop]
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    _overlay(axes[0], hu, None, f"{name}: HU (window -400..2200)")
    _overlay(axes[1], hu, reg, "7-region truth overlay")
    fig.tight_layout()
    out = FIGURES / f"phantom_{name}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=168)
    ap.add_argument("--size", type=int, default=1600)
    ap.add_argument("--motion", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", help="also write NIfTI files into this folder and time it")
    ap.add_argument("--figures", action="store_true")
    args = ap.parse_args()
    params = PhantomParams(n_slices=args.slices, field_px=args.size, motion_grade=args.motion,
                           cast=True, rotation_deg=10.0)
    t0 = time.perf_counter()
    ph = generate_phantom(params, args.seed)
    t_gen = time.perf_counter() - t0
    result = {"machine": machine(), "shape": list(ph.scan.shape), "motion_grade": args.motion,
              "generate_s": round(t_gen, 1), "peak_rss_gb_after_generate": round(peak_rss_gb(), 2)}
    if args.write:
        t0 = time.perf_counter()
        write_phantom(ph, args.write, "bench")
        result["write_s"] = round(time.perf_counter() - t0, 1)
        result["peak_rss_gb_after_write"] = round(peak_rss_gb(), 2)
    print(json.dumps(result))
    if args.figures:
        FIGURES.mkdir(exist_ok=True)
        z = args.slices // 2
        name = f"full_motion{args.motion}"
        figures(ph, name, z)
        c = args.size // 2
        crop = (slice(c - 400, c + 200), slice(c - 250, c + 350))
        figures(ph, f"zoom_motion{args.motion}", z, crop)
        print(json.dumps(ph.truth["morphometrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
