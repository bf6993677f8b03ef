"""Two candidate rules after the myotendinous/adipose split, tried on development phantoms.

Usage: python benchmarks/probe_myotendinous_rules.py DEV/manifest.csv [--grades 2,3]

``DEV`` is a set made by ``make_test_set.py`` with seeds outside both test sets (e.g.
``--seed-base 9300 --slices 6``), so that a rule is chosen without looking at the test sets.
On the phantom's true bone/soft-tissue split, the default soft-tissue subdivision is scored
(Dice against the tissue truth, mean over the scans of the chosen motion grades) as it is and
with one extra step at the end of each slice:

* **muscle-core hysteresis**: a myotendinous part (8-connected, in the slice) without a voxel
  whose local mean lies ``f`` times the split-to-muscle distance above the split becomes
  adipose (``f`` = 0.5, 1.0, 1.5);
* **thin parts dropped**: a myotendinous part in which no square of side ``2 w`` fits becomes
  adipose (``w`` = 0.5 ... 1.6 mm), a width test on whole parts, where the default's 0.4 mm
  opening trims each part's thin edges.

Each variant wraps the module's per-slice step (the default labels first, then the extra
rule on the same local means), so nothing of the product changes. Also printed: the voxels of
true adipose labelled myotendinous ("FP") and of true myotendinous labelled adipose ("FN"),
per scan on average. All data are synthetic.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine
from bench_segmentation_accuracy import read_test_case
from bench_soft_tissue_motion import dice

from HRpQCTCore.regions import region_by_name
from HRpQCTSegmentationEngine.postprocess import DEFAULT
from HRpQCTSegmentationEngine.postprocess import soft_tissue as st

MYOTENDINOUS = region_by_name("myotendinous").label
ADIPOSE = region_by_name("adipose").label
_EIGHT = np.ones((3, 3), bool)


def _parts(view: np.ndarray) -> tuple[np.ndarray, int]:
    return ndi.label(view == MYOTENDINOUS, _EIGHT)


def muscle_core(view: np.ndarray, local_hu: np.ndarray, levels, factor: float) -> None:
    """Myotendinous parts without a voxel above the core level become adipose."""
    labels, n = _parts(view)
    if n:
        core_hu = levels.split_hu + factor * (levels.muscle_hu - levels.split_hu)
        has_core = np.bincount(labels[local_hu > core_hu], minlength=n + 1) > 0
        has_core[0] = True
        view[~has_core[labels]] = ADIPOSE


def thin_parts(view: np.ndarray, half_px: int) -> None:
    """Myotendinous parts holding no ``(2 half_px + 1)``-voxel square become adipose."""
    labels, n = _parts(view)
    if n:
        eroded = (labels > 0).view(np.uint8)
        for axis in (0, 1):
            eroded = ndi.minimum_filter1d(eroded, 2 * half_px + 1, axis=axis, mode="constant")
        keep = np.zeros(n + 1, bool)
        keep[np.unique(labels[eroded > 0])] = True
        keep[0] = True
        view[~keep[labels]] = ADIPOSE


def with_extra_step(extra):
    """The module's per-slice step followed by ``extra(view, local_hu, levels)``."""
    default_step = st._label_slice

    def step(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules) -> None:
        masks = st._slice_masks(classes2d, spacing_yx, config)  # before view2d is written
        default_step(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules)
        if masks is None:
            return
        box, soft, _, inner = masks
        local_hu = st._local_mean(hu2d, num2d, den2d, box, soft)
        if rules.drift_window_px is not None:
            local_hu = st.correct_drift(local_hu, inner, rules.levels, rules.drift_window_px)
        extra(view2d[box], local_hu, rules.levels)

    return step


def variants(pixel_mm: float) -> dict:
    out = {"default": None}
    for factor in (0.5, 1.0, 1.5):
        out[f"muscle-core hysteresis, f = {factor}"] = (
            lambda view, hu, levels, f=factor: muscle_core(view, hu, levels, f))
    for width_mm in (0.5, 0.7, 0.9, 1.2, 1.6):
        half = round(width_mm / pixel_mm)
        out[f"thin parts dropped, w = {width_mm} mm"] = (
            lambda view, hu, levels, h=half: thin_parts(view, h))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--grades", default="2,3", help="motion grades scored (default 2,3)")
    args = parser.parse_args()
    grades = {int(g) for g in args.grades.split(",")}
    with open(args.manifest, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["motion_grade"]) in grades]
    default_step, scores = st._label_slice, {}
    try:
        for row in rows:
            scan, truth, truth_regions = read_test_case(args.manifest, row)
            hu = np.asarray(scan.hu, dtype=np.float32)
            levels = st.soft_tissue_levels(truth, hu, scan.spacing_mm, DEFAULT)
            true_myo, true_fat = truth_regions == MYOTENDINOUS, truth_regions == ADIPOSE
            for name, extra in variants(float(scan.spacing_mm[1])).items():
                st._label_slice = default_step if extra is None else with_extra_step(extra)
                regions = st.subdivide_soft_tissue(truth, hu, scan.spacing_mm, DEFAULT,
                                                   levels=levels)
                myo, fat = regions == MYOTENDINOUS, regions == ADIPOSE
                scores.setdefault(name, []).append(
                    (dice(myo, true_myo), dice(fat, true_fat), (myo & true_fat).sum(),
                     (fat & true_myo).sum()))
            print(f"{row['subject']} (motion {row['motion_grade']}): done", flush=True)
    finally:
        st._label_slice = default_step
    print(f"\n{machine()}\n{args.manifest}: {len(rows)} scans, motion grades {sorted(grades)}\n")
    print("| rule after the split | myotendinous Dice | adipose Dice | FP voxels | FN voxels |")
    print("|---|---|---|---|---|")
    for name, values in scores.items():
        m = np.mean(np.array(values, dtype=float), axis=0)
        print(f"| {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.0f} | {m[3]:.0f} |")


if __name__ == "__main__":
    main()
