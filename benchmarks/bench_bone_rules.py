"""The bone clean-up's two additions for close bones, scored against the paper's rule (#17).

Usage::

    python benchmarks/bench_bone_rules.py /work/data/gap_test/manifest.csv [--cache DIR]

Every test scan of the manifest (``make_test_set.py``'s layout) is segmented once with the
bundled model (the network's labels are kept in ``--cache`` for a second run) and
post-processed three ways, side by side:

- ``paper rule``: each bone class keeps its largest component, nothing else
  (``keep_cortical_arcs=False, bone_gap_band_mm=0``);
- ``+ cortical arcs``: a cortical part that rule drops but that touches the marrow stays;
- ``+ gap step`` (the default): soft tissue between close bones that the network called
  tibial marrow is given back (``bone_gap_band_mm``, see ``postprocess/surfaces.py``).

The soft tissue is split by the rules (``soft_tissue_model="none"``) in all three, so only
the bone steps differ. Prints per-scan and mean IoU (%) of the five classes after
post-processing, and Dice (%) of adipose and myotendinous against the tissue truth. All data
are synthetic.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine
from bench_segmentation_accuracy import read_test_case, region_dice

from HRpQCTCore.regions import regions_to_classes
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.inference import run_segmentation
from HRpQCTSegmentationEngine.postprocess import DEFAULT, postprocess

VARIANTS = {
    "paper rule": dict(keep_cortical_arcs=False, bone_gap_band_mm=0.0),
    "+ cortical arcs": dict(keep_cortical_arcs=True, bone_gap_band_mm=0.0),
    "+ gap step (default)": dict(keep_cortical_arcs=True,
                                 bone_gap_band_mm=DEFAULT.bone_gap_band_mm),
}
COLUMNS = ("TbC", "TbT", "FbC", "FbT", "soft", "adipose", "myotendinous")


def network_labels(manifest: Path, row: dict, scan, cache: Path | None) -> np.ndarray:
    """The bundled model's 5-class labels of one scan, from ``cache`` when there."""
    cached = cache / manifest.parent.name / f"{row['subject']}.npy" if cache else None
    if cached is not None and cached.exists():
        return np.load(cached)
    labels = run_segmentation(scan.hu, str(resolve_model_folder(None)),
                              spacing_mm=scan.spacing_mm).labels
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, labels)
    return labels


def scores(truth: np.ndarray, truth_regions: np.ndarray, regions: np.ndarray) -> list[float]:
    """IoU of the five classes and Dice of adipose and myotendinous, in %."""
    classes = regions_to_classes(regions)
    iou = [np.count_nonzero((truth == c) & (classes == c))
           / max(np.count_nonzero((truth == c) | (classes == c)), 1) for c in range(1, 6)]
    dice = region_dice(truth_regions, regions)
    return [100 * v for v in (*iou, dice["adipose"], dice["myotendinous"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--cache", type=Path, help="keep the network's labels here")
    args = parser.parse_args()
    print(machine())
    table: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    for row in csv.DictReader(args.manifest.open(encoding="utf-8")):
        scan, truth, truth_regions = read_test_case(args.manifest, row)
        labels = network_labels(args.manifest, row, scan, args.cache)
        for name, fields in VARIANTS.items():
            config = replace(DEFAULT, soft_tissue_model="none", **fields)
            regions = postprocess(labels.copy(), scan.hu, scan.spacing_mm, config).regions
            table[name].append(scores(truth, truth_regions, regions))
        print(row["subject"], " | ".join(
            f"{name}: " + " ".join(f"{v:.2f}" for v in table[name][-1]) for name in VARIANTS),
            flush=True)
    print(f"\n| variant | {' | '.join(COLUMNS)} | mean IoU of 5 |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name, rows in table.items():
        mean = np.mean(rows, axis=0)
        print(f"| {name} | {' | '.join(f'{v:.2f}' for v in mean)} | {mean[:5].mean():.2f} |")


if __name__ == "__main__":
    main()
