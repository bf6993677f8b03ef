"""Radiomics of soft tissue within r mm of the tibia, for the paper's distance ablation.

For each subject of a cohort manifest (``hrpqct cohort``), the 5-class truth gives the
soft tissue and the tibia; :func:`HRpQCTSegmentationEngine.postprocess.distance_rings` gives, per
radius, the soft tissue within that in-plane distance of the tibia's outer surface (rings are
nested: the 10 mm ring contains the 5 mm ring). Each ring mask goes through the same
extraction as a region (paper preset). One CSV per subject, in the schema of
``hrpqct radiomics`` with ``region`` = ``ring_<r>mm`` (``region_label`` 0: not a region of
the region model).

Usage: python benchmarks/extract_ring_features.py COHORT/manifest.csv OUT_DIR
       [--radii 2,5,10,15,20] [--slices 6] [--subjects N] [--reverse]
"""

from __future__ import annotations

import argparse
import csv
import io as text_io
from pathlib import Path

import numpy as np

from HRpQCTCore import io
from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.regions import regions_to_classes
from HRpQCTRadiomicsEngine.extraction import STATUS_OK, extract_slice_features
from HRpQCTRadiomicsEngine.inputs import read_region_map
from HRpQCTRadiomicsEngine.settings import load_settings
from HRpQCTRadiomicsEngine.table import ID_COLUMNS
from HRpQCTSegmentationEngine.postprocess.soft_tissue import distance_rings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--radii", default="2,5,10,15,20")
    parser.add_argument("--slices", default="6")
    parser.add_argument("--subjects", type=int)
    parser.add_argument("--reverse", action="store_true",
                        help="subjects in reverse order (run a second process beside the first)")
    args = parser.parse_args()
    radii = [float(r) for r in args.radii.split(",")]
    slices = [int(s) for s in args.slices.split(",")]
    settings = load_settings("paper")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.manifest, newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))[: args.subjects]
    if args.reverse:
        records.reverse()
    root = args.manifest.parent
    for record in records:
        subject = record["subject_id"]
        out = args.out_dir / f"{subject}_rings.csv"
        if out.exists():
            continue
        scan = io.read_scan(root / record["scan_path"])
        regions = read_region_map(root / record["regions_path"], scan.shape)
        classes = regions_to_classes(regions[slices])
        rings = distance_rings(classes, scan.spacing_mm, tuple(radii))
        rows, names = [], {}
        for i, z in enumerate(slices):
            for k, radius in enumerate(sorted(radii), start=1):
                mask = ((rings[i] > 0) & (rings[i] <= k)).astype(np.uint8)
                (result,) = extract_slice_features(scan.hu[z], mask, scan.spacing_mm,
                                                   settings, regions=[1], slice_index=z)
                names.update(dict.fromkeys(result.features))
                rows.append((z, f"ring_{radius:g}mm", result))
        buffer = text_io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*ID_COLUMNS, *names])
        for z, region, r in rows:
            ok = r.status == STATUS_OK
            writer.writerow([subject, subject, z, region, 0, r.voxel_count, r.status, r.reason,
                             settings.name, settings.sha256,
                             *[repr(float(r.features[n])) if ok else "" for n in names]])
        write_text_atomic(out, buffer.getvalue())
        print(subject, flush=True)


if __name__ == "__main__":
    main()
