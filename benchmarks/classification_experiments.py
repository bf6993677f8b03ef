"""The paper's classification experiments, on a synthetic phantom cohort.

Input: per-region feature CSVs from ``hrpqct radiomics`` (one or more slices per subject) of a
cohort made by ``hrpqct cohort`` (its ``manifest.csv`` gives the subject labels and the scan
and region files, from which the standard morphometrics are measured on the same slices).

Experiments (logistic regression, the paper's selection inside every fold; out-of-fold
probabilities from subject-grouped, stratified k-fold cross-validation, repeated
``--repeats`` times with different fold seeds, so every subject is a test subject once per
repeat; each cell is the mean ± SD of the metric across repeats (just the value for one
repeat), then in brackets the 95 % bootstrap interval over subjects of the first repeat):

1. image level, one model per region (the paper's per-region table);
2. patient level (slice probabilities averaged per subject): standard morphometrics
   (non-radiomics), tibial radiomics (cortical + trabecular), soft-tissue radiomics
   (skin + myotendinous + adipose);
3. optionally (``--rings``) the soft-tissue distance ablation, from feature CSVs of ring
   masks written by ``benchmarks/extract_ring_features.py``;
4. ``--target diagnosis`` instead: three classes (normal / osteopenia / osteoporosis, from a
   ``hrpqct cohort --classes 3`` manifest), multinomial logistic regression per region group
   at patient level: macro AUROC (one-vs-rest), per-class sensitivity and the confusion
   matrix of the first repeat (rows true class).

Writes a Markdown table to stdout and the full results as JSON (``--json``).

Usage::

    python benchmarks/classification_experiments.py COHORT/manifest.csv FEATURES_DIR \
        [--folds 5] [--repeats 5] [--target diagnosis] [--json results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from HRpQCTCore.regions import REGIONS
from HRpQCTRadiomicsEngine.classification import (
    DIAGNOSIS_CLASSES,
    Dataset,
    assemble_dataset,
    class_order,
    cross_validate,
    evaluate,
)
from HRpQCTRadiomicsEngine.inputs import read_region_map
from HRpQCTRadiomicsEngine.morphometrics import MORPHOMETRIC_NAMES, scan_morphometrics
from HRpQCTRadiomicsEngine.table import read_feature_csv

PATIENT_MODELS = {
    "tibial radiomics": ["tibial_cortical", "tibial_trabecular"],
    "soft-tissue radiomics": ["skin", "myotendinous", "adipose"],
}
METRICS = ("accuracy", "f1", "sensitivity", "specificity", "auroc")


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def repeated_evaluation(data: Dataset, folds: int, repeats: int, n_boot: int) -> dict:
    """Evaluate ``repeats`` cross-validations with fold seeds 0..repeats-1.

    The first repeat's full evaluation (metrics and bootstrap intervals) is returned, with
    ``repeats``: per level and metric the mean, SD (ddof 1; 0 for one repeat) and values.
    """
    names = data.class_names
    runs = [evaluate(data.y, cross_validate(data, "logistic", folds, seed)[0], data.groups,
                     n_boot if seed == 0 else 0, seed=0, class_names=names)
            for seed in range(repeats)]
    out = runs[0]
    out["repeats"] = {level: _spread([r[level]["metrics"] for r in runs])
                      for level in ("image", "patient")}
    return out


def _spread(metrics: list[dict]) -> dict:
    out = {}
    for key, value in metrics[0].items():
        if isinstance(value, (int, float)) and key != "n":
            values = np.array([m[key] for m in metrics], dtype=float)
            out[key] = {"mean": float(np.mean(values)),
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "values": values.tolist()}
    return out


def finite_columns(data: Dataset) -> Dataset:
    """``data`` without the features that are NaN/infinite in any sample (degenerate regions)."""
    finite = np.isfinite(data.X).all(axis=0)
    names = [n for n, keep in zip(data.feature_names, finite, strict=True) if keep]
    return Dataset(data.X[:, finite], data.y, data.groups, names, data.sample_ids,
                   data.class_names)


def morphometric_dataset(manifest: list[dict[str, str]], root: Path,
                         samples: list[tuple[str, str]], labels: dict[str, int]) -> Dataset:
    """Standard morphometrics at the same (scan, slice) samples as the radiomics."""
    from HRpQCTCore import io

    wanted: dict[str, list[int]] = {}
    for scan, z in samples:
        wanted.setdefault(scan, []).append(int(z))
    rows, ids, groups = [], [], []
    for record in manifest:
        subject = record["subject_id"]
        if subject not in wanted:
            continue
        scan = io.read_scan(root / record["scan_path"])
        regions = read_region_map(root / record["regions_path"], scan.shape)
        for row in scan_morphometrics(scan.hu, regions, scan.spacing_mm,
                                      sorted(wanted[subject])):
            rows.append([row[n] for n in MORPHOMETRIC_NAMES])
            ids.append((subject, str(int(row["slice"]))))
            groups.append(subject)
    matrix = np.array(rows, dtype=np.float64)
    keep = np.isfinite(matrix).all(axis=0)  # e.g. a fibula outside the field in some subject
    groups_arr = np.array(groups, dtype=object)
    y = np.array([labels[g] for g in groups], dtype=int)
    names = [n for n, k in zip(MORPHOMETRIC_NAMES, keep, strict=True) if k]
    return Dataset(matrix[:, keep], y, groups_arr, names, ids)


def _fmt(result: dict, level: str, metric: str) -> str:
    low, high = result[level]["ci95"][metric]
    spread = result.get("repeats", {}).get(level, {}).get(metric)
    if spread is None or len(spread["values"]) == 1:  # one repeat: as before
        return f"{result[level]['metrics'][metric]:.2f} ({low:.2f}–{high:.2f})"
    return f"{spread['mean']:.2f} ± {spread['sd']:.2f} ({low:.2f}–{high:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("features", type=Path, help="folder of feature CSVs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--rings", type=Path, help="folder of ring-mask feature CSVs")
    parser.add_argument("--target", choices=("osteoporosis", "diagnosis"),
                        default="osteoporosis",
                        help="diagnosis: three classes from the manifest's diagnosis column")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    manifest = read_manifest(args.manifest)
    rows = read_feature_csv(sorted(args.features.glob("*.csv")))
    if args.target == "diagnosis":
        results = three_classes(manifest, rows, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return 0
    labels = {r["subject_id"]: int(r["osteoporosis"]) for r in manifest}
    results: dict = {"image_level": {}, "patient_level": {}, "rings": {}}

    def run(data: Dataset) -> dict:
        out = repeated_evaluation(data, args.folds, args.repeats, args.bootstrap)
        out["n_subjects"] = len(set(data.groups))
        out["n_samples"] = len(data.y)
        return out

    print("## Image level, one logistic model per region\n")
    print("| region | slices (subjects) | accuracy | F1 | AUROC |")
    print("|---|---|---|---|---|")
    for region in REGIONS:
        data = finite_columns(assemble_dataset(rows, [region.key], labels))
        r = run(data)
        results["image_level"][region.key] = r
        print(f"| {region.name} | {r['n_samples']} ({r['n_subjects']}) | "
              f"{_fmt(r, 'image', 'accuracy')} | {_fmt(r, 'image', 'f1')} | "
              f"{_fmt(r, 'image', 'auroc')} |", flush=True)

    print("\n## Patient level (slice probabilities averaged per subject)\n")
    print("| model | subjects | accuracy | sensitivity | AUROC |")
    print("|---|---|---|---|---|")
    reference = assemble_dataset(rows, ["tibial_cortical"], labels)
    morph = morphometric_dataset(manifest, args.manifest.parent, reference.sample_ids, labels)
    models = {"standard morphometrics (non-radiomics)": morph}
    for name, regions in PATIENT_MODELS.items():
        models[name] = finite_columns(assemble_dataset(rows, regions, labels))
    for name, data in models.items():
        r = run(data)
        results["patient_level"][name] = r
        print(f"| {name} | {r['n_subjects']} | {_fmt(r, 'patient', 'accuracy')} | "
              f"{_fmt(r, 'patient', 'sensitivity')} | {_fmt(r, 'patient', 'auroc')} |",
              flush=True)

    if args.rings:
        ring_rows = read_feature_csv(sorted(args.rings.glob("*.csv")))
        radii = sorted({r["region"] for r in ring_rows.ids},
                       key=lambda name: float(name.removeprefix("ring_").removesuffix("mm")))
        print("\n## Soft tissue within r mm of the tibia (patient level)\n")
        print("| ring | subjects | accuracy | AUROC |")
        print("|---|---|---|---|")
        for radius in radii:
            data = _ring_dataset(ring_rows, radius, labels)
            r = run(data)
            results["rings"][radius] = r
            print(f"| {radius} | {r['n_subjects']} | {_fmt(r, 'patient', 'accuracy')} | "
                  f"{_fmt(r, 'patient', 'auroc')} |", flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


#: Region groups of the three-class experiment (patient level).
THREE_CLASS_MODELS = {
    "tibial cortical": ["tibial_cortical"],
    "tibial radiomics": ["tibial_cortical", "tibial_trabecular"],
    "soft-tissue radiomics": ["skin", "myotendinous", "adipose"],
}


def three_classes(manifest: list[dict[str, str]], rows, args) -> dict:
    """Patient-level multinomial models: macro AUROC, per-class sensitivity, confusion."""
    labels = {r["subject_id"]: r["diagnosis"] for r in manifest}
    names = class_order(labels.values())
    if names != list(DIAGNOSIS_CLASSES):
        raise SystemExit(f"Expected the classes {DIAGNOSIS_CLASSES}; the manifest has {names}")
    print("## Three classes, patient level (multinomial logistic regression)\n")
    print("| model | subjects | accuracy | macro AUROC | sens. normal | sens. osteopenia | "
          "sens. osteoporosis |")
    print("|---|---|---|---|---|---|---|")
    results: dict = {"three_classes": {}}
    for model, regions in THREE_CLASS_MODELS.items():
        data = finite_columns(assemble_dataset(rows, regions, labels, class_names=names))
        r = repeated_evaluation(data, args.folds, args.repeats, args.bootstrap)
        r["n_subjects"] = len(set(data.groups))
        results["three_classes"][model] = r
        cells = [_fmt(r, "patient", m) for m in
                 ("accuracy", "auroc", *(f"sensitivity_{c}" for c in names))]
        print(f"| {model} | {r['n_subjects']} | {' | '.join(cells)} |", flush=True)
    for model, r in results["three_classes"].items():
        m, ci = r["patient"]["metrics"], r["patient"]["ci95"]["confusion_rate"]
        print(f"\nConfusion matrix, {model} (first repeat; rows true, columns predicted; "
              "count, then row fraction with its 95 % interval):\n")
        print("| true \\ predicted | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for i, name in enumerate(names):
            cells = [f"{m['confusion'][i][j]} ({m['confusion_rate'][i][j]:.2f}, "
                     f"{ci[i][j][0]:.2f}–{ci[i][j][1]:.2f})" for j in range(len(names))]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return results


def _ring_dataset(rows, radius: str, labels: dict[str, int]) -> Dataset:
    mask = rows.where(region=radius, status="ok")
    matrix = rows.values[mask]
    finite = np.isfinite(matrix).all(axis=0)
    ids = [r for r, m in zip(rows.ids, mask, strict=True) if m]
    groups = np.array([r["subject"] for r in ids], dtype=object)
    return Dataset(matrix[:, finite], np.array([labels[g] for g in groups]), groups,
                   [n for n, k in zip(rows.feature_names, finite, strict=True) if k],
                   [(r["scan"], r["slice"]) for r in ids])


if __name__ == "__main__":
    sys.exit(main())
