"""Radiomics speed: stock pyradiomics vs the engine (full set and prediction mode).

Input: a full-size phantom (1600 x 1600 slices, 60.7 um, 7 regions). Three measurements:

(a) **stock**: one ``RadiomicsFeatureExtractor.execute`` per region, serially, in this
    process, as a user would call pyradiomics (``--stock-slices`` slices; 0 skips it), with
    BLAS's default threads and with one BLAS thread;
(b) **full**: the engine with every feature of the preset (939 for ``paper``);
(c) **prediction**: the engine restricted to a classifier's features (``PREDICTION_FEATURES``:
    21 features of 4 regions from all 10 images and all feature classes incl. shape, a heavy
    but realistic selected set), on every slice and on every ``--slice-step``-th slice;
(d) **prediction_classifier**: the same with the bundled classifier's 11 features (what
    ``hrpqct run`` extracts with the bundled classifier), serial and with the pool.

``--no-stock`` (same as ``--stock-slices 0``) and ``--no-full`` skip (a) and (b), e.g. to
time prediction mode alone.

Every variant reports CPU seconds (this process and its worker processes, via psutil when
installed; otherwise this process only) and wall seconds per slice, and a linear projection
to a ``--scan-slices`` (168) slice scan. Projections from fewer measured slices are labelled
``projected`` and leave out the pool's start-up, measured separately
(``pool_startup_wall_s``). Wall times depend on what else runs on the machine: the load
average is printed with them.

    python benchmarks/bench_radiomics.py --slices 4 --jobs 2
    python benchmarks/bench_radiomics.py --slices 168 --stock-slices 0   # a whole scan
    python benchmarks/bench_radiomics.py --slices 8 --no-full --stock-slices 0  # prediction
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time

import numpy as np
from _common import machine, peak_rss_gb

#: A classifier's feature list for prediction mode: region label -> pyradiomics names.
PREDICTION_FEATURES: dict[int, list[str]] = {
    7: ["original_firstorder_Mean", "original_glcm_JointEntropy",
        "wavelet-LH_glszm_ZoneEntropy", "wavelet-HH_firstorder_Kurtosis",
        "gradient_glrlm_RunEntropy", "square_gldm_DependenceNonUniformityNormalized",
        "original_shape2D_Perimeter"],
    6: ["exponential_firstorder_Median", "wavelet-LL_glcm_Idmn", "logarithm_ngtdm_Coarseness",
        "squareroot_glszm_SmallAreaEmphasis", "original_glrlm_LongRunEmphasis",
        "wavelet-HL_firstorder_Entropy"],
    2: ["original_glcm_Correlation", "wavelet-LL_firstorder_90Percentile", "gradient_glcm_MCC"],
    5: ["original_firstorder_Skewness", "wavelet-HH_glcm_ClusterShade",
        "squareroot_glrlm_GrayLevelNonUniformity", "original_shape2D_Sphericity",
        "exponential_gldm_LargeDependenceEmphasis"],
}


def _cpu_seconds() -> tuple[float, dict[int, float]]:
    """CPU seconds of this process, and of each of its child processes (needs psutil)."""
    try:
        import psutil
    except ImportError:
        return time.process_time(), {}
    children = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        children[child.pid] = times.user + times.system
    return time.process_time(), children


class Timer:
    """Wall seconds and CPU seconds (this process plus its worker processes) of a block."""

    def __enter__(self):
        self.wall = time.perf_counter()
        self._cpu = _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        own, children = _cpu_seconds()
        self.cpu = own - self._cpu[0] + sum(
            seconds - self._cpu[1].get(pid, 0.0) for pid, seconds in children.items())


def stock_slice(hu2d, labels2d, spacing_mm, params) -> Timer:
    """pyradiomics as shipped: one ``execute`` per region present in the slice."""
    import SimpleITK as sitk
    from radiomics import featureextractor

    extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    image = sitk.GetImageFromArray(hu2d[np.newaxis].astype(np.float32))
    image.SetSpacing(tuple(reversed(spacing_mm)))
    mask = sitk.GetImageFromArray(labels2d[np.newaxis].astype(np.uint32))
    mask.CopyInformation(image)
    with Timer() as t:
        for label in np.unique(labels2d[labels2d > 0]):
            extractor.execute(image, mask, label=int(label))
    return t


def per_slice(t: Timer, n_slices: int, scan_slices: int, prefix: str, out: dict,
              workers: int = 1) -> None:
    """Per-slice CPU and wall, the wall projected to a scan, and the CPU-bound estimate.

    ``..._cpu_bound_wall_s_per_scan`` = CPU per slice x scan slices / workers: the wall time
    on otherwise idle cores with perfect scaling (an estimate, not a measurement).
    """
    out[f"{prefix}_cpu_s_per_slice"] = round(t.cpu / n_slices, 3)
    out[f"{prefix}_wall_s_per_slice"] = round(t.wall / n_slices, 3)
    label = "" if n_slices >= scan_slices else "_projected"
    out[f"{prefix}_wall_s_per_scan{label}"] = round(t.wall / n_slices * scan_slices, 1)
    out[f"{prefix}_cpu_bound_wall_s_per_scan"] = round(
        t.cpu / n_slices * scan_slices / workers, 1)


def bundled_classifier_features() -> dict[int, list[str]]:
    """The bundled classifier's features by region (what ``hrpqct run`` extracts with it)."""
    from importlib import resources

    from HRpQCTRadiomicsEngine.prediction import features_by_region

    text = (resources.files("HRpQCTRadiomicsEngine") / "resources"
            / "osteoporosis-soft-tissue.classifier.json").read_text()
    return features_by_region(json.loads(text)["features"])


