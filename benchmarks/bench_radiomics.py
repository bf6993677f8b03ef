"""Radiomics speed: stock pyradiomics vs the engine (full set and prediction mode).

Input: a full-size phantom (1600 x 1600 slices, 60.7 um, 7 regions). Stock = one
``RadiomicsFeatureExtractor.execute`` per region, serially, as a user would call it.
Per-slice times are projected linearly to a 168-slice scan (printed as "projected").

    python benchmarks/bench_radiomics.py --slices 4 --jobs 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import numpy as np
from _common import machine, peak_rss_gb


def stock_seconds_per_slice(hu2d, labels2d, spacing_mm, params, one_blas_thread):
    import SimpleITK as sitk
    from radiomics import featureextractor
    from threadpoolctl import threadpool_limits

    extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    image = sitk.GetImageFromArray(hu2d[np.newaxis].astype(np.float32))
    image.SetSpacing(tuple(reversed(spacing_mm)))
    mask = sitk.GetImageFromArray(labels2d[np.newaxis].astype(np.uint32))
    mask.CopyInformation(image)
    start = time.perf_counter()
    with threadpool_limits(limits=1 if one_blas_thread else None):
        for label in np.unique(labels2d[labels2d > 0]):
            extractor.execute(image, mask, label=int(label))
    return time.perf_counter() - start


def main() -> None:
    from HRpQCTRadiomicsLib.extraction import extract_features
    from HRpQCTRadiomicsLib.settings import load_settings, settings_for_mode
    from HRpQCTSegmenterLib.phantom import PhantomParams, generate_phantom

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--n-features", type=int, default=14,
                        help="prediction mode: features of the classifier (paper: 3-14/region)")
    parser.add_argument("--skip-stock", action="store_true")
    args = parser.parse_args()
    logging.getLogger("radiomics").setLevel(logging.ERROR)

    phantom = generate_phantom(PhantomParams(n_slices=args.slices), seed=1)
    hu, labels, spacing = phantom.scan.hu, phantom.regions, phantom.scan.spacing_mm
    settings = load_settings(args.preset)
    counts = np.bincount(labels[0].ravel(), minlength=8)[1:]
    out = {"machine": machine(), "slices": args.slices, "jobs": args.jobs,
           "shape": list(hu.shape), "region_pixels_slice0": counts.tolist()}

    if not args.skip_stock:
        params = settings_for_mode(settings, "slice")
        out["stock_default_threads_s_per_slice"] = stock_seconds_per_slice(
            hu[0], labels[0], spacing, params, one_blas_thread=False)
        out["stock_one_blas_thread_s_per_slice"] = stock_seconds_per_slice(
            hu[0], labels[0], spacing, params, one_blas_thread=True)

    start = time.perf_counter()
    extract_features(hu[:1], labels[:1], spacing, settings=settings, n_jobs=1)
    out["engine_serial_s_per_slice"] = time.perf_counter() - start

    start = time.perf_counter()
    table = extract_features(hu, labels, spacing, settings=settings, n_jobs=args.jobs)
    seconds = time.perf_counter() - start
    out["engine_parallel_s_per_slice"] = seconds / args.slices
    out["n_features"] = len(table.feature_names)
    out["rows_ok"] = len(table.ok_rows())

    rng = np.random.default_rng(0)
    names = sorted(rng.choice(table.feature_names, size=args.n_features, replace=False).tolist())
    out["prediction_features"] = names
    region = 7  # adipose: the largest region, the worst case
    start = time.perf_counter()
    extract_features(hu, labels, spacing, settings=settings, features={region: names},
                     n_jobs=args.jobs)
    out["prediction_s_per_slice"] = (time.perf_counter() - start) / args.slices
    for key in list(out):
        if key.endswith("_s_per_slice"):
            out[key.replace("_s_per_slice", "_s_per_168_slices_projected")] = out[key] * 168
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