def serial_prediction(hu, labels, spacing, settings, features, args, out: dict,
                      prefix: str) -> None:
    """Prediction mode on slice 0 in this process (``--serial-repeats`` times, median)."""
    from HRpQCTRadiomicsEngine.extraction import extract_features

    timers = []
    for _ in range(max(1, args.serial_repeats)):
        with Timer() as t:
            extract_features(hu[:1], labels[:1], spacing, settings=settings,
                             features=features, n_jobs=1)
        timers.append(t)
    timers.sort(key=lambda t: t.cpu)
    per_slice(timers[len(timers) // 2], 1, args.scan_slices, prefix, out)


def main() -> None:
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTRadiomicsEngine.extraction import extract_features
    from HRpQCTRadiomicsEngine.settings import load_settings, settings_for_mode

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=4, help="slices measured (engine)")
    parser.add_argument("--stock-slices", type=int, default=1,
                        help="slices measured with stock pyradiomics (0: skip)")
    parser.add_argument("--scan-slices", type=int, default=168, help="scan length projected to")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes of the engine")
    parser.add_argument("--slice-step", type=int, default=4,
                        help="prediction on every n-th slice as well (1: skip that variant)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-full", action="store_true",
                        help="skip the full feature set (b): prediction mode only")
    parser.add_argument("--serial-repeats", type=int, default=1,
                        help="repeat the serial prediction measurements (median reported)")
    args = parser.parse_args()
    logging.getLogger("radiomics").setLevel(logging.ERROR)

    phantom = generate_phantom(PhantomParams(n_slices=args.slices), seed=args.seed)
    hu, labels, spacing = phantom.scan.hu, phantom.regions, phantom.scan.spacing_mm
    settings = load_settings(args.preset)
    n = args.slices
    out: dict = {"machine": machine(), "load_average_at_start": os.getloadavg(),
                 "preset": args.preset, "measured_slices": n, "jobs": args.jobs,
                 "scan_slices": args.scan_slices, "shape": list(hu.shape),
                 "region_pixels_slice0": np.bincount(labels[0].ravel(), minlength=8)[1:].tolist()}

    # (a) stock pyradiomics, serial: as shipped (BLAS picks its thread count), and with one
    # BLAS thread (the engine's setting; multi-threaded BLAS spins on GLCM's small MCC
    # eigenproblems, which costs most when the cores are busy)
    if args.stock_slices > 0:
        from threadpoolctl import threadpool_limits

        params = settings_for_mode(settings, "slice")
        measured = min(args.stock_slices, n)
        for name, limit in (("stock_serial", None), ("stock_serial_one_blas_thread", 1)):
            total = Timer()
            total.wall = total.cpu = 0.0
            for z in range(measured):
                with threadpool_limits(limits=limit):
                    t = stock_slice(hu[z], labels[z], spacing, params)
                total.wall += t.wall
                total.cpu += t.cpu
            per_slice(total, measured, args.scan_slices, name, out)

    # (b) full feature set: serial (CPU per slice), then the worker pool (wall)
    with Timer() as t:  # start the pool: loky keeps its workers for the next calls
        extract_features(hu[:1], labels[:1], spacing, settings=settings, n_jobs=args.jobs,
                         slices=[0], regions=[3])
    out["pool_startup_wall_s"] = round(t.wall, 2)
    if not args.no_full:
        with Timer() as t:
            serial = extract_features(hu[:1], labels[:1], spacing, settings=settings, n_jobs=1)
        per_slice(t, 1, args.scan_slices, "full_serial", out)
        out["n_features"] = len(serial.feature_names)
        with Timer() as t:
            table = extract_features(hu, labels, spacing, settings=settings, n_jobs=args.jobs)
        per_slice(t, n, args.scan_slices, "full_pool", out, args.jobs)
        out["rows_ok"] = len(table.ok_rows())

    # (c) prediction mode
    out["prediction_features"] = {k: len(v) for k, v in PREDICTION_FEATURES.items()}
    serial_prediction(hu, labels, spacing, settings, PREDICTION_FEATURES, args, out,
                      "prediction_serial")
    with Timer() as t:
        extract_features(hu, labels, spacing, settings=settings, features=PREDICTION_FEATURES,
                         n_jobs=args.jobs)
    per_slice(t, n, args.scan_slices, "prediction_pool", out, args.jobs)
    if args.slice_step > 1:
        # every k-th slice: k times fewer slices, the same values on the slices computed
        out["prediction_pool_every_kth_slice"] = args.slice_step
        kept = -(-args.scan_slices // args.slice_step)
        out["prediction_pool_every_kth_wall_s_per_scan_projected"] = round(
            out["prediction_pool_wall_s_per_slice"] * kept, 1)
        out["prediction_pool_every_kth_cpu_bound_wall_s_per_scan"] = round(
            out["prediction_pool_cpu_s_per_slice"] * kept / args.jobs, 1)

    # (d) prediction mode with the bundled classifier's features
    classifier = bundled_classifier_features()
    out["prediction_classifier_features"] = {k: len(v) for k, v in classifier.items()}
    serial_prediction(hu, labels, spacing, settings, classifier, args, out,
                      "prediction_classifier_serial")
    with Timer() as t:
        extract_features(hu, labels, spacing, settings=settings, features=classifier,
                         n_jobs=args.jobs)
    per_slice(t, n, args.scan_slices, "prediction_classifier_pool", out, args.jobs)

    out["load_average_at_end"] = os.getloadavg()
    out["peak_rss_gb_parent"] = round(peak_rss_gb(), 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
